"""Weight-only integer quantization numerics shared by `quantize_rtn` and `gptq`.

A layer's (out, in) weight is quantized per output channel (`group_size = 0`) or in groups of
`group_size` consecutive inputs of a row, to `bits` (4 or 8) with a scale and an integer zero point
per group: w ≈ (q − z)·s, q ∈ [0, 2^bits − 1]. The range of every group always includes 0, and z is
an integer, so a pruned (exactly zero) weight quantizes to q = z and dequantizes to exactly 0:
quantization never revives a pruned weight. `symmetric` fixes z = 2^(bits−1) (signed levels).
"""

from __future__ import annotations

import time
from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from d2compiler.contract import Pass, PassError, PassResult, TargetedParams

if TYPE_CHECKING:
    from d2compiler.contract import BlockContext, LinearLayer


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int  # 0 = one group per output channel
    symmetric: bool

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == 0 else in_features // self.group_size

    def width(self, in_features: int) -> int:
        return in_features if self.group_size == 0 else self.group_size


def group_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of each row of `w` (one quantization group per row), fp32."""
    lo = torch.clamp(w.min(dim=1).values, max=0.0)
    hi = torch.clamp(w.max(dim=1).values, min=0.0)
    if spec.symmetric:
        half = 2 ** (spec.bits - 1)
        amax = torch.maximum(-lo, hi)
        scale = amax / (half - 1) if spec.bits > 1 else amax
        zero = torch.full_like(scale, float(half))
    else:
        scale = (hi - lo) / spec.levels
        zero = torch.round(-lo / torch.where(scale > 0, scale, torch.ones_like(scale)))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale works
    return scale, zero


def layer_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), each (out, groups), for a whole weight."""
    out_f, in_f = w.shape
    g, width = spec.groups(in_f), spec.width(in_f)
    scale, zero = group_params(w.reshape(out_f * g, width), spec)
    return scale.view(out_f, g), zero.view(out_f, g)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer levels, dequantized weight) of a whole weight with per-group (out, groups) params."""
    out_f, in_f = w.shape
    width = spec.width(in_f)
    cols = torch.arange(in_f, device=w.device) // width
    s, z = scale[:, cols], zero[:, cols]
    q = torch.clamp(torch.round(w / s) + z, 0, spec.levels)
    return q, (q - z) * s


class QuantParams(TargetedParams):
    """Parameters shared by the weight-only quantization passes."""

    bits: Literal[4, 8] = Field(default=4, description="Bits per weight: 4 or 8 (weight-only; activations stay in float).")
    group_size: int = Field(
        default=128, ge=0, le=65536,
        description="Inputs per quantization group along each row (a scale and zero point per group); 0 = one "
        "group per output channel. It must divide every targeted layer's in_features.",
    )
    symmetric: bool = Field(default=True, description="Symmetric levels (zero point fixed at 2^(bits-1)), the "
                            "default, as llm-compressor's W4A16/W8A16 presets: the compressed-tensors export then "
                            "loads with plain `from_pretrained`. `false`: an integer zero point per group (a little "
                            "more accurate; its compressed-tensors export loads with `dequantize=True` only, see "
                            "docs/deploy.md).")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.symmetric)


class QuantizationPass(Pass):
    """Drives one quantization method over the targeted linears of a block. The weight is replaced
    by its dequantized values (so the model stays a plain float model that computes exactly what
    the integer model computes), and the scales and zero points are attached to the module as
    `weight_scale` / `weight_zero_point` buffers, shaped (out, groups), for the exporters. Weights
    that are zero (pruned) stay exactly zero, and the keep mask is recorded. An expert of a 3-D
    Mixture-of-Experts bank is quantized in place the same way, but the bank has no place for its
    scales: the `hf` output holds its dequantized values, and compressed-tensors refuses it."""

    Params = QuantParams
    quantizes = True
    provides = frozenset({"quantized"})
    writes = frozenset({"mask"})  # the keep mask it preserves

    @abstractmethod
    def quantize_layer(self, layer: LinearLayer, weight: torch.Tensor, keep: torch.Tensor, ctx: BlockContext
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Return (dequantized weight, scale, zero, extra metrics) for one (out, in) fp32 weight."""

    def check_layers(self, layers: list[LinearLayer]) -> None:
        size = self.params.group_size
        bad = sorted({f"{layer.local_name} ({layer.shape[1]})" for layer in layers if size and layer.shape[1] % size})
        if bad:
            raise PassError(f"{self.name}: group_size={size} does not divide in_features of {', '.join(bad)}; "
                            "choose a group size that divides every targeted layer's in_features, or 0 (per channel)")

    def apply(self, ctx: BlockContext) -> PassResult:
        from .pruning import relative_error

        p: QuantParams = self.params  # type: ignore[assignment]
        result = PassResult(modified=False)

        def compute(layer: LinearLayer) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
            start = time.perf_counter()
            weight = layer.weight_matrix().to(device=ctx.device, dtype=torch.float32, copy=True)
            keep = weight != 0
            earlier = ctx.artifact("mask", layer.name)
            if earlier is not None:
                keep &= earlier.to(keep.device)
            new_weight, scale, zero, extra = self.quantize_layer(layer, weight, keep, ctx)
            new_weight = torch.where(keep, new_weight, torch.zeros_like(new_weight))
            return (new_weight, keep, scale.to(torch.float32), zero.to(torch.float32)), {
                **extra, "quant_time_s": round(time.perf_counter() - start, 4)}

        for layer, (new_weight, keep, scale, zero), info in ctx.map_layers(ctx.select(p), compute):
            weight = layer.weight_matrix().to(device=ctx.device, dtype=torch.float32, copy=True)
            layer.set_weight_matrix(new_weight)
            layer.set_row_buffer("weight_scale", scale)
            layer.set_row_buffer("weight_zero_point", zero)
            ctx.record_mask(layer.name, keep)
            result.layers[layer.name] = {  # the executor adds the layer's role and shape
                "quant": {"bits": p.bits, "group_size": p.group_size, "symmetric": p.symmetric, "method": self.name},
                "quant_error": relative_error(weight, new_weight, ctx.artifact("hessian", layer.name)),
                "sparsity": (new_weight == 0).sum() / new_weight.numel(),
                "quant_time_s": info.pop("quant_time_s"), **info,
            }
            result.modified = True
        return result
