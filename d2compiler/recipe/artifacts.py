"""The artifact kinds passes exchange through a block's context, with their types.

Every name a pass puts in `requires`, `optional`, `provides` or `writes` must be a registered kind
(`PassManager` refuses a pass that names an unknown one). `BlockContext.publish` refuses a write by a
pass that does not declare the artifact in `provides` or `writes`, and a value of the wrong type.
Passes register their own kinds with `register_artifact` (the shipped `d2_stats` is registered by
`passes/dual_taylor.py`); a marker kind carries no value and only orders passes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class ArtifactKind:
    name: str
    scope: Literal["layer", "block", "marker"]  # keyed by layer name, by block name, or never published
    types: tuple[type, ...]  # the accepted value types
    description: str


ARTIFACTS: dict[str, ArtifactKind] = {}


def register_artifact(kind: ArtifactKind) -> ArtifactKind:
    """Make `kind` known; registering the same kind again is a no-op, another kind of that name an error."""
    known = ARTIFACTS.get(kind.name)
    if known is not None and known != kind:
        raise ValueError(f"artifact {kind.name!r} registered twice with different kinds")
    ARTIFACTS[kind.name] = kind
    return kind


for _kind in (
    ArtifactKind("hessian", "layer", (torch.Tensor,), "H = XᵀX / n over the calibration tokens, (in, in) fp32"),
    ArtifactKind("act_norms", "layer", (torch.Tensor,), "‖x_j‖₂ of every input feature over the calibration tokens"),
    ArtifactKind("mask", "layer", (torch.Tensor,), "keep mask (bool, the weight's (out, in) shape); masks compose by AND"),
    ArtifactKind("layer_sparsity", "layer", (float,), "the sparsity a pruning pass applies to this layer (a layer-wise allocation)"),
    ArtifactKind("update_plan", "layer", (bool,), "whether the layer's pruning applies the OBS weight update"),
    ArtifactKind("update_variants", "layer", (dict,), "pruned (weight, keep, info) per (update, tag), computed ahead"),
    ArtifactKind("dense_attention", "block", (list,), "the dense block's attention inputs per scored sample"),
    ArtifactKind("holdout_hessian", "layer", (tuple,), "(H, tokens) over the held-out calibration samples"),
    ArtifactKind("quantized", "marker", (), "weights on an integer grid (weight_scale / weight_zero_point buffers)"),
    ArtifactKind("packed", "marker", (), "linears stored packed (Packed24Linear)"),
):
    register_artifact(_kind)
