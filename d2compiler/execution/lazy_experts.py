"""A block whose experts are held one group at a time (`graph.expert_store`), run over recorded
inputs without ever holding all its experts.

A plain forward over the calibration windows would visit every expert once per window, so with
experts read from disk every window would read all of them. Here the loops are turned around:

1. *record* (`record_calls`): run the block over each input until its experts module is called,
   keep that call (hidden, top_k_index, top_k_weights, ...) and end the block's call there;
2. *experts outer* (`group_outputs`): for each group of experts, make the group resident, run the
   experts module on every recorded call with the routing weights of the other experts set to zero
   (`group_call`) and add the outputs up; then drop the group. Each expert is read once per pass,
   and the statistic hooks of the group's expert slices see exactly the tokens routed to them;
3. *replay* (`replaying`): run the block over each input again, its experts module returning the
   sum for that call instead of computing; hooks on the block's other layers fire here.

The block's output equals the plain forward's up to the order of the floating-point sums over the
experts (checked by the tests on every tested MoE family).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from d2compiler.errors import D2Error
from d2compiler.execution.block_io import BlockInput, _StopForward, block_outputs
from d2compiler.graph.expert_store import ExpertStore, group_call, store_of

Call = tuple[tuple, dict[str, Any]]  # one call of an experts module: (args, kwargs)


@torch.no_grad()
def record_calls(block: nn.Module, owner: nn.Module, inputs: list[BlockInput]) -> list[Call]:
    """The call of the experts module `owner` in the block's forward over each input (the block's
    call ends there); an error when some input's forward does not call it exactly once."""
    calls: list[Call] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        calls.append((args, dict(kwargs)))
        raise _StopForward

    handle = owner.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for inp in inputs:
            try:
                block(*inp.args, **inp.kwargs)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(calls) != len(inputs):
        raise D2Error(f"{type(owner).__name__} was called {len(calls)} times over {len(inputs)} inputs: experts held one "
                      "group at a time need one call of the experts module per block call")
    return calls


@torch.no_grad()
def experts_outputs(owner: nn.Module, store: ExpertStore, calls: list[Call], experts: list[int],
                    totals: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The experts module's output for each recorded call from `experts` (resident) alone, added to
    `totals` (the earlier groups' sums) in the module's own order when its forward starts from
    `zeros_like(hidden)` (then in place; otherwise added after)."""
    out = []
    for i, (args, kwargs) in enumerate(calls):
        store.start = None if totals is None else totals[i]
        part = owner(*group_call(args, experts), **kwargs)
        out.append(part if totals is None or store.started else totals[i] + part)
        store.start, store.started = None, False
    return out


@torch.no_grad()
def group_outputs(owner: nn.Module, calls: list[Call], store: ExpertStore, groups: list[list[int]]) -> list[torch.Tensor]:
    """The experts module's output for each recorded call, summed over `groups` (which must cover
    every expert the calls route to), each group resident only while its turn lasts."""
    total: list[torch.Tensor] | None = None
    for group in groups:
        store.load(group)
        try:
            total = experts_outputs(owner, store, calls, group, total)
        finally:
            store.drop()
    return total or []


@contextmanager
def replaying(owner: nn.Module, outputs: list[torch.Tensor]) -> Iterator[None]:
    """While active, the i-th call of `owner` returns `outputs[i]` without computing anything."""
    previous = owner.__dict__.get("forward")
    calls = iter(outputs)

    def forward(*_args: Any, **_kwargs: Any) -> torch.Tensor:
        try:
            return next(calls)
        except StopIteration:
            raise D2Error(f"{type(owner).__name__} was called more often than recorded") from None

    object.__setattr__(owner, "forward", forward)
    try:
        yield
    finally:
        if previous is None:
            del owner.__dict__["forward"]
        else:
            object.__setattr__(owner, "forward", previous)


def held_experts(block: nn.Module) -> tuple[nn.Module, ExpertStore] | None:
    """The experts module of `block` whose banks are held one group at a time, with its store; None
    when there is none."""
    found = [(module, store) for module in block.modules() if (store := store_of(module)) is not None]
    if len(found) > 1:
        raise D2Error(f"{type(block).__name__}: {len(found)} experts modules in one block; experts.load = \"group\" "
                      "handles one per block")
    return found[0] if found else None


def expert_groups(owner: nn.Module, store: ExpertStore) -> list[list[int]]:
    """The experts of `owner`'s banks in groups of `store.group_size` (all in one when it is None)."""
    count = getattr(owner, store.attrs[0]).shape[0]
    size = store.group_size or count
    return [list(range(start, min(start + size, count))) for start in range(0, count, size)]


def run_block(block: nn.Module, inputs: list[BlockInput]) -> tuple[list[torch.Tensor], bool]:
    """`block_outputs(block, inputs)`; for a block whose experts are held one group at a time, the same
    computed experts-outer (see the module docstring)."""
    held = held_experts(block)
    if held is None:
        return block_outputs(block, inputs)
    owner, store = held
    calls = record_calls(block, owner, inputs)
    outputs = group_outputs(owner, calls, store, expert_groups(owner, store))
    with replaying(owner, outputs):
        return block_outputs(block, inputs)
