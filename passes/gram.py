"""Gram matrices XᵀX of layer inputs, accumulated over calibration samples.

Each sample's XᵀX is computed in float32 and only its upper block triangle (the columns are cut into
up to 8 bands and band i is multiplied with bands i.. only: about 5/8 of the full product's work for
wide inputs; `mean` mirrors it). The per-sample products are summed in float64. In float64 that sum
of float32 terms is exact in practice, so its value does not depend on the order of the samples or
on how they are split over processes: N processes give the one-process Hessian, bit for bit, after
the final rounding to float32 (see docs/distributed.md). `bench/cost.py` reports the observe/forward
ratio and the Gram products' own time."""

from __future__ import annotations

import torch

MAX_BANDS = 8
BAND_WIDTH = 192  # narrower bands lose more to small matrix products than the triangle saves


class Gram:
    """Σ XᵀX over the samples added (see the module docstring), with the token count."""

    def __init__(self, width: int, device: torch.device | str = "cpu"):
        self.width = width
        self.tokens = 0
        self.total = torch.zeros(width, width, dtype=torch.float64, device=device)
        self._sample: torch.Tensor | None = None  # float32 scratch for one sample's product

    def add(self, x: torch.Tensor) -> None:
        """Add the upper block triangle of one sample's xᵀx, x of shape (..., width)."""
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if self._sample is None:
            self._sample = torch.zeros(self.width, self.width, device=x.device)
            self.total = self.total.to(x.device)
        d = self.width
        bands = min(MAX_BANDS, max(1, d // BAND_WIDTH))
        edges = [round(i * d / bands) for i in range(bands + 1)]
        for start, stop in zip(edges, edges[1:]):  # beta=0: overwrite this band (the lower part stays zero)
            self._sample[start:stop, start:].addmm_(x[:, start:stop].t(), x[:, start:], beta=0)
        self.total.add_(self._sample)
        self.tokens += x.shape[0]

    def reduce(self, ctx: object) -> None:
        """Sum over the run's processes (`BlockContext.reduce` and `group.total`)."""
        ctx.reduce(self.total)  # type: ignore[attr-defined]
        self.tokens = int(ctx.group.total(self.tokens))  # type: ignore[attr-defined]
        self._sample = None

    def mean(self) -> torch.Tensor:
        """The symmetric mean XᵀX / tokens, float32."""
        upper = torch.triu(self.total)
        return ((upper + torch.triu(self.total, 1).t()) / self.tokens).to(torch.float32)
