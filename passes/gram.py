"""Gram matrices XᵀX of layer inputs, accumulated over calibration samples in float32.

XᵀX is symmetric, so only its upper block triangle is computed (`add_gram`): the columns are cut into
up to 8 bands and band i is multiplied with bands i.. only, about 5/8 of the full product's work;
`finish_gram` mirrors it. For SmolLM2's shapes this takes the statistics of a block from about 0.7x
to 0.4x the cost of its forward pass (`bench/cost.py` reports the observe/forward ratio)."""

from __future__ import annotations

import torch

MAX_BANDS = 8
BAND_WIDTH = 192  # narrower bands lose more to small matrix products than the triangle saves


def add_gram(gram: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """`gram` (or a new zero matrix) plus the upper block triangle of xᵀx, for x of shape (..., d) cast
    to float32. Entries below the diagonal bands are left as they were: read the result through
    `finish_gram`."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    d = x.shape[1]
    if gram is None:
        gram = x.new_zeros(d, d)
    bands = min(MAX_BANDS, max(1, d // BAND_WIDTH))
    edges = [round(i * d / bands) for i in range(bands + 1)]
    for start, stop in zip(edges, edges[1:]):
        gram[start:stop, start:].addmm_(x[:, start:stop].t(), x[:, start:])
    return gram


def finish_gram(gram: torch.Tensor, tokens: int) -> torch.Tensor:
    """The symmetric mean Gram matrix XᵀX / tokens from `add_gram`'s upper triangle."""
    upper = torch.triu(gram)
    return (upper + torch.triu(gram, 1).t()) / tokens
