"""A whole model's forward passes with one block on the compute device at a time: what evaluation
runs on (perplexity, embeddings, accuracy, zero-shot), for a model in memory or streamed.

`ModelRunner.run(calls, each)` computes `model(**call)` for every call and hands each output to
`each`, in order. The calls are taken in chunks of at most `CHUNK_TOKENS` tokens: the inputs of the
first block are captured for the whole chunk, every block runs over them in turn (placed by
`placement.Placement`, so a streamed model reads each block's weights once per chunk), and the model
is then run once more per call with its blocks replaced by replays of the stored final hidden
states, so that the head (final norm, LM head, pooler, classifier) runs as the model itself runs it.
The results are those of a plain forward: the same operations on the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from d2compiler.execution.block_io import Call, capture_block_inputs, invoke
from d2compiler.execution.distributed import SINGLE, Group
from d2compiler.execution.lazy_experts import run_block
from d2compiler.execution.placement import Placement, Reader
from d2compiler.execution.progress import counter

if TYPE_CHECKING:
    from d2compiler.execution.streaming import StreamedModel

CHUNK_TOKENS = 1 << 16  # hidden states held at once: CHUNK_TOKENS x hidden size, twice


def call_tokens(call: Call) -> int:
    """Tokens (or images) of one call: batch x sequence of its first tensor (batch for images)."""
    first = call if isinstance(call, torch.Tensor) else next((v for v in call.values() if isinstance(v, torch.Tensor)), None)
    return 1 if first is None else int(first.shape[0] * (first.shape[1] if first.dim() == 2 else 1))


def chunks(calls: list[Call], budget: int | None = None) -> Iterator[range]:
    """Consecutive ranges of `calls` of at most `budget` (default `CHUNK_TOKENS`) tokens each (at least
    one call each)."""
    budget = CHUNK_TOKENS if budget is None else budget
    start, size = 0, 0
    for i, call in enumerate(calls):
        tokens = call_tokens(call)
        if i > start and size + tokens > budget:
            yield range(start, i)
            start, size = i, 0
        size += tokens
    if start < len(calls):
        yield range(start, len(calls))


class _Replay(nn.Module):
    """Stands in for a block in the head pass: returns the stored output of the current call (the
    last block) or its input unchanged (the others). Attributes it lacks are read from the block it
    replaces (some models read e.g. `layer.attention_type` in their forward)."""

    def __init__(self, original: nn.Module, outputs: list[torch.Tensor] | None, as_tuple: bool):
        super().__init__()
        object.__setattr__(self, "_original", original)
        self.outputs, self.as_tuple, self.call = outputs, as_tuple, 0

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, hidden: torch.Tensor, *_args: Any, **_kwargs: Any) -> Any:
        out = hidden if self.outputs is None else self.outputs[self.call]
        return (out,) if self.as_tuple else out


@contextmanager
def _replayed(blocks: nn.ModuleList, final: list[torch.Tensor], as_tuple: bool) -> Iterator[_Replay]:
    originals = list(blocks)
    replays = [_Replay(b, None, as_tuple) for b in originals[:-1]] + [_Replay(originals[-1], final, as_tuple)]
    try:
        for i, replay in enumerate(replays):
            blocks[i] = replay
        yield replays[-1]
    finally:
        for i, original in enumerate(originals):
            blocks[i] = original


class ModelRunner:
    """Runs `model` block by block on `device` (see the module docstring). With `streamed`, block i's
    weights are read through `readers[i]` (default: the source files)."""

    def __init__(self, model: nn.Module, device: torch.device, *, streamed: StreamedModel | None = None,
                 readers: list[Reader] | None = None, group: Group = SINGLE):
        self.placement = Placement(model, device, streamed)
        self.readers = readers
        self.group = group

    @property
    def model(self) -> nn.Module:
        return self.placement.model

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @torch.no_grad()
    def run(self, calls: list[Call], each: Callable[[int, Any], None], *, desc: str = "forward", quiet: bool = False) -> None:
        """`each(i, model(**calls[i]))` for every i, in order (tensors of a call are moved to the device).
        With several processes, each runs its contiguous share of the calls (`Group.share`); the
        caller sums what it measured over the processes (`Group.total`)."""
        model, blocks = self.model, self.placement.blocks
        model.eval()
        share = self.group.share(len(calls))
        parts = [range(share.start + r.start, share.start + r.stop) for r in chunks(calls[share.start : share.stop])]
        bar = counter(len(parts) * (len(blocks) + 1), desc=desc, disable=quiet)
        with bar, self.placement.outside_on():
            for part in parts:
                inputs = capture_block_inputs(model, blocks, [calls[i] for i in part], self.device)
                for index in range(len(blocks)):
                    read = self.readers[index] if self.readers is not None else None
                    with self.placement.block(index, read) as block:
                        outputs, as_tuple = run_block(block, inputs)
                    inputs = [inp.with_hidden(h) for inp, h in zip(inputs, outputs)]
                    bar.update(1)
                final: list[torch.Tensor] = [inp.args[0] for inp in inputs]
                del inputs
                with _replayed(blocks, final, as_tuple) as last:
                    for position, i in enumerate(part):
                        last.call = position
                        each(i, invoke(model, calls[i], self.device))
                bar.update(1)

