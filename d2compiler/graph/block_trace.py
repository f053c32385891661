"""One block's structure from tracing it, with its Mixture-of-Experts experts: expert lists probed
eagerly and hidden from `torch.export` (`graph.expert_lists`), 3-D banks traced through the model's
grouped implementation and probed after (`graph.experts`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from d2compiler.graph.expert_lists import opaque_moe_modules, probe_expert_lists
from d2compiler.graph.experts import experts_for_tracing, probe_banks
from d2compiler.graph.structure import BlockStructure, trace_block


def trace_with_experts(model: nn.Module, block: nn.Module, sample: Any, label: str) -> BlockStructure:
    """The structure of `block` (of `model`) traced on `sample` (a captured block call with `args`
    and `kwargs`): roles from the traced dataflow, those of expert-list linears from one eager
    forward, and the expert banks."""
    def run() -> Any:
        return block(*sample.args, **sample.kwargs)

    lists = probe_expert_lists(block, run)
    with experts_for_tracing(model), opaque_moe_modules(block, lists):
        structure = trace_block(block, sample.args, sample.kwargs, label=label)
    structure.experts = probe_banks(block, run)
    structure.roles.update(lists.roles)
    structure.input_groups += lists.input_groups
    structure.expert_lists = lists.lists
    return structure
