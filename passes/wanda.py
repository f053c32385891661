"""Wanda: score |W_ij| · ‖x_j‖ (input-channel activation norm), compared within each output row
(N:M: within each group), no weight update."""

from __future__ import annotations

from typing import Any

import torch

from d2compiler.contract import register_pass

from .pruning import PruningPass, select_mask


@register_pass
class WandaPass(PruningPass):
    name = "wanda"
    requires = frozenset({"act_norms"})
    summary = "Prune by |W|·‖x‖ per output row (Sun et al. 2023); no weight update."

    def prune_layer(self, layer: Any, weight: torch.Tensor, ctx: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        norms = ctx.artifact("act_norms", layer.name).to(weight.device)
        return weight, select_mask(weight.abs() * norms.unsqueeze(0), self.params, row_wise=True, sparsity=self.sparsity_of(ctx, layer)), {}
