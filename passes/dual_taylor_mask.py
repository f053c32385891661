"""`dual_taylor_mask`: D²Prune's dual-Taylor saliency (method.md §4-6). Layers that receive the OBS
update are pruned with the D²-SparseGPT score and SparseGPT's blocked OBS; layers an
`attention_kl_update` plan leaves un-updated get the D²-Wanda score and a mask only. Its activation
statistics are recorded in the same dense forward as `calibrate` (no extra forward pass)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from pydantic import Field

from d2compiler.contract import register_pass

from .admm import probe_admm
from .dual_taylor import DualTaylorSettings, LayerStats, obs_extra_score, prune_layer
from .obs import ObsResult
from .obs_batch import ObsProblem
from .pruning import PlannedPruningPass
from .sparsegpt import SparseGPTParams


class DualTaylorParams(SparseGPTParams):
    lambda1: float = Field(default=1.0, ge=0.0, le=1e6, description="Weight λ1 of the first-order activation term ȳ_i·|W_ij|·x̄_j (paper default 1).")
    lambda2: float = Field(default=0.0, ge=0.0, le=1e6, description="Weight λ2 of the second-order term W_ij²·x̄_j², subtracted as in the reference code (paper default 0).")
    s: float = Field(default=1500.0, gt=0.0, le=1e9, description="Activation scale factor s (paper default 1500); the activation terms scale as 1/s².")
    stats: Literal["mean", "reference"] = Field(
        default="mean",
        description="`mean`: per-token RMS statistics with the reference constants at N=128 divided out, so λ1, λ2 "
        "and s mean the same for any sample count and sequence length. `reference`: the reference code's "
        "running-sum accumulation, reproduced exactly (its effective scale grows with N).",
    )
    solver: Literal["obs", "admm"] = Field(
        default="obs",
        description="How updated layers choose their support and weights. `obs`: SparseGPT's blocked OBS sweep with the "
        "dual-Taylor saliency (D²-SparseGPT, the paper). `admm`: the ALPS-class ADMM of the `admm` pass, each "
        "projection keeping the highest dual-Taylor saliency z² + activation terms instead of the largest |z| "
        "(D²-ADMM), then `refit_steps` of masked least squares.",
    )
    rho: float = Field(default=0.1, gt=0.0, le=1e6, description="`solver = admm`: the penalty's starting value (see the `admm` pass).")
    max_iterations: int = Field(default=300, ge=1, le=100000, description="`solver = admm`: at most this many ADMM iterations per layer.")


@register_pass
class DualTaylorMaskPass(PlannedPruningPass):
    name = "dual_taylor_mask"
    Params = DualTaylorParams
    requires = frozenset({"hessian", "act_norms"})
    provides = frozenset({"mask", "d2_stats"})
    observes = True
    summary = "D²Prune dual-Taylor mask: D²-SparseGPT (OBS update) or D²-Wanda (mask only) per layer."

    def __init__(self, params: Any):
        super().__init__(params)
        self._handles: list[Any] = []
        self._stats: dict[str, LayerStats] = {}

    @property
    def settings(self) -> DualTaylorSettings:
        p: DualTaylorParams = self.params  # type: ignore[assignment]
        return DualTaylorSettings(p.lambda1, p.lambda2, p.s, p.stats, p.target_sparsity, p.n_of_m, p.block_size, p.dampening_frac,
                                  p.refit_steps, p.solver, p.rho, p.max_iterations)

    def begin_observe(self, ctx: Any) -> None:
        for layer in ctx.observed(ctx.select(self.params)):
            out_f, in_f = layer.shape
            stats = self._stats[layer.name] = LayerStats(out_f, in_f, self.params.s, reference=self.params.stats == "reference")
            self._handles.append(layer.module.register_forward_hook(
                lambda _m, inp, out, st=stats, la=layer: st.add(inp[0], la.output_of(out))))

    def end_observe(self, ctx: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, stats in self._stats.items():
            stats.reduce(ctx)
            ctx.publish("d2_stats", name, stats)
        self._stats = {}

    def probe_solve(self, weight: torch.Tensor, hessian: torch.Tensor) -> None:
        """One solve with this recipe's solver (`d2c plan` costs the pass from it)."""
        if self.params.solver != "admm":
            return super().probe_solve(weight, hessian)
        return probe_admm(weight, hessian, self.params)

    def obs_problem(self, ctx: Any, layer: Any) -> ObsProblem | None:
        if self.params.solver != "obs":  # ADMM solves one layer at a time
            return None
        cfg = dataclasses.replace(self.settings, sparsity=self.sparsity_of(ctx, layer))
        extra = obs_extra_score(ctx.artifact("d2_stats", layer.name), ctx.artifact("act_norms", layer.name), cfg)
        return ObsProblem(layer.name, cfg.sparsity, cfg.n_of_m, cfg.block_size, cfg.damping, extra, cfg.refit_steps)

    def solved_info(self, res: ObsResult) -> dict[str, Any]:
        return {"update": True, "score": "d2-sparsegpt", **res.metrics()}

    def compute_variant(self, ctx: Any, layer: Any, weight: torch.Tensor, hessian: torch.Tensor,
                        update: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        new_weight, keep, res = prune_layer(weight, hessian, ctx.artifact("d2_stats", layer.name), ctx.artifact("act_norms", layer.name),
                                       dataclasses.replace(self.settings, sparsity=self.sparsity_of(ctx, layer)),
                                       update=update, layer=layer.name)
        metrics = res.metrics() if res is not None else {}
        score = ("d2-admm" if self.params.solver == "admm" else "d2-sparsegpt") if update else "d2-wanda"
        return new_weight, keep, {"update": update, "score": score, **metrics}
