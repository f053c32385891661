"""Pruning a block whose experts are held one group at a time (`experts.load = "group"`, streaming).

The block's banks stay on the meta device; its `ExpertStore` reads experts from the files
(`graph.expert_store`). The block's file of the run is written piece by piece (`tensor_file`), so
that no bank is ever whole in memory:

1. the block's calls of its experts module are recorded once (`lazy_experts.record_calls`);
2. for each group of experts (`execution.expert_groups`, sized by the statistics' memory): the
   group is read from the source, observed on the recorded calls (its expert slices' hooks fire;
   the group's dense contribution to the experts' output is kept), pruned by every pass, written
   into the block file in the storage dtype, and dropped. The layers that are not routed experts go
   with the last group, observed in a replay of the block whose experts module returns the summed
   dense contributions (their inputs are those of the dense block, as with one group);
3. the rest of the block (attention, shared experts, router, buffers the passes added) is written
   and the file closed; the store then reads the pruned experts back from it for the forward that
   gives the next block's inputs (`lazy_experts.run_block`).

Not available here (refused before the first block): several processes, passes that re-observe
upstream layers (true-sequential) or survey the model first, and passes whose plan cost declares
block forwards with stand-in weights (block-output scoring); a pass that compares block outputs
without declaring it is stopped at its first comparison (`ExecutorContext.output_error_sums`).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from d2compiler.errors import D2Error
from d2compiler.execution.block_io import block_outputs
from d2compiler.execution.checkpoint import block_file
from d2compiler.execution.expert_groups import GroupPlan, expert_key, split
from d2compiler.execution.lazy_experts import experts_outputs, held_experts, record_calls, replaying
from d2compiler.execution.streaming import FileReader, as_stored
from d2compiler.graph.expert_store import ExpertStore
from d2compiler.recipe.pass_base import Pass, PassResult
from d2compiler.tensor_file import TensorFileWriter

if TYPE_CHECKING:
    from d2compiler.execution.checkpoint import CheckpointStore
    from d2compiler.execution.context import ExecutorContext
    from d2compiler.execution.executor import BlockExecutor
    from d2compiler.execution.streaming import StreamedModel


def hold_experts_by_group(streamed: StreamedModel | None, schedule: list[Pass], processes: int, group_size: int | None) -> None:
    """Make `streamed` hold its blocks' experts by group (`group_size` at a time in its forwards; None:
    as many as fit); a D2Error when this job cannot (`refusal`)."""
    problem = refusal(schedule, processes, streamed is not None)
    if problem:
        raise D2Error(f'experts.load = "group" {problem}')
    streamed.experts_by_group, streamed.expert_group_size = True, group_size


def refusal(schedule: list[Pass], processes: int, streaming: bool) -> str | None:
    """Why `experts.load = "group"` cannot run this job, or None."""
    if not streaming:
        return "needs model.streaming = true (the experts are read from the model's files)"
    if processes > 1:
        return f"runs in one process (this run has {processes})"
    for p in schedule:
        if p.reobserves_upstream():
            return f"pass '{p.name}' re-observes the block after pruning part of it (true_sequential), not available here"
        if p.surveys:
            return f"pass '{p.name}' surveys the whole model first, not available here"
        if p.plan_cost().sample_forwards[0]:
            return f"pass '{p.name}' runs the block with stand-in weights (block-output scoring), which needs every expert at once"
    return None


def _owner_prefix(block: nn.Module, owner: nn.Module, prefix: str) -> str:
    name = next(n for n, m in block.named_modules() if m is owner)
    return f"{prefix}{name}." if name else prefix


def _stored_dtype(dtype: torch.dtype, storage: torch.dtype | None) -> torch.dtype:
    return storage if storage is not None and dtype.is_floating_point else dtype


def declare_banks(writer: TensorFileWriter, owner: nn.Module, store: ExpertStore, names: str,
                  storage: torch.dtype | None) -> None:
    for attr in store.attrs:
        bank = getattr(owner, attr)
        writer.declare(names + attr, _stored_dtype(store.dtype, storage), tuple(bank.shape))


def write_experts(writer: TensorFileWriter, store: ExpertStore, names: str, experts: list[int], storage: torch.dtype | None) -> None:
    """The resident `experts` of every bank into `writer`, in the storage dtype."""
    for attr in store.attrs:
        for e in experts:
            writer.write_entry(names + attr, e, as_stored(store.weight(attr, e), storage).to("cpu"))


def finish_file(writer: TensorFileWriter, block: nn.Module, prefix: str, storage: torch.dtype | None) -> None:
    """Every loaded tensor of `block`'s state dict (not the banks on the meta device) into `writer`; close it."""
    for name, tensor in block.state_dict().items():
        if not tensor.is_meta:
            stored = as_stored(tensor.detach().to("cpu"), storage)
            writer.declare(prefix + name, stored.dtype, tuple(stored.shape))
            writer.write(prefix + name, stored)
    writer.close()


def read_back(store: ExpertStore, path: Path, names: str) -> None:
    """Point `store` at the experts written to `path` (the pruned ones)."""
    reader = FileReader(path)
    store.read = lambda attr, e: reader.expert(names + attr, e)


def prune_by_groups(executor: BlockExecutor, ctx: ExecutorContext, grouping: GroupPlan, times: dict[str, float],
                    parts: dict[int, list[tuple[str, PassResult]]], path: Path) -> None:
    """Observe, prune and write the block of `ctx` group of experts by group (see the module docstring)."""
    held = held_experts(ctx.module)
    assert held is not None
    owner, store = held
    names = _owner_prefix(ctx.module, owner, ctx.name + ".")
    writer = TensorFileWriter(path)
    try:
        _prune_into(executor, ctx, grouping, times, parts, writer, owner, store, names)
    except BaseException:
        writer.abandon()
        raise
    read_back(store, path, names)
    store.group_size = grouping.size


def _prune_into(executor: BlockExecutor, ctx: ExecutorContext, grouping: GroupPlan, times: dict[str, float],
                parts: dict[int, list[tuple[str, PassResult]]], writer: TensorFileWriter, owner: nn.Module,
                store: ExpertStore, names: str) -> None:
    """The body of `prune_by_groups`, writing into `writer` (abandoned by the caller on failure)."""
    storage = executor.storage_dtype
    declare_banks(writer, owner, store, names, storage)
    calls = record_calls(ctx.module, owner, ctx.inputs)
    groups = split(ctx.layers, grouping)
    dense: list[torch.Tensor] | None = None  # the experts' dense output so far
    for number, layer_names in enumerate(groups):
        experts = sorted({int(key) for layer in ctx.layers if layer.name in layer_names and (key := expert_key(layer)) is not None})
        last = number == len(groups) - 1
        store.load(experts)
        ran = False

        def observe(experts: list[int] = experts, last: bool = last) -> list[torch.Tensor] | None:
            nonlocal dense, ran
            ran = True
            dense = experts_outputs(owner, store, calls, experts, dense)
            if not last:
                return None
            with replaying(owner, dense):
                return block_outputs(ctx.module, ctx.inputs)[0]

        with ctx.narrowed(layer_names) if len(groups) > 1 else nullcontext():
            executor._observe(ctx, times, later=number > 0, run=observe)
            if not ran and not last:
                dense = experts_outputs(owner, store, calls, experts, dense)
            executor.apply_schedule(ctx, times, parts)
        if len(groups) > 1:
            ctx.forget(layer_names)
        write_experts(writer, store, names, experts, storage)
        store.drop()
    executor.round_block(ctx.module)
    finish_file(writer, ctx.module, ctx.name + ".", storage)


def by_group_file(checkpoints: CheckpointStore, index: int) -> Path:
    """Where block `index`'s file is written before the checkpoint store adopts it."""
    return checkpoints.folder / f".{block_file(index)}.by-group"


def copy_block(streamed: StreamedModel, index: int, checkpoints: CheckpointStore, storage: torch.dtype | None,
               group_size: int | None, reports: list[dict]) -> bool:
    """Checkpoint block `index` of `streamed` as it is (an untouched block after the last pruned one),
    its experts read and written `group_size` (default 1) at a time; False (nothing written) when the
    block has no experts held by group."""
    prefix, path = streamed.block_prefix(index), by_group_file(checkpoints, index)
    with streamed.block(index) as block:
        held = held_experts(block)
        if held is None:
            return False
        owner, store = held
        names = _owner_prefix(block, owner, prefix)
        writer = TensorFileWriter(path)
        try:
            declare_banks(writer, owner, store, names, storage)
            count = getattr(owner, store.attrs[0]).shape[0]
            for start in range(0, count, group_size or 1):
                experts = list(range(start, min(start + (group_size or 1), count)))
                store.load(experts)
                write_experts(writer, store, names, experts, storage)
                store.drop()
            finish_file(writer, block, prefix, storage)
        except BaseException:
            writer.abandon()
            raise
    checkpoints.adopt_block(index, path, [], reports)
    return True
