"""ADMM support selection for one layer, after ALPS (Meng et al., NeurIPS 2024), then the exact
masked least-squares weights.

The layer problem is min_W′ tr((W′ − W) H (W′ − W)ᵀ) with W′ zero off a support of the layer's
size (unstructured: round((1 − p)·numel) entries; N:M: M − N of every M inputs of a row). ALPS
splits it into a smooth part and the support constraint, W′ = D, and runs ADMM with a growing
penalty ρ on the augmented Lagrangian tr((B − W)H(B − W)ᵀ) + ⟨V, B − D⟩ + ρ/2‖B − D‖²:

    B ← (W H − V + ρ D)(H + ρI)⁻¹     (one eigendecomposition of H serves every ρ)
    D ← the projection of B + V/ρ onto the supports (its largest entries)
    V ← V + ρ (B − D)

in coordinates where H has a unit diagonal (W scaled by ‖x_j‖ per input, so the projection ranks
|w_ij|·‖x_j‖). Every `CHECK_EVERY` iterations the support change s (entries that entered or left)
sets the penalty: ρ × 1.3 while s > 10% of the support, × 1.2 while s > 0.5%, × 1.1 while any entry
moves, and the loop stops once the support holds still (or, after `SETTLE_AFTER` iterations, moves
by less than 0.03%). Before ρ has grown, a support that barely moves means ρ is too large for the
support to be found (it freezes the starting one): ρ is cut 5× (and the iterations restart if
anything moved). Then the final
support's weights are refit towards the exact masked least-squares optimum by the preconditioned
conjugate gradients of `refit.refit_kept` (ALPS's PCG step).

Where ours differs from the ALPS reference: the support is counted exactly as our other pruners count
it (`masks.prune_count`, per-layer sparsities from `sparsity_allocation`); damping and dead inputs
follow `obs.damped_hessian`; the PCG uses our Jacobi-preconditioned `refit_kept` (never raising the
error) with `refit_steps` steps; ρ, the iteration cap and the schedule are parameters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .masks import lowest_k, lowest_n_of_m, prune_count
from .obs import damped_hessian
from .refit import refit_kept

CHECK_EVERY = 3  # iterations between penalty updates (one host sync each)
SETTLE_AFTER = 30  # after this many iterations a support change below SETTLED_SHARE ends the loop
SETTLED_SHARE = 3e-4
RHO_CAP = 1e6


@dataclass
class AdmmResult:
    weight: torch.Tensor
    keep: torch.Tensor
    damping: float
    iterations: int  # ADMM iterations run
    final_rho: float
    refit_ratio: float | None = None  # error after the refit / error of the ADMM support's projection

    def metrics(self) -> dict[str, float]:
        out = {"damping": self.damping, "admm_iterations": self.iterations, "admm_final_rho": self.final_rho}
        if self.refit_ratio is not None:
            out["refit_error_ratio"] = self.refit_ratio
        return out


ExtraScore = Callable[[torch.Tensor, slice], torch.Tensor]  # (weights, their input columns) -> a saliency term


def support(values: torch.Tensor, sparsity: float, n_of_m: tuple[int, int] | None,
            rank: Callable[[torch.Tensor], torch.Tensor] = torch.abs) -> torch.Tensor:
    """Keep-mask of the highest `rank(values)` (default |values|): the layer's exact count, or M − N of
    every M inputs."""
    score = rank(values)
    prune = lowest_k(score, prune_count(score.numel(), sparsity)) if n_of_m is None else lowest_n_of_m(score, *n_of_m)
    return ~prune


def admm_prune(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float, n_of_m: tuple[int, int] | None,
               damping: float, layer: str, rho: float = 0.1, max_iterations: int = 300, refit_steps: int = 30,
               update: bool = True, extra_score: ExtraScore | None = None) -> AdmmResult:
    """Prune an (out, in) fp32 weight: ADMM chooses the support (see the module docstring), then the
    kept weights are refit by at most `refit_steps` CG steps. With `update = False` the support is
    the same and the original weights are kept on it (no reconstruction). `extra_score` (as in
    `obs.obs_prune`, a saliency term of the weights in their own coordinates) makes each projection
    keep the highest z² + extra(z / ‖x‖) instead of the largest |z| (z² = W²·H_jj: the loss one weight
    costs alone, in the units of the OBS saliency); D²Prune's activation terms go there."""
    h, dead = damped_hessian(hessian, damping)
    dense = weight.masked_fill(dead.unsqueeze(0), 0.0)
    scale = torch.sqrt(torch.diagonal(h)).clamp_min(1e-8)
    rank: Callable[[torch.Tensor], torch.Tensor] = torch.abs
    if extra_score is not None:
        every = slice(None)
        rank = lambda z: z.pow(2) + extra_score(z / scale, every)  # noqa: E731
    unit = h / scale.unsqueeze(0) / scale.unsqueeze(1)  # H with a unit diagonal
    eigenvalues, vectors = torch.linalg.eigh(unit.double())
    eigenvalues, vectors = eigenvalues.to(h.dtype), vectors.to(h.dtype)
    start = dense * scale  # W in those coordinates
    target = start @ unit

    def solve(rhs: torch.Tensor, penalty: float) -> torch.Tensor:
        return ((rhs @ vectors) / (eigenvalues + penalty)) @ vectors.t()

    keep = support(start, sparsity, n_of_m, rank)
    kept_count = max(int(keep.sum()), 1)
    d = start * keep
    v = torch.zeros_like(start)
    b = start
    previous, grown, iterations = keep, False, 0
    for iterations in range(1, max_iterations + 1):
        b = solve(target - v + rho * d, rho)
        z = b + v / rho
        keep = support(z, sparsity, n_of_m, rank)
        d = z * keep
        v = v + rho * (b - d)
        if iterations % CHECK_EVERY:
            continue
        change = int((keep != previous).sum())
        previous = keep
        if change > 0.1 * kept_count:
            rho, grown = rho * 1.3, True
        elif change > 0.005 * kept_count:
            rho, grown = rho * 1.2, True
        elif change and grown:
            rho *= 1.1
        elif change:  # moving only a little before the penalty grew: start over with a smaller one
            rho /= 5
            b, d, v = start, start * support(start, sparsity, n_of_m, rank), torch.zeros_like(start)
        elif grown:
            break  # the support holds still under a grown penalty: converged
        else:
            rho /= 5
        rho = min(rho, RHO_CAP)
        if iterations >= SETTLE_AFTER and change < SETTLED_SHARE * kept_count:
            break
    keep = support(b, sparsity, n_of_m, rank)
    if not update:
        return AdmmResult(dense.masked_fill(~keep, 0.0), keep, damping, iterations, rho)
    projected = (b * keep) / scale
    if not refit_steps:
        return AdmmResult(projected, keep, damping, iterations, rho)
    res = refit_kept(dense, projected, keep, h, refit_steps, layer)
    return AdmmResult(res.weight, keep, damping, iterations, rho, res.error_ratio)
