"""Calibration statistics, streamed over the samples while the dense block runs once:
the fp32 Hessian H = XXᵀ/n, the mean over calibration tokens (per-sample products summed in float64,
see `gram`), and the input-channel RMS norms
‖x_j‖ = sqrt(H_jj). Linears that read the same tensor (q/k/v, gate/up) share one accumulator.
The Hessian is accumulated by default (`hessian = true`), even for a recipe whose later passes need
only the norms, so that every pruning pass can report its reconstruction error; `hessian = false`
keeps only the norms unless a later pass requires the Hessian. Statistics are recorded only for
the layers some later pass reads (`statistics_read`).

Experts of a Mixture-of-Experts (3-D banks or lists of modules) see only the tokens routed to them, so their statistics are
"routed" ones, and their token counts are reported (`calibration_tokens` per expert layer). An
expert no calibration token reached gets the identity as its Hessian and unit activation norms
(reported as `statistics = "identity: no token reached it"`): its pruning is then by weight
magnitude, and an OBS update changes nothing else."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from d2compiler.contract import Pass, PassParams, PassResult, register_pass

from .gram import Gram


class CalibrateParams(PassParams):
    """`calibrate` records statistics for every layer a later pass targets."""

    hessian: bool = Field(
        default=True,
        description="Accumulate the full Hessian XXᵀ even when no later pass requires it, so every "
        "pruning pass can report its reconstruction error. `false` keeps only the activation norms "
        "(faster for Wanda/magnitude); passes that require the Hessian still get it.",
    )


class _Accumulator:
    """One shared input's statistics: its Gram matrix, or only the squared norms (summed in float64
    per sample, like the Gram: see `gram`)."""

    def __init__(self, want_hessian: bool, width: int, device: torch.device):
        self.width, self.device = width, device
        self.gram = Gram(width, device) if want_hessian else None
        self.tokens = 0
        self.sq = None if want_hessian else torch.zeros(width, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        if self.gram is not None:
            self.gram.add(x)
        else:
            x = x.reshape(-1, x.shape[-1]).to(torch.float32)
            self.tokens += x.shape[0]
            self.sq.add_(x.pow(2).sum(0))

    def reduce(self, ctx: Any) -> None:
        """Sum the raw accumulators and the token count over the run's processes."""
        if self.gram is not None:
            self.gram.reduce(ctx)
            self.tokens = self.gram.tokens
        else:
            ctx.reduce(self.sq)
            self.tokens = int(ctx.group.total(self.tokens))

    def finish(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        if self.tokens == 0:  # an expert no token reached: the identity (see the module docstring)
            eye = torch.eye(self.width, device=self.device) if self.gram is not None else None
            return eye, torch.ones(self.width, device=self.device)
        if self.gram is not None:
            h = self.gram.mean()
            return h, torch.sqrt(torch.diag(h))
        return None, torch.sqrt(self.sq / self.tokens).to(torch.float32)


@register_pass
class CalibratePass(Pass):
    name = "calibrate"
    Params = CalibrateParams
    provides = frozenset({"hessian", "act_norms"})
    observes = True
    reads_only = True
    summary = "Record fp32 Hessians and activation norms of the targeted linears."

    def __init__(self, params: PassParams):
        super().__init__(params)
        self._handles: list[Any] = []
        self._accs: dict[str, tuple[_Accumulator, list[str], bool]] = {}
        self._tokens: dict[str, dict[str, Any]] = {}  # expert layer -> its calibration tokens (the report)
        self._reported: tuple[str, PassResult] | None = None  # (block, the result apply returned for it)

    def statistics_read(self, ctx: Any) -> set[str]:
        """None: it records statistics for others."""
        return set()

    def begin_observe(self, ctx: Any) -> None:
        want_hessian = "hessian" in ctx.needed or self.params.hessian
        for group in ctx.observed_groups():
            first = group[0]
            acc = _Accumulator(want_hessian, first.shape[1], ctx.device)
            self._accs[first.name] = (acc, [layer.name for layer in group], all(layer.routed for layer in group))
            self._handles.append(first.module.register_forward_hook(lambda _m, inp, _o, acc=acc: acc.add(inp[0])))

    def end_observe(self, ctx: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for acc, names, experts in self._accs.values():
            acc.reduce(ctx)
            if acc.tokens == 0 and not experts:
                continue
            if experts:
                report = {"calibration_tokens": acc.tokens}
                if acc.tokens == 0:
                    report["statistics"] = "identity: no token reached it"
                self._report_tokens(ctx, names, report)
            hessian, norms = acc.finish()
            for name in names:
                if hessian is not None:
                    ctx.publish("hessian", name, hessian)
                ctx.publish("act_norms", name, norms)
        self._accs.clear()

    def _report_tokens(self, ctx: Any, names: list[str], report: dict[str, Any]) -> None:
        """Into the next result, or, for an observation after this pass ran on the block (a
        true-sequential stage, a later group of experts), into the result it returned for it."""
        if self._reported is not None and self._reported[0] == ctx.name:
            self._reported[1].layers.update({name: dict(report) for name in names})
        else:
            self._tokens.update({name: dict(report) for name in names})

    def apply(self, ctx: Any) -> PassResult:
        result = PassResult(modified=False)
        result.layers.update(self._tokens)
        self._tokens = {}
        self._reported = (ctx.name, result)
        return result
