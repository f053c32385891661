"""Calibration statistics, streamed over the samples while the dense block runs once:
the fp32 Hessian H = XXᵀ/n (its upper triangle accumulated, see `gram`) (mean over calibration tokens) and the input-channel RMS norms
‖x_j‖ = sqrt(H_jj). Linears that read the same tensor (q/k/v, gate/up) share one accumulator.
Only what later passes require is computed."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from d2compiler.passmanager import Pass, PassParams, PassResult, register_pass

from .gram import add_gram, finish_gram


class CalibrateParams(PassParams):
    """`calibrate` records statistics for every layer a later pass targets."""

    hessian: bool = Field(
        default=True,
        description="Accumulate the full Hessian XXᵀ even when no later pass requires it, so every "
        "pruning pass can report its reconstruction error. `false` keeps only the activation norms "
        "(faster for Wanda/magnitude); passes that require the Hessian still get it.",
    )


class _Accumulator:
    def __init__(self, want_hessian: bool):
        self.want_hessian = want_hessian
        self.tokens = 0
        self.hessian: torch.Tensor | None = None
        self.sq: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.tokens += x.shape[0]
        if self.want_hessian:
            self.hessian = add_gram(self.hessian, x)
        else:
            sq = x.pow(2).sum(0)
            self.sq = sq if self.sq is None else self.sq.add_(sq)

    def reduce(self, ctx: Any) -> None:
        """Sum the raw accumulators and the token count over the run's processes."""
        for acc in (self.hessian, self.sq):
            if acc is not None:
                ctx.reduce(acc)
        if ctx.group.size > 1:
            self.tokens = int(ctx.group.total(self.tokens))

    def finish(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        if self.hessian is not None:
            h = finish_gram(self.hessian, self.tokens)
            return h, torch.sqrt(torch.diag(h))
        assert self.sq is not None
        return None, torch.sqrt(self.sq / self.tokens)


@register_pass
class CalibratePass(Pass):
    name = "calibrate"
    Params = CalibrateParams
    provides = frozenset({"hessian", "act_norms"})
    observes = True
    summary = "Record fp32 Hessians and activation norms of the targeted linears."

    def __init__(self, params: PassParams):
        super().__init__(params)
        self._handles: list[Any] = []
        self._accs: dict[str, tuple[_Accumulator, list[str]]] = {}

    def begin_observe(self, ctx: Any) -> None:
        want_hessian = "hessian" in ctx.needed or self.params.hessian
        for group in ctx.observed_groups():
            acc = _Accumulator(want_hessian)
            first = group[0]
            self._accs[first.name] = (acc, [layer.name for layer in group])
            self._handles.append(first.module.register_forward_hook(lambda _m, inp, _o, acc=acc: acc.add(inp[0])))

    def end_observe(self, ctx: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for acc, names in self._accs.values():
            acc.reduce(ctx)
            if acc.tokens == 0:
                continue
            hessian, norms = acc.finish()
            for name in names:
                if hessian is not None:
                    ctx.publish("hessian", name, hessian)
                ctx.publish("act_norms", name, norms)
        self._accs.clear()

    def apply(self, ctx: Any) -> PassResult:
        return PassResult(modified=False)
