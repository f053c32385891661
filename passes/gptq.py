"""`gptq`: GPTQ weight-only quantization (Frantar et al. 2023) with the Hessian that `calibrate`
already computed: columns are quantized one by one and each column's rounding error is spread over
the later columns through the Cholesky factor of H⁻¹ (the same sweep as SparseGPT). Pruned weights
are "quantized" to exactly zero, so their drift is compensated too and no pruned weight revives."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from d2compiler.contract import register_pass

from .obs import inverse_hessian_factor, obs_sweep
from .quant import QuantizationPass, QuantParams, layer_params


class GPTQParams(QuantParams):
    block_size: int = Field(default=128, ge=1, le=65536, description="Columns per lazy-update block.")
    dampening_frac: float = Field(default=0.01, gt=0.0, lt=10.0,
                                  description="Damping added to the Hessian diagonal, as a fraction of its mean (raised 10× "
                                  "at a time, with a warning, when the Hessian is not positive definite).")


@register_pass
class GPTQPass(QuantizationPass):
    name = "gptq"
    Params = GPTQParams
    requires = frozenset({"hessian"})
    updates_weights = True
    summary = "GPTQ int8/int4 weight-only quantization reusing calibrate's Hessian; pruned weights stay zero."

    def quantize_layer(self, layer: Any, weight: torch.Tensor, keep: torch.Tensor, ctx: Any):
        p: GPTQParams = self.params  # type: ignore[assignment]
        spec = p.spec
        w = torch.where(keep, weight, torch.zeros_like(weight))
        upper, damping = inverse_hessian_factor(ctx.artifact("hessian", layer.name).to(w.device), w, p.dampening_frac, layer.name)
        out_f, in_f = w.shape
        width = spec.width(in_f)
        scale = torch.ones(out_f, spec.groups(in_f), device=w.device)
        zero = torch.zeros_like(scale)
        if spec.group_size == 0:
            scale, zero = layer_params(w, spec)

        def project(i1: int, j: int, w1: torch.Tensor, _d: torch.Tensor) -> torch.Tensor:
            col = i1 + j
            g = col // width
            if spec.group_size and col % width == 0:  # this group's parameters, from the weights as updated so far
                ahead = torch.cat([w1[:, j:], w[:, i1 + w1.shape[1]:]], dim=1)[:, :width]
                s, z = layer_params(torch.where(keep[:, col:col + width], ahead, torch.zeros_like(ahead)), spec)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            s, z = scale[:, g], zero[:, g]
            q = torch.clamp(torch.round(w1[:, j] / s) + z, 0, spec.levels)
            return torch.where(keep[:, col], (q - z) * s, torch.zeros_like(s))

        obs_sweep(w, upper, p.block_size, project)
        return w, scale, zero, {"damping": damping}
