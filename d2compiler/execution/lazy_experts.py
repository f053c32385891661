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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from d2compiler.errors import D2Error
from d2compiler.execution.block_io import BlockInput, _StopForward, block_outputs
from d2compiler.graph.expert_store import ExpertStore, group_call

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
def group_outputs(owner: nn.Module, calls: list[Call], store: ExpertStore, groups: list[list[int]],
                  visit: Callable[[list[int]], None] | None = None) -> list[torch.Tensor]:
    """The experts module's output for each recorded call, summed over `groups` (which must cover
    every expert the calls route to), each group resident only while its turn lasts; `visit(group)`
    runs after the group is loaded and before its outputs are computed (e.g. to prune it)."""
    outputs: list[torch.Tensor | None] = [None] * len(calls)
    for group in groups:
        store.load(group)
        try:
            if visit is not None:
                visit(group)
            for i, (args, kwargs) in enumerate(calls):
                part = owner(*group_call(args, group), **kwargs)
                outputs[i] = part if outputs[i] is None else outputs[i] + part
        finally:
            store.drop()
    return [out for out in outputs if out is not None]


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


def lazy_block_outputs(block: nn.Module, owner: nn.Module, store: ExpertStore, inputs: list[BlockInput],
                       groups: list[list[int]]) -> list[torch.Tensor]:
    """The block's output hidden states for `inputs`, its experts read group by group (see the module
    docstring)."""
    calls = record_calls(block, owner, inputs)
    outputs = group_outputs(owner, calls, store, groups)
    with replaying(owner, outputs):
        return block_outputs(block, inputs)[0]
