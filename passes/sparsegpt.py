"""SparseGPT: blocked OBS pruning with lazy column updates (Frantar & Alistarh 2023)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from d2compiler.contract import register_pass

from .obs import obs_prune
from .obs_batch import ObsProblem
from .pruning import DampedParams, PlannedPruningPass


class SparseGPTParams(DampedParams):
    block_size: int = Field(default=128, ge=1, le=65536, description="Columns per lazy-update block.")
    refit_steps: int = Field(
        default=0, ge=0, le=1000,
        description="After the OBS sweep, refit the kept weights of every updated layer towards the exact masked "
        "least-squares optimum (min ‖X(W′−W)ᵀ‖² with the mask fixed) by at most this many conjugate-gradient steps "
        "(it stops early once converged; 20 is plenty). 0: SparseGPT's update exactly as published. The refit never raises a layer's error.",
    )



@register_pass
class SparseGPTPass(PlannedPruningPass):
    name = "sparsegpt"
    Params = SparseGPTParams
    requires = frozenset({"hessian"})
    summary = ("Blocked OBS pruning with weight reconstruction (Frantar & Alistarh 2023); where an update plan says "
               "no update, the same mask without the reconstruction.")

    def obs_problem(self, ctx: Any, layer: Any) -> ObsProblem:
        p: SparseGPTParams = self.params  # type: ignore[assignment]
        return ObsProblem(layer.name, self.sparsity_of(ctx, layer), p.n_of_m, p.block_size, p.dampening_frac,
                          refit_steps=p.refit_steps)

    def compute_variant(self, ctx: Any, layer: Any, weight: torch.Tensor, hessian: torch.Tensor,
                        update: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        p: SparseGPTParams = self.params  # type: ignore[assignment]
        res = obs_prune(weight, hessian, sparsity=self.sparsity_of(ctx, layer), n_of_m=p.n_of_m, block_size=p.block_size,
                        damping=p.dampening_frac, layer=layer.name, refit_steps=p.refit_steps if update else 0)
        pruned = res.weight if update else weight.masked_fill(~res.keep, 0.0)
        return pruned, res.keep, res.metrics()
