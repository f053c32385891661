"""Layer-wise sparsity allocation: block sparsities from a score, mapped into [S−λ, S+λ], and exact
per-layer prune counts. Pure functions, shared by `sparsity_allocation` and its tests."""

from __future__ import annotations

import math


def owl_block_sparsities(outlier_ratios: list[float], sparsity: float, lmbda: float) -> list[float]:
    """OWL (Yin et al. 2024, as llm-compressor computes it): the outlier ratios are min-max scaled to
    [0, 2λ], centred on the density 1−S, and turned into sparsities: the block with the most outliers
    gets the lowest sparsity, S−λ at the extreme. Equal ratios give S everywhere."""
    return _spread(outlier_ratios, sparsity, lmbda)


def error_block_sparsities(errors: list[float], sparsity: float, lmbda: float) -> list[float]:
    """The `error` profile: the log of each block's relative output error under a trial pruning at S
    is min-max scaled to [0, 2λ] and centred like OWL, so the block whose output suffers most gets
    the lowest sparsity. The log keeps one outlier block from flattening all the others."""
    return _spread([math.log(max(e, 1e-30)) for e in errors], sparsity, lmbda)


def expert_sparsities(tokens: list[int], sparsity: float, lmbda: float) -> list[float]:
    """The `expert_lmbda` rule (ours): the experts of one role in one block, given the tokens routed
    to each, get sparsities in [s−λ, s+λ] around their block's s, spread like OWL's: the most used
    expert the lowest, the least used the highest (an expert a token rarely reaches adds little to
    the block's output). Equal counts give s everywhere."""
    return _spread([float(t) for t in tokens], sparsity, lmbda)


def _spread(scores: list[float], sparsity: float, lmbda: float) -> list[float]:
    """Sparsities S − (scaled score − mean scaled score), the scaled scores in [0, 2λ], clipped to
    [S−λ, S+λ] (the OWL paper's stated range; its code's mean-centring can leave it when the scores
    are skewed). `exact_counts` then restores the global total within those bounds."""
    low, high = min(scores), max(scores)
    if high - low <= 0:
        return [sparsity] * len(scores)
    scaled = [(s - low) / (high - low) * 2 * lmbda for s in scores]
    mean = sum(scaled) / len(scaled)
    return [min(max(sparsity - (s - mean), sparsity - lmbda), sparsity + lmbda) for s in scaled]


def exact_counts(sizes: list[int], sparsities: list[float], target: float, low: float, high: float) -> list[int]:
    """Per-layer prune counts close to `sparsities[l] * sizes[l]` that sum to exactly
    round(target · Σ sizes), each within [floor(low · n), ceil(high · n)] of its layer (so within one
    weight of the bounds). A common shift δ (found by bisection) makes the clipped fractions sum to
    the total, and the remainder is placed by largest fraction."""
    total = int(round(target * sum(sizes)))
    lo = [math.floor(low * n) for n in sizes]
    hi = [min(math.ceil(high * n), n) for n in sizes]
    if not sum(lo) <= total <= sum(hi):
        raise ValueError(f"cannot prune {total} of {sum(sizes)} weights with every layer in [{low:.4f}, {high:.4f}]")

    def wanted(delta: float) -> list[float]:
        return [min(max((s + delta) * n, a), b) for s, n, a, b in zip(sparsities, sizes, lo, hi)]

    left, right = -2.0, 2.0
    for _ in range(100):
        mid = (left + right) / 2
        if sum(wanted(mid)) < total:
            left = mid
        else:
            right = mid
    raw = wanted(right)
    counts = [min(max(math.floor(r), a), b) for r, a, b in zip(raw, lo, hi)]
    missing = total - sum(counts)
    order = sorted(range(len(sizes)), key=lambda i: (-(raw[i] - counts[i]), i))
    while missing:
        step = 1 if missing > 0 else -1
        movable = [i for i in (order if step > 0 else reversed(order)) if lo[i] <= counts[i] + step <= hi[i]]
        for i in movable[: abs(missing)]:
            counts[i] += step
            missing -= step
    return counts
