"""Experts in groups: a block whose experts' statistics do not fit in memory at once is compressed
group by group.

The statistics of one expert are one accumulator per shared input (its gate/up input, its down
input): a float64 sum and a float32 scratch of width² entries each (`passes/gram.py`), times the
copies a pass keeps (`PlanCost.statistics_copies`). A DeepSeek-V3 layer (256 experts, width 7168
and 2048) would need 256 × 12 × (7168² + 2048²) B = 171 GB at once. So the executor splits the
block's experts into groups of `experts.group_size` (default: as many as fit in half the memory
free when the block starts) and, for each group in turn, observes the block (a routed forward that
ends once the group's layers have run), applies every pass to that group's layers only, and drops
their statistics and masks before the next group.

Every layer that is not a routed expert (attention, shared experts, dense MLPs) goes with the last
group, so that each group's experts are observed as in the dense block; with a pass that re-observes
layers after pruning the ones before them (true-sequential, `Pass.reobserves_upstream`), with the
first group, so that every group's experts are observed after the attention is pruned, as they
would be in one group. Either way the result equals the ungrouped one for passes whose statistics
are per layer: an expert's inputs do not depend on the other experts of its layer. What differs: a
pass that compares the block's output with the dense one (attention_kl_update's block-output
trials) sees the earlier groups' experts already pruned, and a linear after the experts inside the
block (none in the tested architectures) would be observed with them pruned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from d2compiler.execution.memory import available_memory_mb
from d2compiler.graph.layers import LinearLayer

if TYPE_CHECKING:
    from d2compiler.execution.context import ExecutorContext
    from d2compiler.recipe.pass_base import Pass

HEADROOM = 0.5  # the share of the free memory a group's statistics may take (the rest: solves, activations)


def expert_key(layer: LinearLayer) -> str | None:
    """Which expert of its layer `layer` belongs to (the bank index, or the list entry); None for a
    layer that is not a routed expert."""
    if layer.is_expert:
        return str(layer.module.index)
    if layer.expert_list is not None:
        return layer.local_name[len(layer.expert_list) + 1 :].partition(".")[0]
    return None


def expert_order(layers: Iterable[LinearLayer]) -> list[str]:
    """The block's expert keys in order of first appearance: expert e of every bank and list of the
    block is one unit (its gate, up and down go together)."""
    return list(dict.fromkeys(key for layer in layers if (key := expert_key(layer)) is not None))


@dataclass(frozen=True)
class GroupPlan:
    """How a block's experts are split: `experts` units in groups of `size` (the last may be
    smaller); `bytes_per_expert`: one expert's statistics."""

    experts: int
    size: int
    bytes_per_expert: float

    @property
    def groups(self) -> int:
        return max(1, math.ceil(self.experts / self.size)) if self.experts else 1

    @property
    def statistics_bytes(self) -> float:
        """The statistics held at once: one group's experts'."""
        return min(self.size, self.experts) * self.bytes_per_expert

    def describe(self, by_group: bool = False) -> str:
        """One line for `d2c plan` (`by_group`: experts read group by group, `experts.load = "group"`)."""
        mib = self.bytes_per_expert / 2**20
        line = (f"{self.experts} per block, statistics {mib:.1f} MiB each ({self.experts * mib:.1f} MiB for all); "
                f"{self.groups} group{'s' if self.groups > 1 else ''} of {self.size}")
        if by_group:
            return line + " (weights and statistics read by group, each group run on the block's recorded expert calls)"
        more = self.groups - 1
        return line + (f" ({more} more routed forward{'s' if more > 1 else ''} per block)" if more else "")


def statistics_bytes(widths: Iterable[int], copies: int = 1) -> float:
    """Bytes of the accumulators of inputs of these widths (float64 sum + float32 scratch each)."""
    return float(sum(12 * w * w for w in widths) * copies)


def plan_groups(experts: int, bytes_per_expert: float, group_size: int | None, free_bytes: float | None) -> GroupPlan:
    """`group_size` experts per group when given; else as many as fit in HEADROOM × `free_bytes`
    (all of them when that is unknown), at least one."""
    if not experts:
        return GroupPlan(0, 1, bytes_per_expert)
    if group_size is None:
        group_size = experts if free_bytes is None or bytes_per_expert <= 0 else int(HEADROOM * free_bytes // bytes_per_expert)
    return GroupPlan(experts, max(1, min(group_size, experts)), bytes_per_expert)


def split(layers: list[LinearLayer], plan: GroupPlan, *, others_first: bool = False) -> list[set[str]]:
    """The names of `layers` by group, in order: group g holds experts [g·size, (g+1)·size) of every
    bank and list; the last group (the first with `others_first`) also holds every layer that is not
    a routed expert."""
    order = {unit: i // plan.size for i, unit in enumerate(expert_order(layers))}
    groups: list[set[str]] = [set() for _ in range(plan.groups)]
    for layer in layers:
        key = expert_key(layer)
        groups[order[key] if key is not None else (0 if others_first else -1)].add(layer.name)
    return groups


def free_memory_bytes(device: torch.device) -> float | None:
    """The memory free now on `device`: CUDA's free bytes, or the host's MemAvailable (Linux); None
    when it cannot be read."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    available = available_memory_mb()
    return None if available is None else available * 2**20


def fitting_group(bytes_per_expert: float, device: torch.device) -> int | None:
    """How many experts of `bytes_per_expert` weights fit in HEADROOM × the memory free now on
    `device` (at least one); None when that memory cannot be read (then all of them)."""
    free = free_memory_bytes(device)
    return None if free is None or bytes_per_expert <= 0 else max(1, int(HEADROOM * free // bytes_per_expert))


def block_grouping(ctx: ExecutorContext, schedule: list[Pass], group_size: int | None) -> GroupPlan:
    """How the block of `ctx` splits its targeted experts (`layer_grouping`). With several processes
    the first one's split holds for all (their forwards and reductions go group by group together),
    and processes that share the host's memory share its budget."""
    targeted = [layer for layer in ctx.layers if layer.name in ctx.targeted]
    processes = ctx.group.size if ctx.device.type == "cpu" else 1
    weights = next((t.dtype.itemsize for t in ctx.module.parameters() if t.is_meta), 0)  # banks read by group
    plan = layer_grouping(targeted, ctx.structure.group_of, schedule, group_size, ctx.device, processes, weights)
    if ctx.group.size == 1 or not plan.experts:
        return plan
    size = int(ctx.group.broadcast(torch.tensor([plan.size], dtype=torch.int64), 0).item())
    return GroupPlan(plan.experts, size, plan.bytes_per_expert)


def layer_grouping(targeted: list[LinearLayer], group_of: Callable[[str], list[str]], schedule: list[Pass],
                   group_size: int | None, device: torch.device, processes: int = 1, weight_bytes: int = 0) -> GroupPlan:
    """How a block with these targeted layers splits its experts: `group_size` each, or as many as fit
    in the memory free now on `device`, shared by `processes`, less the statistics of the layers that
    are not routed experts (held beside one group's). `group_of` names the linears sharing a layer's
    input; `weight_bytes`: the bytes per weight entry of experts read by group (their weights count
    with their statistics; 0: loaded with the block)."""
    units = expert_order(targeted)
    if not units:
        return plan_groups(0, 0.0, None, None)
    widths = {tuple(group_of(layer.owner)): layer.shape[1] for layer in targeted if expert_key(layer) == units[0]}
    others = {tuple(group_of(layer.owner)): layer.shape[1] for layer in targeted if expert_key(layer) is None}
    copies = max((p.plan_cost().statistics_copies for p in schedule if p.observes), default=1)
    per_expert = statistics_bytes(widths.values(), copies)
    weights = weight_bytes * sum(layer.shape[0] * layer.shape[1] for layer in targeted if expert_key(layer) == units[0])
    free = None if group_size is not None else free_memory_bytes(device)
    free = None if free is None else max(0.0, free / processes - statistics_bytes(others.values(), copies) / HEADROOM)
    size = plan_groups(len(units), per_expert + weights, group_size, free).size
    return GroupPlan(len(units), size, per_expert)
