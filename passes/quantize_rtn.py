"""`quantize_rtn`: round-to-nearest weight-only quantization (int8 / int4, per channel or per group)."""

from __future__ import annotations

from typing import Any

import torch

from d2compiler.contract import register_pass

from .quant import QuantizationPass, fake_quantize, layer_params


@register_pass
class QuantizeRTNPass(QuantizationPass):
    name = "quantize_rtn"
    summary = "Round-to-nearest int8/int4 weight-only quantization, per channel or per group; pruned weights stay zero."

    def quantize_layer(self, layer: Any, weight: torch.Tensor, keep: torch.Tensor, ctx: Any):
        spec = self.params.spec
        kept = torch.where(keep, weight, torch.zeros_like(weight))
        scale, zero = layer_params(kept, spec)
        _q, dequantized = fake_quantize(kept, scale, zero, spec)
        return dequantized, scale, zero, {}
