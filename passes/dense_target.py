"""`dense_target`: aim each layer at the dense model's output, not at its own dense weights on the
already-pruned inputs (the activation term of D²Prune's dual expansion, made exact for the layer
objective).

Pruning block by block feeds each block the outputs of the blocks pruned before it, so a layer's
input X differs from the dense model's input X_d (the activation perturbation δX = X_d − X). The OBS,
ADMM and refit objectives ‖(W′ − W)Xᵀ‖² measure the pruned layer against the *dense weights on the
perturbed input*; the output the model was trained to produce is W·X_d. The objective that sees both
perturbations, ‖W′Xᵀ − W·X_dᵀ‖², differs from the usual one only by a constant once W is replaced by

    W* = W + α · W·G·(H + λI)⁻¹,   G = (X_d − X)ᵀX / n,   H = XᵀX / n,

the least-squares weight that maps the perturbed input to the dense output (α = `strength`, λ the
damping). So this pass rewrites the targeted weights to W* before the pruning pass, and every OBS
solver after it (SparseGPT, `dual_taylor_mask`, `admm`, the refit) minimises the dense-target
objective unchanged. The same idea is GPTAQ's asymmetric calibration (Li et al. 2025) for GPTQ.

It keeps a dense stream: each block also runs dense on the dense model's hidden states (one more
forward per block), whose layer inputs, paired sample by sample with those of the observation, give
G; its outputs are the next block's dense inputs. Memory: one block's targeted-layer inputs over this
process's calibration samples. A block reached without the stream (the first one, or after a resume)
starts it from its own inputs (then G = 0 there). Routed experts are left as they are (their tokens
differ between the streams). The drift between a block's layers (q/k/v pruned before o) is not seen:
the observation runs the block dense."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from d2compiler.contract import (
    Pass,
    PassError,
    PassOrderError,
    PassResult,
    PlanCost,
    TargetedParams,
    register_pass,
)

from .obs import damped_hessian


class DenseTargetParams(TargetedParams):
    """`dense_target` re-aims the targeted linears at the dense model's outputs before pruning."""

    strength: float = Field(
        default=0.15, ge=0.0, le=1.0,
        description="α in W* = W + α·W·G·(H + λI)⁻¹: 1 aims at the dense model's output exactly (in the "
        "least-squares sense), 0 leaves the weights as they are. The exact target overfits where the pruned "
        "model's activations are far from the dense ones (SmolLM2 at 70%: α = 1 destroys the model); 0.15 "
        "was best there on WikiText-2 valid (bench/results/tuning.md).",
    )
    dampening_frac: float = Field(
        default=0.01, gt=0.0, lt=10.0,
        description="λ, as a fraction of the Hessian's mean diagonal.",
    )


def retarget_shift(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, damping: float, layer: str) -> torch.Tensor:
    """W·G·(H + λI)⁻¹ with λ = `damping` × mean diag H, for an (out, in) fp32 `weight`, H = XᵀX/n and
    G = (X_d − X)ᵀX/n: the step from W to the least-squares map of X to W·X_d (exact as λ → 0)."""
    damped, _dead = damped_hessian(hessian, damping)  # the OBS passes' damping (dead inputs at 1 first)
    factor, info = torch.linalg.cholesky_ex(damped)
    if info.item() != 0:
        raise PassError(f"dense_target: the damped Hessian of {layer} is not positive definite; raise dampening_frac")
    return torch.cholesky_solve((weight @ cross).t().contiguous(), factor).t()  # H symmetric: (H + λI)⁻¹·(W·G)ᵀ, transposed


class _Drift:
    """One shared input's paired statistics: the observed inputs (this block's calibration calls,
    kept until the dense forward pairs them), Σ (x_d − x)ᵀx in float64, and Σ‖x_d − x‖², Σ‖x_d‖², the token count."""

    def __init__(self, width: int, device: torch.device):
        self.observed: list[torch.Tensor] = []
        self.calls = 0
        self.cross = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.norms = torch.zeros(3, dtype=torch.float64, device=device)

    def pair(self, x_dense: torch.Tensor, where: str) -> None:
        """Add the dense stream's next call of the layer, paired with the observed call it matches."""
        if self.calls >= len(self.observed):
            raise PassError(f"dense_target: {where} ran more often in the dense stream than on the calibration inputs")
        x, self.calls = self.observed[self.calls], self.calls + 1
        if x_dense.shape != x.shape:
            raise PassError(f"dense_target: {where} saw inputs of shape {tuple(x.shape)} and, in the dense stream, "
                            f"{tuple(x_dense.shape)}; the two streams must call it alike")
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        delta = x_dense.reshape(-1, x.shape[-1]).to(torch.float32) - x
        self.cross += (delta.t() @ x).double()
        self.norms += torch.stack([delta.pow(2).sum(), (x + delta).pow(2).sum(),
                                   torch.tensor(float(x.shape[0]), device=x.device)]).double()


@register_pass
class DenseTargetPass(Pass):
    name = "dense_target"
    Params = DenseTargetParams
    requires = frozenset({"hessian"})
    observes = True
    updates_weights = True
    summary = "Re-aim the targeted linears at the dense model's outputs (W* = W + W·G·H⁻¹) before pruning."

    def __init__(self, params: DenseTargetParams):
        super().__init__(params)
        self._stream: tuple[int, list[torch.Tensor]] | None = None  # (block index, its dense input hidden states)
        self._observed: str | None = None  # the block whose first observation this pass recorded
        self._drift: dict[str, _Drift] = {}  # first layer of a shared-input group -> its statistics
        self._groups: dict[str, list[Any]] = {}
        self._handles: list[Any] = []

    def plan_cost(self) -> PlanCost:
        return PlanCost(extra_forwards=1.0, keeps_inputs=True)

    def reobserves_upstream(self) -> bool:
        """True: a block's layers other than routed experts are then observed first, while the whole
        block is still dense (before any group of its experts is pruned), which the pairing needs."""
        return True

    def check_schedule(self, schedule: list[Pass]) -> None:
        """It rewrites dense weights: no pass before it may have changed them."""
        before = [p.name for p in schedule[: schedule.index(self)] if not p.reads_only]
        if before:
            raise PassOrderError(f"dense_target: must come before {before[0]!r}, which changes the weights it re-aims "
                                 "(put it right after calibrate)")

    def _layers(self, ctx: Any) -> list[Any]:
        return [layer for layer in ctx.select(self.params) if not layer.routed]

    def statistics_read(self, ctx: Any) -> set[str]:
        return {layer.name for layer in self._layers(ctx)}

    def begin_observe(self, ctx: Any) -> None:
        """Keep the calls of the first layer of each shared-input group (the block's first observation only:
        a later one, a true-sequential stage or a group of experts, sees a block no longer dense)."""
        if self._observed == ctx.name:
            return
        self._observed = ctx.name
        for group in ctx.observed_groups(ctx.observed(self._layers(ctx))):
            first = group[0]
            drift = _Drift(first.shape[1], ctx.device)
            self._drift[first.name], self._groups[first.name] = drift, group
            self._handles.append(first.module.register_forward_hook(
                lambda _m, inp, _o, d=drift: d.observed.append(inp[0].detach())))

    def end_observe(self, ctx: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def _pair_with_dense_stream(self, ctx: Any) -> None:
        """Run the block (still dense: this pass comes before any that changes it, and no other pass
        observes now) over the dense stream, pairing each recorded call with its dense twin; its
        outputs become the next block's dense stream. A block reached without the stream starts it
        from its own inputs."""
        inputs = ctx.inputs
        if self._stream is not None and self._stream[0] == ctx.index and len(self._stream[1]) == len(inputs):
            inputs = [inp.with_hidden(h) for inp, h in zip(inputs, self._stream[1])]
        handles = [self._groups[first][0].module.register_forward_hook(lambda _m, inp, _o, d=drift, w=first: d.pair(inp[0], w))
                   for first, drift in self._drift.items()]
        outputs = []
        try:
            for inp in inputs:
                out = ctx.module(*inp.args, **inp.kwargs)
                outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
        finally:
            for handle in handles:
                handle.remove()
        self._stream = (ctx.index + 1, outputs)
        for first, drift in self._drift.items():
            if drift.calls != len(drift.observed):
                raise PassError(f"dense_target: {first} ran {len(drift.observed)} times on the calibration inputs and "
                                f"{drift.calls} in the dense stream; the two streams must call it alike")
            drift.observed = []
            ctx.reduce(drift.cross)
            ctx.reduce(drift.norms)

    def apply(self, ctx: Any) -> PassResult:
        p: DenseTargetParams = self.params  # type: ignore[assignment]
        result = PassResult(modified=False)
        if self._drift:
            self._pair_with_dense_stream(ctx)
        for first, drift in self._drift.items():
            tokens = drift.norms[2].item()
            if tokens == 0:
                continue
            cross = (drift.cross / tokens).to(torch.float32)
            relative = (drift.norms[0] / drift.norms[1].clamp_min(1e-30)).sqrt().item()
            for layer in self._groups[first]:
                weight = layer.weight_matrix().to(device=ctx.device, dtype=torch.float32)
                hessian = ctx.artifact("hessian", layer.name).to(weight.device, torch.float32)
                shift = torch.zeros_like(weight) if p.strength == 0 else retarget_shift(weight, hessian, cross, p.dampening_frac, layer.name)
                layer.set_weight_matrix(weight + p.strength * shift)
                result.layers[layer.name] = {"input_drift": relative,
                                             "weight_shift": (p.strength * shift.norm() / weight.norm().clamp_min(1e-30)).item()}
                result.modified = True
        self._drift, self._groups = {}, {}
        return result
