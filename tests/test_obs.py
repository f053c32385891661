"""Numerics of the shared mask helpers and of blocked OBS, on synthetic data."""

from __future__ import annotations

import torch

from passes.masks import lowest_n_of_m, lowest_per_row, split_count
from passes.obs import obs_prune
from passes.pruning import relative_error


def synthetic(rows=48, cols=96, tokens=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5
    x = torch.randn(tokens, cols, generator=gen) @ (torch.eye(cols) + mix)  # correlated inputs
    x[:, :8] *= 10  # a few outlier channels
    w = torch.randn(rows, cols, generator=gen)
    return w, x.t() @ x / tokens


def test_split_count_is_exact():
    assert split_count(10, [3, 3, 3]) == [4, 3, 3]
    assert sum(split_count(199066, [128] * 4 + [64])) == 199066


def test_masks():
    score = torch.arange(16.0).flip(0).view(2, 8)
    prune = lowest_n_of_m(score, 2, 4)
    assert prune.sum() == 8 and torch.all(prune.view(2, 2, 4).sum(-1) == 2)
    per_row = lowest_per_row(score, [3, 5])
    assert per_row.sum(1).tolist() == [3, 5]


def test_obs_exact_and_better_than_magnitude():
    w, h = synthetic()
    res = obs_prune(w, h, sparsity=0.6, n_of_m=None, block_size=32, damping=0.01, layer="t")
    assert int((~res.keep).sum()) == round(0.6 * w.numel())
    assert torch.all(res.weight[~res.keep] == 0)
    flat = w.abs().flatten()
    mag = w.clone()
    mag.view(-1)[torch.argsort(flat)[: round(0.6 * w.numel())]] = 0
    assert relative_error(w, res.weight, h) < 0.5 * relative_error(w, mag, h)


def test_obs_n_of_m_and_dead_inputs():
    w, h = synthetic()
    h[5, :] = 0
    h[:, 5] = 0
    res = obs_prune(w, h, sparsity=0.5, n_of_m=(2, 4), block_size=32, damping=0.01, layer="t")
    assert torch.all((res.weight == 0).view(w.shape[0], -1, 4).sum(-1) >= 2)
    assert torch.all((~res.keep).view(w.shape[0], -1, 4).sum(-1) == 2)
    assert torch.all(res.weight[:, 5] == 0)
    assert torch.isfinite(res.weight).all()


def test_obs_escalates_damping_on_indefinite_hessian(caplog):
    w, h = synthetic(cols=32)
    h = h - 2 * torch.eye(32) * h.diag().max()  # strongly indefinite
    h.fill_diagonal_(1.0)
    res = obs_prune(w[:, :32], h, sparsity=0.5, n_of_m=None, block_size=16, damping=0.01, layer="layer.x")
    assert res.damping > 0.01
    assert "layer.x" in caplog.text
