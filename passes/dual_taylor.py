"""Dual-Taylor (D²Prune) numerics shared by `dual_taylor_mask` and `attention_kl_update`:
activation statistics, the two saliency scores, and pruning a layer with or without the OBS update.

Scores (higher = keep), with ȳ_i the output-channel and x̄_j the input-channel statistic:

- updated layers (D²-SparseGPT):  W²/[H⁻¹]_jj + λ1·a·ȳ_i·|W_ij|·x̄_j − λ2·b·W_ij²·x̄_j², then OBS;
- un-updated layers (D²-Wanda):   W²·x̄_j² + λ1·c·ȳ_i·|W_ij|·x̄_j − λ2·c·W_ij²·x̄_j², mask only.

`stats = "mean"`: ȳ and x̄ are per-token RMS values over all calibration tokens and H is the mean
XXᵀ per token, so nothing depends on the sample count N or the sequence length T. The constants
a, b, c are those the reference code's accumulation produces at its published protocol (N = 128),
divided out: a = c_y·c_x̂/(2s²), b = c_x̂²/(2s²), c = c_y·c_x̃/s², with c_y = c_x̃ = (N+1)/2 and
c_x̂ = √2/N·Σ√k. So λ1, λ2 and s keep the meaning of the paper's tables whatever N and T are.

`stats = "reference"`: the running-sum accumulation of the reference code, reproduced step by step
(method.md §5.1): per sample k, every accumulator is multiplied by (k−1)/k and then
ŷ += ‖Y_k[i]‖/s, x̂ += ‖√(2/k)·X_k[j]‖/s, x̃ += ‖X_k[j]‖/s, v += ‖X_k[j]‖²/k; the OBS term uses the
reference Hessian (2/N)ΣXXᵀ = 2T·H.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from d2compiler.contract import ArtifactKind, PassError, register_artifact

from .admm_solver import AdmmResult, admm_prune
from .masks import lowest_n_of_m, lowest_per_row, row_counts
from .obs import ObsResult, obs_prune

REFERENCE_SAMPLES = 128


def reference_constants(n: int = REFERENCE_SAMPLES) -> tuple[float, float, float]:
    """(c_y, c_x̂, c_x̃): what the reference accumulation multiplies constant per-sample norms by."""
    c_y = (n + 1) / 2
    c_xhat = math.sqrt(2) / n * sum(math.sqrt(k) for k in range(1, n + 1))
    return c_y, c_xhat, c_y


@dataclass
class DualTaylorSettings:
    lambda1: float
    lambda2: float
    s: float
    stats: str  # "mean" | "reference"
    sparsity: float
    n_of_m: tuple[int, int] | None
    block_size: int
    damping: float
    refit_steps: int = 0
    solver: str = "obs"  # "obs": SparseGPT's blocked OBS sweep; "admm": ALPS-class ADMM support selection
    rho: float = 0.1  # admm: the penalty's starting value
    max_iterations: int = 300  # admm: the iteration cap


@dataclass
class LayerStats:
    """Per-layer activation statistics, accumulated one calibration sample at a time."""

    out_features: int
    in_features: int
    s: float
    reference: bool = True  # also keep the reference accumulators (needed only for stats = "reference")
    samples: int = 0
    tokens: int = 0
    y_sq: torch.Tensor | None = None  # Σ y_i² over tokens (mean mode), float64
    ref: dict[str, torch.Tensor] = field(default_factory=dict)  # reference accumulators

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add one sample: x (..., T, in) and y (..., T, out) of the layer."""
        x = x.reshape(-1, x.shape[-1]).float()
        y = y.reshape(-1, y.shape[-1]).float()
        self.samples += 1
        self.tokens += x.shape[0]
        k = self.samples
        y2 = y.pow(2).sum(0)
        self.y_sq = y2.double() if self.y_sq is None else self.y_sq.add_(y2)  # float64 across samples (see `gram`)
        if not self.reference:
            return
        a, b = y2.sqrt(), x.pow(2).sum(0).sqrt()  # per-sample L2 norms over tokens
        steps = {
            "y": a / self.s,
            "xhat": (math.sqrt(2 / k) * x).pow(2).sum(0).sqrt() / self.s,
            "xtilde": b / self.s,
            "v": b.pow(2) / k,
        }
        for name, step in steps.items():
            acc = self.ref.get(name)
            self.ref[name] = step.clone() if acc is None else acc * ((k - 1) / k) + step

    def reduce(self, ctx: Any) -> None:
        """Sum the mean-mode accumulators over the run's processes. The reference accumulators weigh
        each sample by its position in one sequence, so they cannot be split (refused)."""
        if ctx.group.size == 1:
            return
        if self.reference:
            raise PassError("dual_taylor_mask: stats = 'reference' accumulates in sample order and cannot be split "
                            "across processes; use stats = 'mean' or one process")
        assert self.y_sq is not None
        ctx.reduce(self.y_sq)
        self.samples, self.tokens = int(ctx.group.total(self.samples)), int(ctx.group.total(self.tokens))

    @property
    def tokens_per_sample(self) -> float:
        return self.tokens / max(self.samples, 1)

    def y_rms(self) -> torch.Tensor:
        assert self.y_sq is not None
        return (self.y_sq / self.tokens).sqrt().to(torch.float32)


def obs_extra_score(stats: LayerStats, x_rms: torch.Tensor, cfg: DualTaylorSettings):
    """The activation terms added to the OBS saliency W²/[H⁻¹]_jj (H per token)."""
    if cfg.stats == "reference":
        y, x = stats.ref["y"], stats.ref["xhat"]
        scale = 1.0 / (2 * stats.tokens_per_sample)  # reference OBS term is 2T times ours
        k1, k2 = cfg.lambda1 * scale, cfg.lambda2 * scale
    else:
        c_y, c_xhat, _ = reference_constants()
        y, x = stats.y_rms(), x_rms
        k1 = cfg.lambda1 * c_y * c_xhat / (2 * cfg.s**2)
        k2 = cfg.lambda2 * c_xhat**2 / (2 * cfg.s**2)

    first = (k1 * y.float()).unsqueeze(1)  # (out, 1)
    x_row = x.float().unsqueeze(0)  # (1, in)
    second = k2 * x_row.pow(2)

    def extra(w: torch.Tensor, cols: slice) -> torch.Tensor:
        score = first.to(w.device) * w.abs() * x_row[:, cols].to(w.device)
        return score - w.pow(2) * second[:, cols].to(w.device) if k2 else score

    return extra


def wanda_score(weight: torch.Tensor, stats: LayerStats, x_rms: torch.Tensor, cfg: DualTaylorSettings) -> torch.Tensor:
    """The D²-Wanda saliency of every weight."""
    dev = weight.device
    if cfg.stats == "reference":
        v, y, xt = stats.ref["v"].to(dev), stats.ref["y"].to(dev), stats.ref["xtilde"].to(dev)
        k1, k2 = cfg.lambda1, cfg.lambda2
    else:
        c_y, _, c_xt = reference_constants()
        y, xt = stats.y_rms().to(dev), x_rms.to(dev)
        v = xt.pow(2)
        k1 = cfg.lambda1 * c_y * c_xt / cfg.s**2
        k2 = cfg.lambda2 * c_xt**2 / cfg.s**2
    return (weight.pow(2) * v.unsqueeze(0) + k1 * y.unsqueeze(1) * weight.abs() * xt.unsqueeze(0)
            - k2 * weight.pow(2) * xt.pow(2).unsqueeze(0))


def prune_layer(weight: torch.Tensor, hessian: torch.Tensor, stats: LayerStats, x_rms: torch.Tensor,
                cfg: DualTaylorSettings, *, update: bool, layer: str
                ) -> tuple[torch.Tensor, torch.Tensor, ObsResult | AdmmResult | None]:
    """Prune one (out, in) fp32 weight: D²-SparseGPT with the OBS update (or D²-ADMM: the dual-Taylor
    score ranking ADMM's projections; the refit, if set), or D²-Wanda without. Returns (new weight,
    keep mask, the solver's result or None)."""
    if update and cfg.solver == "admm":
        res = admm_prune(weight, hessian.to(weight.device), sparsity=cfg.sparsity, n_of_m=cfg.n_of_m, damping=cfg.damping,
                         layer=layer, rho=cfg.rho, max_iterations=cfg.max_iterations, refit_steps=cfg.refit_steps,
                         extra_score=obs_extra_score(stats, x_rms, cfg))
        return res.weight, res.keep, res
    if update:
        res = obs_prune(weight, hessian.to(weight.device), sparsity=cfg.sparsity, n_of_m=cfg.n_of_m,
                        block_size=cfg.block_size, damping=cfg.damping, layer=layer,
                        extra_score=obs_extra_score(stats, x_rms, cfg), refit_steps=cfg.refit_steps)
        return res.weight, res.keep, res
    score = wanda_score(weight, stats, x_rms, cfg)
    if cfg.n_of_m is not None:
        prune = lowest_n_of_m(score, *cfg.n_of_m)
    else:
        prune = lowest_per_row(score, row_counts(*weight.shape, cfg.sparsity))
    return torch.where(prune, torch.zeros_like(weight), weight), ~prune, None


register_artifact(ArtifactKind("d2_stats", "layer", (LayerStats,), "D²Prune's per-layer activation statistics (x̄, ȳ)"))
