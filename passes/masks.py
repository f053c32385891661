"""Mask selection helpers shared by the pruning passes. A mask is a bool tensor shaped like the
(out, in) weight, True where the weight is kept. Counts are exact: an unstructured mask prunes
exactly round(p * numel) entries, split across comparison groups by largest remainder."""

from __future__ import annotations

import math

import torch


def split_count(total: int, sizes: list[int]) -> list[int]:
    """Split `total` over groups proportionally to `sizes`, by largest remainder, so the parts
    sum to `total` exactly."""
    whole = sum(sizes)
    if whole == 0:
        return [0] * len(sizes)
    raw = [total * s / whole for s in sizes]
    parts = [int(r) for r in raw]
    order = sorted(range(len(sizes)), key=lambda i: (-(raw[i] - parts[i]), i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def prune_count(numel: int, sparsity: float) -> int:
    """How many of `numel` entries an unstructured mask at `sparsity` prunes."""
    return int(round(sparsity * numel))


SAMPLE_STRIDE = 31  # `kth_smallest` brackets the k-th value with every 31st entry (prime: no row-length alignment)


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of a 1-D tensor, exactly `torch.kthvalue(flat, k)`. For large
    tensors it first brackets it between two quantiles of a strided sample (six standard errors
    around k / n), counts the entries below the bracket, and selects within the bracket when that
    count shows the k-th lies inside it (typically a few % of the entries); otherwise from all."""
    n = flat.numel()
    if n >= 64 * SAMPLE_STRIDE:
        sample = flat[::SAMPLE_STRIDE]
        m, q = sample.numel(), k / n
        margin = 6 * math.sqrt(q * (1 - q) / m) + 2 / m
        low = torch.kthvalue(sample, max(1, math.floor((q - margin) * m))).values
        high = torch.kthvalue(sample, min(m, math.ceil((q + margin) * m))).values
        below = int((flat < low).sum())
        band = flat[(flat >= low) & (flat <= high)]
        if 0 < k - below <= band.numel():
            return torch.kthvalue(band, k - below).values
    return torch.kthvalue(flat, k).values


def lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Prune mask (True = pruned) of the k lowest scores over the whole tensor (ties: first), the
    first k of a stable ascending sort, found without sorting: every score below the k-th smallest,
    then the first of those equal to it (in flattened order) until k are taken."""
    flat = score.flatten()
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(score, dtype=torch.bool)
    kth = kth_smallest(flat, k)
    at_most = flat <= kth
    if int(at_most.sum()) == k:  # the usual case: every score equal to the k-th is taken
        return at_most.view_as(score)
    below = flat < kth
    tied = at_most & ~below
    prune = below | (tied & (torch.cumsum(tied, 0) <= k - below.sum()))
    return prune.view_as(score)


def lowest_per_row(score: torch.Tensor, counts: list[int] | torch.Tensor) -> torch.Tensor:
    """Prune mask of the `counts[r]` lowest scores of each row r."""
    counts_t = torch.as_tensor(counts, device=score.device).view(-1, 1)
    order = torch.argsort(score, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order))
    return ranks < counts_t


PAIRWISE_MAX_M = 8  # up to this group size the n lowest are found by pairwise comparisons, not a sort


def lowest_n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune mask of the n lowest scores in every group of m consecutive inputs of each row: the first
    n of a stable ascending sort of the group (ties: the earlier input is pruned)."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"in_features={cols} is not a multiple of M={m}")
    grouped = score.reshape(rows, cols // m, m)
    if m <= PAIRWISE_MAX_M:
        return _sort_positions(grouped).lt(n).reshape(rows, cols)
    idx = torch.argsort(grouped, dim=2, stable=True)[..., :n]
    prune = torch.zeros_like(grouped, dtype=torch.bool)
    prune.scatter_(2, idx, True)
    return prune.reshape(rows, cols)


def _sort_positions(grouped: torch.Tensor) -> torch.Tensor:
    """Each entry's position in a stable ascending sort of its group (the last dimension), from the
    m(m − 1)/2 pairwise comparisons: several times faster than a sort for small m, and the same order
    (entry i comes after j where s_j < s_i, or s_j = s_i and j < i; NaN sorts last, as in torch.sort)."""
    m = grouped.shape[-1]
    entries = grouped.unbind(-1)
    nan = [e.isnan() for e in entries]
    positions = [torch.zeros(grouped.shape[:-1], dtype=torch.uint8, device=grouped.device) for _ in range(m)]
    for b in range(1, m):
        for a in range(b):
            a_first = (entries[a] <= entries[b]) | nan[b]
            positions[b] += a_first
            positions[a] += ~a_first
    return torch.stack(positions, -1)


def row_counts(rows: int, cols: int, sparsity: float) -> list[int]:
    """Per-row prune counts for a row-wise comparison group, summing to round(p * rows * cols)."""
    return split_count(prune_count(rows * cols, sparsity), [cols] * rows)
