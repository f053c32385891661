"""Blocked OBS over many layers of one shape at once: the experts of a Mixture-of-Experts layer.

A layer with E experts has E × 3 OBS problems of a few shapes. Solved one by one, each is a Python
loop over its columns whose tensor operations are small (an expert of a 128-expert model sees ~6%
of the tokens and has a narrow intermediate width), so the interpreter, not the arithmetic, sets
the pace. Here the problems of one shape are stacked: the damped Hessians are factorised in batched
calls (`torch.linalg.cholesky_ex` / `cholesky_inverse`, each matrix on one thread as in `obs`, the
matrices spread over the CPU's threads), and one column sweep
updates every expert's weights with batched operations. Each problem keeps its own sparsity,
saliency term and mask; the masks are chosen per problem with the same helpers as `obs_prune`, so
the result is that of `obs_prune` on each (up to the rounding of a batched matrix product).

A batch holds at most `BATCH_BYTES` of solve buffers; a factorisation that fails (not positive
definite) is retried alone with the growing damping of `obs._factor`, with its warning."""

from __future__ import annotations

import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from d2compiler.contract import PassError

from .masks import lowest_k, lowest_n_of_m, prune_count, split_count
from .obs import _FACTORS, ExtraScore, ObsResult, _factor, _one_thread, damped_hessian, obs_prune
from .refit import refit_kept

BATCH_BYTES = 1 << 31  # solve buffers of one batch: the inverse-Hessian factors and the weights


@dataclass
class ObsProblem:
    """One layer's OBS problem: what `obs_prune` takes besides the weight and the Hessian."""

    layer: str
    sparsity: float
    n_of_m: tuple[int, int] | None
    block_size: int
    damping: float
    extra_score: ExtraScore | None = None
    refit_steps: int = 0


def obs_prune_many(weights: list[torch.Tensor], hessians: list[torch.Tensor], problems: list[ObsProblem]) -> list[ObsResult]:
    """`obs_prune` of every (weight, Hessian, problem), in order; problems whose weights share a shape
    and block size are solved in batches (see the module docstring)."""
    results: list[ObsResult | None] = [None] * len(weights)
    kinds: dict[tuple, list[int]] = {}
    for i, (w, p) in enumerate(zip(weights, problems)):
        kinds.setdefault((tuple(w.shape), p.block_size, p.n_of_m, p.damping), []).append(i)
    for (shape, *_same), members in kinds.items():
        rows, cols = shape
        per = 4 * cols * cols + 8 * rows * cols
        size = max(1, BATCH_BYTES // per)
        for start in range(0, len(members), size):
            batch = members[start : start + size]
            if len(batch) == 1:
                i = batch[0]
                results[i] = _single(weights[i], hessians[i], problems[i])
                continue
            for i, res in zip(batch, _batch([weights[i] for i in batch], [hessians[i] for i in batch], [problems[i] for i in batch])):
                results[i] = res
    return [r for r in results if r is not None]


def _single(weight: torch.Tensor, hessian: torch.Tensor, p: ObsProblem) -> ObsResult:
    return obs_prune(weight, hessian, sparsity=p.sparsity, n_of_m=p.n_of_m, block_size=p.block_size, damping=p.damping,
                     layer=p.layer, extra_score=p.extra_score, refit_steps=p.refit_steps)


def factors(hessians: list[torch.Tensor], damping: float, layers: list[str]) -> list[tuple[torch.Tensor, float, torch.Tensor]]:
    """(U, damping used, dead inputs) of each Hessian, as `obs.inverse_hessian_factor` caches them:
    the ones not cached yet factorised in one batched call (one thread, as there), a failure alone."""
    todo = {id(h): (h, name) for h, name in zip(hessians, layers) if (id(h), damping) not in _FACTORS}
    if todo:
        pending = list(todo.values())
        damped = [damped_hessian(h, damping) for h, _name in pending]
        upper, bad = _factor_stack(torch.stack([h for h, _dead in damped]))
        for k, ((h, name), (_h, dead), broken) in enumerate(zip(pending, damped, bad)):
            _FACTORS[(id(h), damping)] = _factor(h, damping, name) if broken else (upper[k].clone(), damping, dead)
            weakref.finalize(h, _FACTORS.pop, (id(h), damping), None)
    return [_FACTORS[(id(h), damping)] for h in hessians]


def _factor_stack(damped: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
    """(U of each damped Hessian's inverse, whether it failed). Each matrix is factorised on one
    thread, as `obs._factor` does (LAPACK's last bits depend on the thread count); on the CPU the
    matrices are spread over as many Python threads as torch had intra-op threads."""
    def run(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chol, failed = torch.linalg.cholesky_ex(part)
        upper, failed_inverse = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
        return upper, (failed != 0) | (failed_inverse != 0)

    workers = torch.get_num_threads() if damped.device.type == "cpu" else 1
    with _one_thread(damped.device):
        if workers == 1 or len(damped) == 1:
            upper, bad = run(damped)
        else:
            with ThreadPoolExecutor(workers) as pool:
                parts = list(pool.map(run, damped.tensor_split(min(workers, len(damped)))))
            upper, bad = torch.cat([u for u, _b in parts]), torch.cat([b for _u, b in parts])
    return upper, bad.tolist()


def _batch(weights: list[torch.Tensor], hessians: list[torch.Tensor], problems: list[ObsProblem]) -> list[ObsResult]:
    """The problems of one batch (same shape, block size, N:M and damping)."""
    n_of_m, block_size, cols = problems[0].n_of_m, problems[0].block_size, weights[0].shape[1]
    if n_of_m is not None and (block_size % n_of_m[1] or cols % n_of_m[1]):
        raise PassError(f"{problems[0].layer}: in_features={cols} and block_size={block_size} must be multiples of M={n_of_m[1]}")
    found = factors(hessians, problems[0].damping, [p.layer for p in problems])
    w = torch.stack(weights)
    for b, (_u, _used, dead) in enumerate(found):
        w[b].masked_fill_(dead.unsqueeze(0), 0.0)
    upper = torch.stack([u for u, _used, _dead in found])
    prune = _sweep(w, upper, problems)
    w.masked_fill_(prune, 0.0)
    out = []
    for b, p in enumerate(problems):
        used, dead = found[b][1], found[b][2]
        if not p.refit_steps:
            out.append(ObsResult(weight=w[b], keep=~prune[b], damping=used))
            continue
        damped, _dead = damped_hessian(hessians[b], used)
        res = refit_kept(weights[b].masked_fill(dead.unsqueeze(0), 0.0), w[b], ~prune[b], damped, p.refit_steps, p.layer)
        out.append(ObsResult(weight=res.weight, keep=~prune[b], damping=used, refit_ratio=res.error_ratio, refit_steps=res.steps))
    return out


def _sweep(w: torch.Tensor, upper: torch.Tensor, problems: list[ObsProblem]) -> torch.Tensor:
    """The OBS column sweep of `obs.obs_sweep`/`obs_prune` over a batch, in place on w (B, rows, cols);
    returns the prune mask (True = pruned)."""
    _batch_size, rows, cols = w.shape
    block_size = problems[0].block_size
    prune = torch.zeros_like(w, dtype=torch.bool)
    starts = list(range(0, cols, block_size))
    counts = [split_count(prune_count(rows * cols, p.sparsity), [min(block_size, cols - s) for s in starts]) for p in problems]
    for i1 in starts:
        i2 = min(i1 + block_size, cols)
        w1 = w[:, :, i1:i2].clone()
        u1 = upper[:, i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        d = torch.diagonal(u1, dim1=1, dim2=2)  # (B, width)
        for j in range(i2 - i1):
            _choose(w1, d, prune, problems, counts, i1, j)
            col = w1[:, :, j]
            q = torch.where(prune[:, :, i1 + j], torch.zeros_like(col), col)
            e = (col - q) / d[:, j : j + 1]
            w1[:, :, j:] -= e.unsqueeze(2) * u1[:, j, j:].unsqueeze(1)
            w1[:, :, j] = q
            err1[:, :, j] = e
        w[:, :, i1:i2] = w1
        w[:, :, i2:] -= torch.bmm(err1, upper[:, i1:i2, i2:])
    return prune


def _choose(w1: torch.Tensor, d: torch.Tensor, prune: torch.Tensor, problems: list[ObsProblem], counts: list[list[int]],
            i1: int, j: int) -> None:
    """Each problem's mask of the block (unstructured, at its first column) or of the N:M group
    starting at column j, as `obs_prune` chooses it."""
    n_of_m, block_size = problems[0].n_of_m, problems[0].block_size
    if n_of_m is None and j == 0:
        i2 = i1 + w1.shape[2]
        for b, p in enumerate(problems):
            score = w1[b].pow(2) / d[b].pow(2).unsqueeze(0)
            if p.extra_score is not None:
                score = score + p.extra_score(w1[b], slice(i1, i2))
            prune[b, :, i1:i2] = lowest_k(score, counts[b][i1 // block_size])
    elif n_of_m is not None and j % n_of_m[1] == 0:
        m = n_of_m[1]
        sub = w1[:, :, j : j + m]
        score = sub.pow(2) / d[:, j : j + m].pow(2).unsqueeze(1)
        extra = [p.extra_score(sub[b], slice(i1 + j, i1 + j + m)) if p.extra_score is not None else None for b, p in enumerate(problems)]
        if any(x is not None for x in extra):
            score = score + torch.stack([x if x is not None else torch.zeros_like(sub[0]) for x in extra])
        rows = score.shape[1]
        prune[:, :, i1 + j : i1 + j + m] = lowest_n_of_m(score.reshape(-1, m), n_of_m[0], m).reshape(-1, rows, m)
