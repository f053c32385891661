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


def test_refit_off_is_sparsegpt_exactly():
    w, h = synthetic()
    base = obs_prune(w, h, sparsity=0.5, n_of_m=None, block_size=32, damping=0.01, layer="t")
    off = obs_prune(w, h, sparsity=0.5, n_of_m=None, block_size=32, damping=0.01, layer="t", refit_steps=0)
    assert torch.equal(base.weight, off.weight) and off.refit_ratio is None


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
