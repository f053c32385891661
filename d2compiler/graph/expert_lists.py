"""Mixture-of-Experts whose experts are a `ModuleList` or `ModuleDict` of modules with their own
linears (Switch Transformers and NLLB-MoE in transformers 5, older transformers layouts, other
libraries), found from the module tree and one forward; no model class is named.

- An *expert list* is an `nn.ModuleList` or `nn.ModuleDict` inside a block with at least two entries
  of one class that each hold a linear, whose entries see only some of their parent's tokens in one
  eager forward (a list that every token goes through is not experts: it is traced as usual). The
  parent (the *MoE module*, which holds the router too) routes tokens to them in a data-dependent
  loop, which `torch.export` cannot trace.
- While a block is traced, each MoE module is one opaque call (`d2c::opaque_module`, a custom op
  whose outputs have the shapes an eager call on the same input gave), so the rest of the block
  (attention, norms, residuals) traces as it does without experts.
- The roles of the linears inside a MoE module come from that eager forward (`ListProbe`): in each
  expert, and in each other child module that holds linears (a shared expert), the linears that
  read the MoE module's input (no other linear's output) are input projections and the others
  `down`; of two input projections, the one whose output reaches an activation is `gate`, the other
  `up`. A linear directly in the MoE module, or the one linear of a child module with as many
  outputs as the list has experts, is a `router`: a score, left out of the `Linear` target. An expert that no token of that forward reached takes its siblings' roles, by the
  linear's name inside the expert.
- From then on the experts are ordinary linears: statistics hooks see exactly the tokens routed to
  each one, and every pass and export works on them as on any linear.
- `experts.calibration = "all"`: while statistics are gathered, each MoE module first calls every
  expert of its lists on all of its input's tokens (outputs discarded), then runs its routed forward
  with the hooks of the lists' modules silenced, so statistics see every token once and the block's
  output stays the routed one (`attach_list_statistics`). An expert that cannot be called on the
  tokens alone keeps routed statistics, with a warning. `"weighted"`: each routed token's statistics
  weighted by its routing weight, found as the gradient of the module's output with respect to its
  experts' outputs (`graph.list_weights`)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from d2compiler.graph.expert_calls import ACTIVATIONS
from d2compiler.graph.experts import statistics_mode
from d2compiler.graph.layers import is_linear_module, weight_is_transposed
from d2compiler.graph.list_weights import outside_experts, routing_weights, silenced, weighted_statistics

log = logging.getLogger(__name__)


def find_expert_lists(block: nn.Module) -> dict[str, int]:
    """{name inside `block` of each expert list: its number of experts} (see the module docstring)."""
    found = {}
    for name, module in block.named_modules():
        if not name or not isinstance(module, (nn.ModuleList, nn.ModuleDict)) or len(module) < 2:
            continue
        entries = list(module.values() if isinstance(module, nn.ModuleDict) else module)
        if len({type(entry) for entry in entries}) == 1 and all(any(map(is_linear_module, e.modules())) for e in entries):
            found[name] = len(module)
    return found


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


@dataclass
class ListProbe:
    """What one eager forward showed of a block's MoE modules: the roles of their linears (by name
    inside the block), the linears that share an input, and each MoE module's outputs."""

    lists: dict[str, int]
    roles: dict[str, str] = field(default_factory=dict)
    input_groups: list[list[str]] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)  # MoE module name -> its output on the sample

    @property
    def owners(self) -> list[str]:
        """The MoE modules: the parents of the expert lists."""
        return sorted({_parent(name) for name in self.lists})


class _LinearFlow(TorchFunctionMode):
    """Carries, for every floating tensor computed inside a MoE module, the set of linears whose
    outputs it derives from (a linear's own output starts a new set), and records the linears whose output
    reaches an activation function."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: dict[int, tuple[frozenset[str], torch.Tensor]] = {}
        self.activated: set[str] = set()

    def of(self, tensor: Any) -> frozenset[str]:
        """The linears `tensor`'s values derive from; none for an integer or boolean tensor (token
        indices and masks select values, they carry none)."""
        entry = self.sources.get(id(tensor)) if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() else None
        return entry[0] if entry is not None and entry[1] is tensor else frozenset()

    def mark(self, tensor: torch.Tensor, names: frozenset[str]) -> None:
        self.sources[id(tensor)] = (names, tensor)

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        names = frozenset().union(*(self.of(a) for a in pytree.tree_leaves((args, kwargs))))
        if names:
            if func in ACTIVATIONS:
                self.activated |= names
            for result in pytree.tree_leaves(out):
                if isinstance(result, torch.Tensor) and result.is_floating_point():
                    self.mark(result, names)
        return out


def probe_expert_lists(block: nn.Module, run: Callable[[], Any]) -> ListProbe:
    """Run the block once (`run`) and describe its expert lists (see the module docstring)."""
    probe = ListProbe(find_expert_lists(block))
    if not probe.lists:
        return probe
    flow = _LinearFlow()
    reads_input: dict[str, bool] = {}
    rows: dict[str, int] = {}  # MoE module or linear -> the rows (tokens) of its first call's input
    hooks = []
    for owner in probe.owners:
        module = block.get_submodule(owner)

        def output(_m: nn.Module, args: tuple, out: Any, owner: str = owner) -> None:  # None: the output stays
            probe.outputs.setdefault(owner, out)
            rows.setdefault(owner, _rows(args))

        hooks.append(module.register_forward_hook(output))
        for local, linear in module.named_modules():
            if local and is_linear_module(linear):
                name = f"{owner}.{local}" if owner else local

                def seen(_m: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
                    reads_input.setdefault(name, not flow.of(args[0]))
                    rows.setdefault(name, _rows(args))
                    flow.mark(out, frozenset({name}))

                hooks.append(linear.register_forward_hook(seen))
    try:
        with torch.no_grad(), flow:
            run()
    finally:
        for hook in hooks:
            hook.remove()
    probe.lists = {name: count for name, count in probe.lists.items() if _routed(block, name, rows)}
    probe.outputs = {owner: out for owner, out in probe.outputs.items() if owner in probe.owners}
    for owner in probe.owners:
        _assign_roles(block, owner, probe, reads_input, flow.activated)
    return probe


def _rows(args: tuple) -> int:
    """The rows (tokens) of a call's first tensor argument: its size over all but the last dimension."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return 0 if first is None or first.dim() == 0 else first.numel() // first.shape[-1]


def _routed(block: nn.Module, expert_list: str, rows: dict[str, int]) -> bool:
    """Whether the entries of `expert_list` saw only some of the MoE module's tokens (one of them
    fewer than all, or none): routed experts, not a list of modules every token goes through."""
    total = rows.get(_parent(expert_list))
    if not total:
        return False
    for key in block.get_submodule(expert_list)._modules:
        seen = [count for name, count in rows.items() if name.startswith(f"{expert_list}.{key}.")]
        if not seen or min(seen) < total:
            return True
    return False


def _outputs(linear: nn.Module) -> int:
    return linear.weight.shape[1 if weight_is_transposed(linear) else 0]


def _assign_roles(block: nn.Module, owner: str, probe: ListProbe, reads_input: dict[str, bool], activated: set[str]) -> None:
    """Roles and input groups of the linears of MoE module `owner` (see the module docstring)."""
    module = block.get_submodule(owner)
    prefix = f"{owner}." if owner else ""
    groups: dict[str, list[str]] = {}  # the child module (an expert, a shared expert) -> its linears
    for local, linear in module.named_modules():
        if local and is_linear_module(linear):
            expert_list = next((name for name in probe.lists if (prefix + local).startswith(name + ".")), None)
            if expert_list is not None:
                child = expert_list + "." + (prefix + local)[len(expert_list) + 1 :].split(".")[0]
            else:
                child = prefix + local.split(".")[0] if "." in local else ""
            groups.setdefault(child, []).append(prefix + local)
    for child, names in groups.items():
        if not child or _scores_experts(block, child, names, probe.lists):  # a router
            probe.roles.update(dict.fromkeys(names, "router"))
            probe.input_groups += [[n] for n in names]
            continue
        seen = [n for n in names if n in reads_input]
        if not seen:
            continue  # an expert no token reached: its siblings' roles, below
        inputs = [n for n in seen if reads_input[n]]
        gated = len(inputs) == 2 and sum(n in activated for n in inputs) == 1
        for n in names:
            probe.roles[n] = "down" if n in seen and not reads_input[n] else ("gate" if gated and n in activated else "up")
        probe.input_groups += [sorted(inputs)] * bool(inputs) + [[n] for n in names if n not in inputs]
    for expert_list in probe.lists:
        _roles_from_siblings(probe, expert_list, groups)


def _scores_experts(block: nn.Module, child: str, names: list[str], lists: dict[str, int]) -> bool:
    """Whether a child module outside the expert lists is a router: its one linear has as many
    outputs as a list of the same MoE module has experts."""
    if len(names) != 1:
        return False
    return _outputs(block.get_submodule(names[0])) in {count for name, count in lists.items() if _parent(name) == _parent(child)}


def _roles_from_siblings(probe: ListProbe, expert_list: str, groups: dict[str, list[str]]) -> None:
    """Give the experts of `expert_list` that no token reached the roles of a reached sibling."""
    entries = {child: names for child, names in groups.items() if _parent(child) == expert_list}
    by_inner: dict[str, str] = {}
    for child, names in entries.items():
        for n in names:
            if n in probe.roles:
                by_inner.setdefault(n[len(child) + 1 :], probe.roles[n])
    for child, names in entries.items():
        missing = [n for n in names if n not in probe.roles]
        for n in missing:
            probe.roles[n] = by_inner.get(n[len(child) + 1 :], "other")
        if missing:
            inputs = sorted(n for n in names if probe.roles[n] in ("gate", "up"))
            probe.input_groups += [inputs] * bool(inputs) + [[n] for n in names if n not in inputs]


_OPAQUE: dict[int, list[tuple[torch.Size, torch.dtype]]] = {}
_HANDLES = itertools.count()


@torch.library.custom_op("d2c::opaque_module", mutates_args=())
def _opaque_module(inputs: list[torch.Tensor], handle: int) -> list[torch.Tensor]:
    """Stands for a MoE module while its block is traced; never run outside tracing."""
    raise RuntimeError("d2c::opaque_module only stands for a Mixture-of-Experts module while a block is traced")


@_opaque_module.register_fake
def _opaque_module_fake(inputs: list[torch.Tensor], handle: int) -> list[torch.Tensor]:
    return [inputs[0].new_empty(shape, dtype=dtype) for shape, dtype in _OPAQUE[handle]]


@contextmanager
def opaque_moe_modules(block: nn.Module, probe: ListProbe) -> Iterator[None]:
    """While tracing: each MoE module of `probe` is one `d2c::opaque_module` call returning tensors of
    the shapes it returned in the probe (its own forward afterwards)."""
    patched = []
    try:
        for owner in probe.owners:
            if owner not in probe.outputs:
                continue
            module = block.get_submodule(owner)
            leaves, spec = pytree.tree_flatten(probe.outputs[owner])
            if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
                continue
            handle = next(_HANDLES)
            _OPAQUE[handle] = [(t.shape, t.dtype) for t in leaves]

            def forward(*args: Any, _handle: int = handle, _spec: Any = spec, **kwargs: Any) -> Any:
                tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                return pytree.tree_unflatten(list(torch.ops.d2c.opaque_module(tensors, _handle)), _spec)

            patched.append((module, handle, module.__dict__.get("forward")))  # its own forward, or a wrapper of ours
            object.__setattr__(module, "forward", forward)
        yield
    finally:
        for module, handle, previous in patched:
            if previous is None:
                del module.forward
            else:
                object.__setattr__(module, "forward", previous)
            _OPAQUE.pop(handle, None)


def attach_list_statistics(block: nn.Module, lists: dict[str, int]) -> None:
    """Let each MoE module of `block` holding the expert `lists` serve `experts.calibration = "all"`
    and `"weighted"` (see the module docstring); once per module, a no-op in `routed` mode."""
    for owner in {_parent(name) for name in lists}:
        module = block.get_submodule(owner) if owner else block
        if getattr(module, "_d2c_list_statistics", False):
            continue
        experts = [entry for name in lists if _parent(name) == owner
                   for entry in block.get_submodule(name)._modules.values() if entry is not None]
        _wrap_for_statistics(module, experts)
        object.__setattr__(module, "_d2c_list_statistics", True)


def _wrap_for_statistics(module: nn.Module, experts: list[nn.Module]) -> None:
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        mode = statistics_mode()
        if mode == "weighted":
            return _weighted(original, module, experts, args, kwargs)
        hidden = next((a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        if mode != "all" or hidden is None:
            return original(*args, **kwargs)
        tokens = hidden.reshape(-1, hidden.shape[-1])
        inner = [m for expert in experts for m in expert.modules()]
        try:
            with torch.no_grad(), silenced(inner):
                for expert in experts:
                    expert(tokens[:1])  # can the expert take the tokens alone? (seen by no statistic)
        except (TypeError, RuntimeError) as err:
            log.warning("experts.calibration = all: the experts of %s cannot be called on the tokens alone (%s); "
                        "their statistics stay routed", type(module).__name__, err)
            return original(*args, **kwargs)
        with torch.no_grad():
            for expert in experts:
                expert(tokens)
        with silenced(inner):
            return original(*args, **kwargs)  # the routed output, seen by no statistic of the experts

    object.__setattr__(module, "forward", forward)


def _weighted(original: Callable[..., Any], module: nn.Module, experts: list[nn.Module], args: tuple, kwargs: dict) -> Any:
    """`weighted` statistics of one MoE module call (`graph.list_weights`); its routed output."""
    out, weights = routing_weights(original, experts, args, kwargs)
    if weights is None:
        log.warning("experts.calibration = weighted: the output of %s is not a weighted sum of its experts' outputs; "
                    "their statistics stay routed", type(module).__name__)
        with silenced(outside_experts(module, experts)), torch.no_grad():  # the experts' routed statistics (the others saw their tokens)
            original(*args, **kwargs)
        return out
    weighted_statistics(original, module, experts, weights, args, kwargs)
    return out
