"""`admm`: the ALPS-class baseline (Meng et al., NeurIPS 2024). ADMM with a growing penalty chooses
each layer's support on its reconstruction objective, then the kept weights are refit to the
masked least-squares optimum (`admm_solver` has the algorithm and where ours differs)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from d2compiler.contract import register_pass

from .admm_solver import admm_prune
from .pruning import DampedParams, PlannedPruningPass


class AdmmParams(DampedParams):
    rho: float = Field(
        default=0.1, gt=0.0, le=1e6,
        description="The ADMM penalty's starting value, in units of the unit-diagonal Hessian (ALPS's 0.1). It grows "
        "while the support changes (× 1.3 / 1.2 / 1.1) and is cut 5× when the support settles before it grew.",
    )
    max_iterations: int = Field(
        default=300, ge=1, le=100000,
        description="At most this many ADMM iterations per layer (it stops once the support holds still; ALPS: 300).",
    )
    refit_steps: int = Field(
        default=30, ge=0, le=1000,
        description="Conjugate-gradient steps that refit the kept weights to the masked least-squares optimum once "
        "the support is chosen (stops early once converged). 0: the ADMM iterate projected onto its support.",
    )


def probe_admm(weight: torch.Tensor, hessian: torch.Tensor, p: Any) -> None:
    """One ADMM solve at 50% with the `dampening_frac`, `rho`, `max_iterations` and `refit_steps` of
    the params `p` (of `admm`, or of `dual_taylor_mask` with its ADMM solver): the probe `d2c plan` times."""
    admm_prune(weight, hessian, sparsity=0.5, n_of_m=None, damping=p.dampening_frac, layer="probe", rho=p.rho,
               max_iterations=p.max_iterations, refit_steps=p.refit_steps)


@register_pass
class AdmmPass(PlannedPruningPass):
    name = "admm"
    Params = AdmmParams
    requires = frozenset({"hessian"})
    summary = ("ALPS-class pruning: ADMM with a growing penalty chooses the support on the layer's reconstruction "
               "objective, then the kept weights are refit to the masked least-squares optimum; where an update plan "
               "says no update, the same support with the original weights.")

    def probe_solve(self, weight: torch.Tensor, hessian: torch.Tensor) -> None:
        """One ADMM solve with this recipe's settings (`d2c plan` costs it like an OBS sweep's columns)."""
        probe_admm(weight, hessian, self.params)

    def compute_variant(self, ctx: Any, layer: Any, weight: torch.Tensor, hessian: torch.Tensor,
                        update: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        p: AdmmParams = self.params  # type: ignore[assignment]
        res = admm_prune(weight, hessian, sparsity=self.sparsity_of(ctx, layer), n_of_m=p.n_of_m, damping=p.dampening_frac,
                         layer=layer.name, rho=p.rho, max_iterations=p.max_iterations, refit_steps=p.refit_steps,
                         update=update)
        return res.weight, res.keep, res.metrics()
