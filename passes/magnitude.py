"""Magnitude pruning: prune the smallest |W| of each layer (N:M: of each group). No calibration
statistics are needed; with `calibrate` in the recipe the reconstruction error is recorded too."""

from __future__ import annotations

from typing import Any

import torch

from d2compiler.contract import register_pass

from .pruning import PruningPass, select_mask


@register_pass
class MagnitudePass(PruningPass):
    name = "magnitude"
    summary = "Prune the smallest-magnitude weights of each layer (no weight update)."

    def prune_layer(self, layer: Any, weight: torch.Tensor, ctx: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        return weight, select_mask(weight.abs(), self.params, row_wise=False, sparsity=self.sparsity_of(ctx, layer)), {}
