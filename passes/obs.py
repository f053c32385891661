"""Blocked Optimal Brain Surgeon pruning with lazy column updates (SparseGPT's algorithm), shared
by `sparsegpt` and `dual_taylor_mask`. A caller may add its own term to the OBS saliency."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from d2compiler.contract import PassError

from .masks import lowest_k, lowest_n_of_m, prune_count, split_count
from .refit import refit_kept

log = logging.getLogger(__name__)

# extra_score(W_block, cols) -> tensor added to the OBS saliency W²/[U_jj]² of those columns.
ExtraScore = Callable[[torch.Tensor, slice], torch.Tensor]


@dataclass
class ObsResult:
    weight: torch.Tensor
    keep: torch.Tensor
    damping: float
    refit_ratio: float | None = None  # reconstruction error after / before the refit (None: no refit)
    refit_steps: int = 0  # the refit's CG steps taken

    def metrics(self) -> dict[str, float]:
        """The layer's metrics: the damping used and, when refit, the error ratio after / before."""
        if self.refit_ratio is None:
            return {"damping": self.damping}
        return {"damping": self.damping, "refit_error_ratio": self.refit_ratio, "refit_steps": self.refit_steps}


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, run the body with one intra-op thread (see `inverse_hessian_factor`)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def inverse_hessian_factor(hessian: torch.Tensor, weight: torch.Tensor, damping: float, layer: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of the damped inverse Hessian (H⁻¹ = UᵀU). Dead inputs (zero
    diagonal) get H_jj = 1 and their weight column zeroed, in place. If H is not positive definite
    the damping is multiplied by 10 (up to 5 times) with a warning naming the layer.

    The factorisations run on one CPU thread: LAPACK's results depend on the thread count in their
    last bits, which would make a run with N processes (fewer threads each) differ from a one-process
    run. The factor is computed once per Hessian tensor and damping (q/k/v and gate/up share one
    Hessian) and forgotten when the Hessian is."""
    key = (id(hessian), damping)
    if key not in _FACTORS:
        _FACTORS[key] = _factor(hessian, damping, layer)
        weakref.finalize(hessian, _FACTORS.pop, key, None)
    upper, used, dead = _FACTORS[key]
    weight.masked_fill_(dead.unsqueeze(0), 0.0)  # masked fills: boolean indexing would sync with the host on CUDA
    return upper, used


_FACTORS: dict[tuple[int, float], tuple[torch.Tensor, float, torch.Tensor]] = {}


def _factor(hessian: torch.Tensor, damping: float, layer: str) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(U, the damping used, the dead inputs) for `inverse_hessian_factor`."""
    current = damping
    for attempt in range(6):  # at most two n x n matrices alive at a time (no identity, no sums)
        h, dead = damped_hessian(hessian, current)
        with _one_thread(h.device):
            chol, failed = torch.linalg.cholesky_ex(h)
            del h
            inv = torch.cholesky_inverse(chol)  # garbage when the factorisation failed; then unused
            del chol
            upper, failed_inverse = torch.linalg.cholesky_ex(inv, upper=True)
            del inv
        if not bool(failed | failed_inverse):  # the one host sync: the retry needs the answer
            if attempt:
                log.warning("%s: Hessian not positive definite; damping raised to %g", layer, current)
            return upper, current, dead
        current *= 10.0
    raise PassError(f"{layer}: Hessian is not positive definite even with damping {current / 10:g}")


def damped_hessian(hessian: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(H with its diagonal raised by `damping` × the mean diagonal, the dead inputs): a new
    matrix; dead inputs (zero diagonal) get H_jj = 1 before the damping."""
    dead = torch.diag(hessian) == 0
    diagonal = torch.diag(hessian).masked_fill(dead, 1.0)
    h = hessian.clone()
    h.diagonal().copy_(diagonal + damping * diagonal.mean())
    return h, dead


# project(block_start, j, current block columns, diag of U's block) -> the new column j (fp32).
Project = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor]


def obs_sweep(w: torch.Tensor, upper: torch.Tensor, block_size: int, project: Project) -> None:
    """The OBS column sweep, in place: column by column, `project` replaces the column (pruned,
    quantized, ...) and the error is spread over the later columns through the upper Cholesky
    factor U of H⁻¹ (in-block at once, later blocks lazily, as in SparseGPT and GPTQ)."""
    cols = w.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        u1 = upper[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        d = torch.diag(u1)
        for j in range(i2 - i1):
            col = w1[:, j]
            q = project(i1, j, w1, d)
            e = (col - q) / d[j]
            w1[:, j:] -= e.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            w1[:, j] = q
            err1[:, j] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]


def obs_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float,
    n_of_m: tuple[int, int] | None,
    block_size: int,
    damping: float,
    layer: str,
    extra_score: ExtraScore | None = None,
    refit_steps: int = 0,
) -> ObsResult:
    """Prune an (out, in) fp32 weight with blocked OBS. Returns the updated weight and keep mask.

    Unstructured: in each block of `block_size` columns, the lowest-saliency entries over the whole
    block are pruned; block counts are split so the layer prunes exactly round(p * numel). N:M: at
    every group start, the n lowest of each row's m columns are pruned. Pruning a column spreads its
    error over the later columns through U (in-block at once, later blocks lazily). With
    `refit_steps` > 0 the kept weights are then refit to the masked least-squares optimum
    (`refit.refit_kept`, on the same damped Hessian); with 0 the result is SparseGPT's exactly."""
    w = weight.clone()
    rows, cols = w.shape
    upper, used_damping = inverse_hessian_factor(hessian, w, damping, layer)
    prune = torch.zeros_like(w, dtype=torch.bool)
    starts = list(range(0, cols, block_size))
    if n_of_m is None:
        widths = [min(block_size, cols - s) for s in starts]
        counts = split_count(prune_count(rows * cols, sparsity), widths)
    else:
        n, m = n_of_m
        if block_size % m or cols % m:
            raise PassError(f"{layer}: in_features={cols} and block_size={block_size} must be multiples of M={m}")

    def project(i1: int, j: int, w1: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Choose the block's (or the N:M group's) mask when first reached; prune column j."""
        i2 = i1 + w1.shape[1]
        if j == 0 and n_of_m is None:
            score = w1.pow(2) / d.pow(2).unsqueeze(0)
            if extra_score is not None:
                score = score + extra_score(w1, slice(i1, i2))
            prune[:, i1:i2] = lowest_k(score, counts[i1 // block_size])
        elif n_of_m is not None and j % n_of_m[1] == 0:
            m = n_of_m[1]
            sub = w1[:, j : j + m]
            score = sub.pow(2) / d[j : j + m].pow(2).unsqueeze(0)
            if extra_score is not None:
                score = score + extra_score(sub, slice(i1 + j, i1 + j + m))
            prune[:, i1 + j : i1 + j + m] = lowest_n_of_m(score, n_of_m[0], m)
        col = w1[:, j]
        return torch.where(prune[:, i1 + j], torch.zeros_like(col), col)

    obs_sweep(w, upper, block_size, project)
    w.masked_fill_(prune, 0.0)  # not w[prune] = 0, which syncs with the host on CUDA
    if not refit_steps:
        return ObsResult(weight=w, keep=~prune, damping=used_damping)
    damped, dead = damped_hessian(hessian, used_damping)
    res = refit_kept(weight.masked_fill(dead.unsqueeze(0), 0.0), w, ~prune, damped, refit_steps, layer)
    return ObsResult(weight=res.weight, keep=~prune, damping=used_damping, refit_ratio=res.error_ratio,
                     refit_steps=res.steps)
