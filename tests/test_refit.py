"""The masked least-squares refit (passes/refit.py): it reaches the exact per-row optimum, keeps
the mask, never raises the error, and leaves SparseGPT unchanged when off."""

from __future__ import annotations

import logging

import torch

from passes.obs import damped_hessian, obs_prune
from passes.refit import refit_kept

from .test_obs import synthetic


def reconstruction_error(new: torch.Tensor, dense: torch.Tensor, h: torch.Tensor) -> float:
    delta = (new - dense).double()
    return float(((delta @ h.double()) * delta).sum())


def exact_rows(dense: torch.Tensor, keep: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Row by row: w′_K = H_KK⁻¹ (H w)_K, the closed form the refit approaches."""
    out = torch.zeros_like(dense)
    target = dense.double() @ h.double()
    for i in range(dense.shape[0]):
        k = keep[i].nonzero().squeeze(1)
        out[i, k] = torch.linalg.solve(h.double()[k][:, k], target[i, k]).float()
    return out


def test_refit_reaches_the_masked_optimum_and_keeps_the_mask():
    w, h = synthetic()
    for n_of_m, sparsity in (((2, 4), 0.5), (None, 0.7)):
        obs = obs_prune(w, h, sparsity=sparsity, n_of_m=n_of_m, block_size=32, damping=0.01, layer="t")
        refit = obs_prune(w, h, sparsity=sparsity, n_of_m=n_of_m, block_size=32, damping=0.01, layer="t", refit_steps=60)
        assert torch.equal(refit.keep, obs.keep)
        assert torch.all(refit.weight[~refit.keep] == 0)
        damped, _ = damped_hessian(h, obs.damping)
        e_obs, e_refit = (reconstruction_error(r.weight, w, damped) for r in (obs, refit))
        e_exact = reconstruction_error(exact_rows(w, obs.keep, damped), w, damped)
        assert e_refit < 0.99 * e_obs  # OBS leaves error on the table; the refit takes it
        assert e_refit <= e_exact * 1.001
        assert abs(refit.refit_ratio - e_refit / e_obs) < 1e-3


def plain_sparsegpt(w: torch.Tensor, h: torch.Tensor, sparsity: float, n_of_m: tuple[int, int] | None,
                    damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1) written plainly, independent of passes/obs.py:
    float64, each column's error spread at once over every later column (no lazy blocks), the
    unstructured mask chosen once over the whole matrix by w²/[U_jj]², an N:M group's mask when the
    sweep reaches the group. Returns (weight, keep)."""
    weight, n = w.double().clone(), h.shape[0]
    damped = h.double() + damping * torch.diag(h.double()).mean() * torch.eye(n, dtype=torch.float64)
    upper = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)  # H⁻¹ = UᵀU
    prune = torch.zeros_like(weight, dtype=torch.bool)
    if n_of_m is None:
        score = weight.pow(2) / torch.diag(upper).pow(2)
        prune.view(-1)[torch.argsort(score.flatten())[: round(sparsity * weight.numel())]] = True
    for j in range(n):
        if n_of_m is not None and j % n_of_m[1] == 0:
            group = slice(j, j + n_of_m[1])
            score = weight[:, group].pow(2) / torch.diag(upper)[group].pow(2)
            prune[:, group] = prune[:, group].scatter(1, torch.argsort(score, dim=1)[:, : n_of_m[0]], True)
        error = torch.where(prune[:, j], weight[:, j], torch.zeros_like(weight[:, j])) / upper[j, j]
        weight[:, j:] -= error.unsqueeze(1) * upper[j, j:].unsqueeze(0)
    weight[prune] = 0
    return weight.float(), ~prune


def test_refit_off_is_sparsegpt():
    """With refit_steps = 0 (the default) the pass is SparseGPT: the same mask and weights as the plain
    float64 reference, up to float32 rounding (one block, so that the unstructured mask is chosen over
    the whole matrix as in the reference; 2:4 with lazy blocks of 32, which change no result)."""
    w, h = synthetic()
    for n_of_m, block_size in ((None, w.shape[1]), ((2, 4), 32)):
        ours = obs_prune(w, h, sparsity=0.5, n_of_m=n_of_m, block_size=block_size, damping=0.01, layer="t")
        weight, keep = plain_sparsegpt(w, h, 0.5, n_of_m, 0.01)
        assert ours.refit_ratio is None
        assert (ours.keep != keep).float().mean() <= 0.001, n_of_m  # a near-tie may flip in float32 (none does here)
        same = ours.keep == keep
        assert torch.allclose(ours.weight[same], weight[same], rtol=1e-4, atol=1e-4 * float(w.abs().max())), n_of_m


def test_refit_never_raises_the_error(caplog):
    """A start that is already optimal cannot be improved; a non-finite Hessian falls back, loudly."""
    w, h = synthetic(rows=8, cols=32)
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    damped, _ = damped_hessian(h, 0.01)
    best = exact_rows(w, keep, damped)
    again = refit_kept(w, best, keep, damped, 10, "t")
    assert reconstruction_error(again.weight, w, damped) <= reconstruction_error(best, w, damped) * (1 + 1e-6)
    broken = damped.clone()
    broken[3, 5] = float("nan")
    with caplog.at_level(logging.WARNING):
        res = refit_kept(w, best, keep, broken, 10, "layers.0.q")
    assert torch.equal(res.weight, best * keep) and res.error_ratio == 1.0
    assert "layers.0.q" in caplog.text
