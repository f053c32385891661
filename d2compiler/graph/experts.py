"""Mixture-of-Experts banks as per-expert linear layers, found from what the block computes.

transformers 5 stores a block's routed experts as 3-D parameters ([E, out, in], e.g.
`mlp.experts.gate_up_proj` and `mlp.experts.down_proj`; [E, in, out] where the forward computes
`x @ W[e]`) and loops over the experts that tokens were routed to. `torch.export` cannot see that
loop per expert, so the block's traced structure has no layer for them. Here no model class is named:

- a *bank* is any parameter of three dimensions inside a block;
- one routed forward of the block runs under `ExpertCalls`, a `TorchFunctionMode` that sees each
  `bank[e]` index and each linear product (`F.linear(x, bank[e])`, `x @ bank[e]`) that uses it,
  recording per bank whether it is used as (out, in) or transposed, and in which order each expert
  calls its banks;
- each bank then gives E `ExpertSlice` layers. Roles come from that order: the banks an expert calls
  first on the same input are its up projections (`gate` then `up` when there are two; a fused
  `gate_up` bank is one `up` layer, the whole [2I, H] matrix), the bank it calls last is `down`;
- from then on the experts module runs under `ExpertCalls` whenever the block runs, and every product
  with `bank[e]` goes through expert e's `ExpertSlice`, so that forward hooks (the passes'
  statistics) fire with exactly the tokens routed to that expert.

A bank is changed in place (`ExpertSlice.weight` is a view of `bank[e]`): the model keeps its own
layout, and its saved folder loads with `from_pretrained`."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)
_EVERY_TOKEN: ContextVar[bool] = ContextVar("d2c_every_token_to_every_expert", default=False)
GETITEM = {torch._C.TensorBase.__getitem__, torch.Tensor.__getitem__}
PRODUCTS = {F.linear, torch.matmul, torch._C.TensorBase.matmul, torch._C.TensorBase.__matmul__, torch.Tensor.__matmul__}


class ExpertSlice(nn.Module):
    """Expert `index` of the 3-D parameter `attr` of `owner`, as a linear layer: `weight` is a view of
    `owner.attr[index]` ((out, in), or (in, out) when `transposed`), read afresh each time (a
    streaming run replaces the parameter). Not registered in the model: the model's layout is kept."""

    def __init__(self, owner: nn.Module, attr: str, index: int, transposed: bool):
        super().__init__()
        object.__setattr__(self, "_owner", weakref.ref(owner))
        self.attr, self.index, self.transposed_weight = attr, index, transposed

    @property
    def bank(self) -> nn.Parameter:
        return getattr(self._owner(), self.attr)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.bank[self.index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.bank.data[self.index].to(x.dtype)
        return x @ w if self.transposed_weight else F.linear(x, w)


@dataclass
class BankUse:
    """How a forward used one bank: transposed or not, and its position in an expert's calls."""

    transposed: bool = False
    order: int = 0


@dataclass
class ExpertCalls(TorchFunctionMode):
    """Sees `bank[e]` indexing and the linear products that use it (see the module docstring). With
    `slices` ({(id(bank), e): ExpertSlice}), each product runs through its slice (hooks fire)."""

    banks: dict[int, str]  # id(parameter) -> name in the owner module
    slices: dict[tuple[int, int], ExpertSlice] | None = None
    uses: dict[str, BankUse] = field(default_factory=dict)
    _tags: dict[int, tuple[int, int, Any]] = field(default_factory=dict)
    _calls: dict[int, list[str]] = field(default_factory=dict)  # expert -> the banks it called, in order

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in GETITEM and args and id(args[0]) in self.banks:
            index = args[1]
            out = func(*args, **kwargs)
            if isinstance(index, (int, torch.Tensor)) and (not isinstance(index, torch.Tensor) or index.numel() == 1):
                self._tags[id(out)] = (id(args[0]), int(index), out)  # keep `out` alive while tagged
            return out
        if func in PRODUCTS and len(args) >= 2 and id(args[1]) in self._tags:
            bank_id, expert, _ = self._tags.pop(id(args[1]))
            transposed = func is not F.linear
            self._record(self.banks[bank_id], expert, transposed)
            if self.slices is not None and (bank_id, expert) in self.slices:
                return self.slices[(bank_id, expert)](args[0])  # the mode is off inside its own handler
        return func(*args, **kwargs)

    def _record(self, bank: str, expert: int, transposed: bool) -> None:
        calls = self._calls.setdefault(expert, [])
        self.uses.setdefault(bank, BankUse(transposed, len(calls)))
        calls.append(bank)


def banks_of(block: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """The 3-D parameters of `block` by the name of the module that owns them: {owner: [(attr, owner)]}."""
    out: dict[str, list[tuple[str, nn.Module]]] = {}
    for owner_name, owner in block.named_modules():
        for attr, param in owner.named_parameters(recurse=False):
            if param.dim() == 3:
                out.setdefault(owner_name, []).append((attr, owner))
    return out


@dataclass
class ExpertBank:
    """One bank of a block: where it is, how it is used, and its role."""

    owner_name: str  # the owning module's name inside the block
    attr: str
    experts: int
    transposed: bool
    role: str

    @property
    def local_name(self) -> str:
        return f"{self.owner_name}.{self.attr}" if self.owner_name else self.attr


def probe_banks(block: nn.Module, run: Callable[[], Any]) -> list[ExpertBank]:
    """Run the block once (`run`) under `ExpertCalls` and describe each bank a routed expert used;
    roles from the call order (see the module docstring). [] when the block has no banks or its
    forward never indexes them per expert (e.g. a grouped-matmul implementation)."""
    found = banks_of(block)
    if not found:
        return []
    ids = {id(getattr(owner, attr)): attr for entries in found.values() for attr, owner in entries}
    mode = ExpertCalls(ids)
    with mode, torch.no_grad():
        run()
    owner_of = {attr: owner_name for owner_name, entries in found.items() for attr, _owner in entries}
    used = sorted(mode.uses.items(), key=lambda item: item[1].order)
    if not used:
        return []
    last = used[-1][1].order
    first_readers = [name for name, use in used if use.order < last]
    banks = []
    for name, use in used:
        if use.order == last and len(used) > 1:
            role = "down"
        elif len(first_readers) == 2:
            role = ("gate", "up")[first_readers.index(name)]
        else:
            role = "up"
        owner = dict(found[owner_of[name]])[name]
        banks.append(ExpertBank(owner_of[name], name, getattr(owner, name).shape[0], use.transposed, role))
    return banks


def attach_experts(block: nn.Module, banks: list[ExpertBank]) -> dict[str, ExpertSlice]:
    """Make every product with a bank's expert go through its `ExpertSlice` whenever the owning
    module runs (its `forward` wrapped once); returns {local layer name: slice}."""
    slices: dict[str, ExpertSlice] = {}
    by_owner: dict[str, list[ExpertBank]] = {}
    for bank in banks:
        by_owner.setdefault(bank.owner_name, []).append(bank)
    for owner_name, owned in by_owner.items():
        owner = block.get_submodule(owner_name) if owner_name else block
        existing = getattr(owner, "_d2c_expert_slices", None)
        if existing is None:
            existing = {}
            for bank in owned:
                for e in range(bank.experts):
                    existing[(bank.attr, e)] = ExpertSlice(owner, bank.attr, e, bank.transposed)
            object.__setattr__(owner, "_d2c_expert_slices", existing)
            _wrap_forward(owner, existing)
        for bank in owned:
            for e in range(bank.experts):
                slices[f"{bank.local_name}.{e}"] = existing[(bank.attr, e)]
    return slices


@contextmanager
def every_token_to_every_expert(enabled: bool) -> Iterator[None]:
    """While enabled (`experts.calibration = "all"`, during the forwards that gather statistics), each
    experts module first runs every token through every expert (outputs discarded: the statistics
    see all tokens), then its routed forward without statistics (the block's output)."""
    token = _EVERY_TOKEN.set(enabled)
    try:
        yield
    finally:
        _EVERY_TOKEN.reset(token)


def _every_route(args: tuple, experts: int) -> tuple | None:
    """The call's arguments with every token routed to every expert at weight zero; None unless the
    call is the transformers-5 experts interface `(hidden_states, top_k_index [T, k], top_k_weights [T, k])`."""
    if len(args) < 3 or not all(isinstance(a, torch.Tensor) for a in args[:3]):
        return None
    hidden, index, weight = args[:3]
    if index.dtype not in (torch.int32, torch.int64) or index.dim() != 2 or tuple(weight.shape) != tuple(index.shape):
        return None
    tokens = index.shape[0]
    every = torch.arange(experts, dtype=index.dtype, device=index.device).expand(tokens, experts).contiguous()
    return (hidden, every, torch.zeros(tokens, experts, dtype=weight.dtype, device=weight.device), *args[3:])


def _wrap_forward(owner: nn.Module, slices: dict[tuple[str, int], ExpertSlice]) -> None:
    """Run `owner`'s forward under `ExpertCalls` routing each expert product through its slice; the
    bank identities are looked up at each call (a streaming run replaces the parameters)."""
    original = owner.forward
    attrs = sorted({a for a, _e in slices})

    def forward(*args: Any, **kwargs: Any) -> Any:
        banks = {id(getattr(owner, attr)): attr for attr in attrs}
        routed = {(bank_id, e): s for (attr, e), s in slices.items() for bank_id, name in banks.items() if name == attr}
        if _EVERY_TOKEN.get():
            every = _every_route(args, getattr(owner, attrs[0]).shape[0])
            if every is not None:
                with ExpertCalls(banks, routed), torch.no_grad():
                    original(*every, **kwargs)  # statistics over every token
                with ExpertCalls(banks, None):
                    return original(*args, **kwargs)  # the routed output, seen by no statistic
            log.warning("experts.calibration = all: %s is not called as (hidden, top_k_index, top_k_weights); its "
                        "experts' statistics stay routed", type(owner).__name__)
        with ExpertCalls(banks, routed):
            return original(*args, **kwargs)

    object.__setattr__(owner, "forward", forward)


def bank_names(model: nn.Module) -> list[str]:
    """The names of the model's expert banks (its parameters of three dimensions)."""
    return [name for name, param in model.named_parameters() if param.dim() == 3]


def use_eager_experts(model: nn.Module) -> bool:
    """Make a transformers model with expert banks run its experts one by one (`eager`; its default
    on recent versions is a grouped matmul over all experts, which no per-expert statistic can see).
    Returns whether the model has banks. The saved config is unaffected."""
    has_banks = bool(bank_names(model))
    setter = getattr(model, "set_experts_implementation", None)
    if has_banks and callable(setter):
        setter("eager")
    return has_banks


def expert_layers(block: nn.Module, prefix: str, banks: list[ExpertBank]) -> list[Any]:
    """Every expert of every bank of `block` as a `LinearLayer` (`PREFIX.mlp.experts.down_proj.3`)."""
    from d2compiler.graph.layers import LinearLayer

    slices = attach_experts(block, banks)
    roles = {bank.local_name: bank.role for bank in banks}
    return [LinearLayer(f"{prefix}.{local}", local, module, roles[local.rpartition(".")[0]])
            for local, module in slices.items()]


@contextmanager
def experts_for_tracing(model: nn.Module) -> Iterator[None]:
    """While `torch.export` traces a block: the model's grouped expert implementation, which has no
    data-dependent loop over the experts (the eager one cannot be traced); eager again after."""
    setter = getattr(model, "set_experts_implementation", None)
    if not callable(setter) or not bank_names(model):
        yield
        return
    try:
        setter("grouped_mm")
    except (ValueError, ImportError, KeyError):  # not available: trace what there is
        yield
        return
    try:
        yield
    finally:
        setter("eager")
