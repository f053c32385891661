"""Where tensors live: the one place that decides it, for pruning and for evaluation alike.

A model's repeated blocks are visited one at a time: the block under work is on the compute device
(read from the weight files first when the model is streamed), and afterwards it goes back to the
CPU, or is released to the meta device when streaming. Everything outside the blocks (embeddings,
final norm, head) is moved to the compute device only while a forward pass needs it
(`outside_on`). Captured inputs, statistics and Hessians are made on the compute device by whoever
computes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from d2compiler.graph.blocks import find_blocks, named_stack

if TYPE_CHECKING:
    from d2compiler.execution.streaming import StreamedModel

Reader = Callable[[str], torch.Tensor]  # a tensor by its full name (`model.layers.3.mlp.up_proj.weight`)


def _move(modules: Iterable[nn.Module], device: torch.device) -> None:
    """Move the parameters and buffers of `modules` (not their submodules') to `device`, except those
    on the meta device (not loaded: expert banks held one group at a time, `graph.expert_store`)."""
    for module in modules:
        for param in module._parameters.values():
            if param is not None and not param.is_meta and param.device != device:
                param.data = param.data.to(device)
        for key, buf in module._buffers.items():
            if buf is not None and not buf.is_meta and buf.device != device:
                module._buffers[key] = buf.to(device)


def move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside `blocks` to `device`."""
    inside = {id(m) for m in blocks.modules()}
    _move([module for module in model.modules() if id(module) not in inside], device)


def move_loaded(module: nn.Module, device: torch.device) -> None:
    """`module.to(device)` for every parameter and buffer that is not on the meta device."""
    _move(module.modules(), device)


class Placement:
    """Places `model`'s blocks on `device` one at a time (see the module docstring). With `streamed`,
    a block's weights are read when it is placed and released when it leaves."""

    def __init__(self, model: nn.Module, device: torch.device, streamed: StreamedModel | None = None,
                 blocks_path: str | None = None):
        self.model, self.device, self.streamed = model, device, streamed
        if blocks_path is None:
            self.blocks_path, self.blocks = find_blocks(model)
        else:  # a stack the recipe names (`model.blocks`)
            self.blocks_path, self.blocks = blocks_path, named_stack(model, blocks_path)

    @contextmanager
    def block(self, index: int, read: Reader | None = None) -> Iterator[nn.Module]:
        """Block `index` on the compute device (read through `read`, default the source files, when
        streaming); afterwards back on the CPU, or released to the meta device when streaming."""
        block = self.blocks[index]
        if self.streamed is not None:
            self.streamed.load_block(index, read, self.device)
        move_loaded(block, self.device)
        try:
            yield block
        finally:
            if self.streamed is not None:
                self.streamed.release_block(index)
            else:
                block.to("cpu")

    @contextmanager
    def outside_on(self) -> Iterator[None]:
        """The parameters outside the blocks (read first when streaming released them) on the compute
        device; afterwards back on the CPU."""
        if self.streamed is not None:
            self.streamed.ensure_outside()
        move_outside_blocks(self.model, self.blocks, self.device)
        try:
            yield
        finally:
            move_outside_blocks(self.model, self.blocks, torch.device("cpu"))
