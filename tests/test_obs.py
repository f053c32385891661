"""Numerics of the shared mask helpers and of blocked OBS, on synthetic data."""

from __future__ import annotations

import torch

from passes.masks import kth_smallest, lowest_k, lowest_n_of_m, lowest_per_row, split_count
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


def test_n_of_m_is_the_stable_sort_with_ties_and_nan():
    """The pairwise selection of small groups prunes exactly the first n of a stable ascending sort
    (ties: the earlier input; NaN last), as the sort it replaced, and large groups still sort."""
    gen = torch.Generator().manual_seed(0)
    for n, m in ((2, 4), (1, 4), (4, 8), (3, 8), (1, 2), (8, 16)):
        score = torch.randint(0, 4, (30, 16 * m), generator=gen).float()  # many ties
        score[torch.rand(score.shape, generator=gen) < 0.1] = float("nan")
        order = torch.argsort(score.view(30, 16, m), dim=2, stable=True)[..., :n]
        want = torch.zeros(30, 16, m, dtype=torch.bool).scatter_(2, order, True).view(30, 16 * m)
        assert torch.equal(lowest_n_of_m(score, n, m), want), (n, m)


def test_lowest_k_is_the_stable_sort():
    """The k lowest over a whole tensor are the first k of a stable ascending sort, with ties at the
    k-th value split by position (cumulative count) or all taken (the quick path)."""
    gen = torch.Generator().manual_seed(0)
    for name, score in {"spread": torch.randn(60, 70, generator=gen),
                        "ties": torch.randint(0, 6, (60, 70), generator=gen).float()}.items():
        for k in (1, 5, 700, 2100, 2101, 4199):
            want = torch.zeros(score.numel(), dtype=torch.bool)
            want[torch.argsort(score.flatten(), stable=True)[:k]] = True
            got = lowest_k(score, k)
            assert got.sum() == k and torch.equal(got.flatten(), want), (name, k)


def test_kth_smallest_is_kthvalue():
    """The bracketed selection returns exactly torch.kthvalue's value, for spread, tied, skewed and
    sorted data and for ks at both ends (where the bracket misses and it falls back)."""
    gen = torch.Generator().manual_seed(0)
    data = {"normal": torch.randn(50000, generator=gen), "ties": torch.randint(0, 5, (40000,), generator=gen).float(),
            "skewed": torch.rand(30000, generator=gen).pow(8), "sorted": torch.arange(20000.0)}
    for name, flat in data.items():
        for k in (1, 2, 17, flat.numel() // 3, flat.numel() // 2, flat.numel() - 1, flat.numel()):
            assert kth_smallest(flat, k) == torch.kthvalue(flat, k).values, (name, k)


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


def test_batched_obs_equals_one_by_one(caplog):
    """Experts solved together (`obs_batch`, issue 28) get exactly `obs_prune`'s weights and masks:
    each its own sparsity, saliency term, refit, dead inputs, and a Hessian whose factorisation
    fails retried alone with more damping."""
    from passes.obs import _FACTORS
    from passes.obs_batch import ObsProblem, obs_prune_many

    problems, weights, hessians = [], [], []
    for seed in range(5):
        w, h = synthetic(rows=24, cols=64, tokens=256, seed=seed)
        if seed == 1:
            h[7, :] = 0
            h[:, 7] = 0  # a dead input
        if seed == 3:
            h = h - 2 * torch.eye(64) * h.diag().max()  # indefinite: the batched factorisation fails for it alone
            h.fill_diagonal_(1.0)
        weights.append(w)
        hessians.append(h)
        extra = (lambda wb, cols: 0.1 * wb.abs()) if seed % 2 else None
        problems.append(ObsProblem(f"expert.{seed}", 0.4 + 0.05 * seed, None, 16, 0.01, extra, refit_steps=3 if seed == 2 else 0))
    for nm in (None, (2, 4)):
        for p in problems:
            p.n_of_m = nm
        _FACTORS.clear()
        batched = obs_prune_many(weights, hessians, problems)
        _FACTORS.clear()
        for w, h, p, got in zip(weights, hessians, problems, batched):
            alone = obs_prune(w, h, sparsity=p.sparsity, n_of_m=p.n_of_m, block_size=p.block_size, damping=p.damping,
                              layer=p.layer, extra_score=p.extra_score, refit_steps=p.refit_steps)
            assert torch.equal(got.keep, alone.keep) and torch.equal(got.weight, alone.weight), (p.layer, nm)
            assert got.damping == alone.damping and got.refit_ratio == alone.refit_ratio
    assert batched[3].damping > 0.01 and "expert.3" in caplog.text
    assert torch.all(batched[1].weight[:, 7] == 0)
