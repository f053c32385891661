"""Finding a model's repeated blocks: the stacks of same-class modules holding linears."""

from __future__ import annotations

from torch import nn

from d2compiler.errors import TraceError
from d2compiler.graph.layers import is_linear_module


def _computes_linear(module: nn.Module) -> bool:
    """A linear, or a module that stands in for one (`replaces_linear`, e.g. a packed 2:4 linear)."""
    return is_linear_module(module) or getattr(type(module), "replaces_linear", False)


def block_stacks(model: nn.Module) -> list[tuple[int, str, nn.ModuleList]]:
    """Every ModuleList of same-class modules holding linears: (parameters and buffers, name, list)."""
    stacks = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1 or not any(_computes_linear(m) for m in module[0].modules()):
            continue
        stacks.append((sum(t.numel() for t in (*module.parameters(), *module.buffers())), name, module))
    return stacks


def other_stacks(model: nn.Module, blocks_path: str) -> list[tuple[str, int, int]]:
    """The stacks of blocks besides `blocks_path` (an encoder-decoder's other stack, a vision tower),
    not nested in it or holding it: (name, blocks, parameters)."""
    return [(name, len(stack), sum(p.numel() for p in stack.parameters())) for _count, name, stack in block_stacks(model)
            if name != blocks_path and not name.startswith(blocks_path + ".") and not blocks_path.startswith(name + ".")]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated blocks: the ModuleList of same-class modules holding linears with the most
    parameters and buffers (decoder layers, encoder layers, ViT layers; also after packing)."""
    best = max(block_stacks(model), key=lambda stack: stack[0], default=None)
    if best is None:
        raise TraceError(
            f"{type(model).__name__}: found no repeated blocks (an nn.ModuleList of identical "
            "layers containing nn.Linear); this model is not supported"
        )
    return best[1], best[2]


def block_signature(block: nn.Module) -> tuple:
    """Blocks with the same class and parameter shapes share one traced structure."""
    return (type(block).__qualname__, tuple((n, tuple(p.shape)) for n, p in block.named_parameters()))


def named_stack(model: nn.Module, path: str) -> nn.ModuleList:
    """The stack of blocks at module path `path` (`model.blocks`); a `TraceError` naming the stacks the
    model has when `path` is not one."""
    stacks = {name: stack for _count, name, stack in block_stacks(model)}
    if path not in stacks:
        known = ", ".join(f"{name} ({len(stack)} blocks)" for name, stack in stacks.items()) or "none"
        raise TraceError(f"model.blocks: {path!r} is not a stack of blocks of {type(model).__name__} (a ModuleList of "
                         f"same-class modules holding linears); its stacks: {known}")
    return stacks[path]
