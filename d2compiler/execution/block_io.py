"""Running blocks on recorded inputs: capture the first block's calls from the model, run a block
over them (all the way, until some modules have run, or with stand-in weights). Shared by the
executor and the metrics that replay blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from d2compiler.errors import D2Error


class _StopForward(Exception):
    """Raised by a hook to end a model or block call early (`capture_block_inputs`, `forward_until`)."""


@dataclass
class BlockInput:
    """One calibration sample's call of a block: positional args (hidden states first) and kwargs."""

    args: tuple
    kwargs: dict[str, Any]

    def with_hidden(self, hidden: torch.Tensor) -> BlockInput:
        return BlockInput((hidden, *self.args[1:]), self.kwargs)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def model_call_kwargs(model: nn.Module) -> dict[str, Any]:
    """Extra kwargs for a full-model forward: no KV cache for generative models."""
    return {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}


Call = torch.Tensor | dict[str, Any]  # one model input: the first positional argument (token ids, pixels) or keyword arguments


def decoder_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    """For an encoder-decoder given token ids only: the decoder's input, the ids shifted right as
    the model prepares them from labels (T5-like models do not make one themselves; BART-like ones
    make the same)."""
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False) or not callable(prepare) or ids.is_floating_point():
        return {}
    return {"decoder_input_ids": prepare(labels=ids)}


def invoke(model: nn.Module, call: Call, device: torch.device) -> Any:
    """`model(call)` or `model(**call)`, the call's tensors moved to `device`, without a KV cache
    (an encoder-decoder given token ids gets its decoder input, `decoder_inputs`)."""
    extra = model_call_kwargs(model)
    if isinstance(call, torch.Tensor):
        ids = call.to(device)
        return model(ids, **extra, **decoder_inputs(model, ids))
    return model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in call.items()}, **extra)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, calls: list[Call], device: torch.device) -> list[BlockInput]:
    """Run the model up to the first block for each call and record that block's call. The parameters
    outside the blocks must be on `device` (`Placement.outside_on`)."""
    captured: list[BlockInput] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not args and "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            args = (kwargs.pop("hidden_states"),)
        captured.append(BlockInput(_to(args, device), _to(kwargs, device)))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for call in calls:
            try:
                invoke(model, call, device)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != len(calls):
        raise D2Error(f"captured {len(captured)} block inputs for {len(calls)} calls")
    return captured


@torch.no_grad()
def block_outputs(block: nn.Module, inputs: list[BlockInput]) -> tuple[list[torch.Tensor], bool]:
    """The block's output hidden states for each input, and whether the block returns a tuple."""
    outputs, as_tuple = [], False
    for inp in inputs:
        out = block(*inp.args, **inp.kwargs)
        as_tuple = isinstance(out, (tuple, list))
        outputs.append(out[0] if as_tuple else out)
    return outputs, as_tuple


def forward_block(block: nn.Module, inputs: list[BlockInput]) -> list[torch.Tensor]:
    return block_outputs(block, inputs)[0]


@torch.no_grad()
def forward_until(block: nn.Module, inputs: list[BlockInput], stops: list[nn.Module]) -> None:
    """Run the block over each input only until every module of `stops` has run (the forward hooks
    registered on them before this call have fired, in registration order), then end that call; the
    rest of the block is skipped and nothing is kept: this serves observation only. A call in which
    some of `stops` never run (e.g. an expert no token is routed to) runs to the end."""
    modules = list({id(m): m for m in stops}.values())
    pending: set[int] = set()

    def reached(module: nn.Module, _inp: Any, _out: Any) -> None:
        pending.discard(id(module))
        if not pending:
            raise _StopForward

    handles = [m.register_forward_hook(reached) for m in modules]
    try:
        for inp in inputs:
            pending.update(id(m) for m in modules)
            try:
                block(*inp.args, **inp.kwargs)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def block_outputs_with(block: nn.Module, inputs: list[BlockInput], weights: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The block's output hidden states for `inputs` with `weights` (by parameter name, e.g.
    `self_attn.q_proj.weight`) standing in for those parameters in these calls only
    (`torch.func.functional_call`; the block itself is never written)."""
    outputs = []
    for inp in inputs:
        out = torch.func.functional_call(block, weights, inp.args, inp.kwargs, strict=False)
        outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outputs
