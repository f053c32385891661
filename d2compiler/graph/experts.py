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
  first on the same input are its up projections (`gate` then `up` when there are two), the bank it
  calls last is `down`. A fused bank (one first bank, [E, 2I, H]) is cut where the forward cuts its
  product: the pieces it takes of the output features (`chunk`/`split`, or slices such as gpt-oss's
  interleaved `[..., ::2]` / `[..., 1::2]`) become row slices of each expert (`...gate_up_proj.3[gate]`,
  like GPT-2's `c_attn[q]`), and the piece whose values reach an activation function (followed
  through the elementwise ops in between) is `gate`, the other `up`. A fused bank whose pieces cannot
  be told apart this way stays one `gate_up` layer per expert;
- from then on the experts module runs under `ExpertCalls` whenever the block runs, and every product
  with `bank[e]` goes through expert e's `ExpertSlice`, so that forward hooks (the passes'
  statistics) fire with exactly the tokens routed to that expert.

With `experts.calibration = "weighted"`, the forwards that gather statistics run each experts module
twice: once for the statistics, with every product's input rows scaled by √w (w: the routing weight
of that token for that expert, found from the call's `(hidden, top_k_index, top_k_weights)` and the
rows the forward takes of `hidden`) and its output scaled back, so that every statistic hook sees
x·√w and y·√w (a Hessian Σ w·x xᵀ); then the routed forward that gives the block's output, seen by
no statistic.

A bank is changed in place (`ExpertSlice.weight` is a view of `bank[e]`): the model keeps its own
layout, and its saved folder loads with `from_pretrained`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from d2compiler.graph.expert_calls import ExpertCalls, ExpertSlice, Pieces, RoutingUnseen
from d2compiler.graph.expert_store import ExpertStore, store_of
from d2compiler.graph.packing import QUANT_BUFFERS, bank_buffer_name

log = logging.getLogger(__name__)
_STATISTICS: ContextVar[str] = ContextVar("d2c_expert_statistics", default="routed")  # experts.calibration

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
    pieces: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # a fused bank: role -> its rows

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
    stores = [store for entries in found.values() if (store := store_of(entries[0][1])) is not None]
    mode = ExpertCalls(ids, store=stores[0] if stores else None)
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
        pieces = _gate_and_up(mode.pieces.get(name)) if role == "up" and len(first_readers) == 1 else {}
        banks.append(ExpertBank(owner_of[name], name, getattr(owner, name).shape[0], use.transposed,
                                "gate_up" if pieces or (role == "up" and _is_cut(mode.pieces.get(name))) else role, pieces))
    return banks


def _is_cut(pieces: Pieces | None) -> bool:
    return pieces is not None and len(pieces.rows) >= 2


def _gate_and_up(pieces: Pieces | None) -> dict[str, tuple[int, int, int]]:
    """{"gate": rows, "up": rows} for a fused bank cut into two pieces that cover its rows once, one
    of which reached an activation; {} otherwise (left whole)."""
    if pieces is None or len(pieces.rows) != 2 or pieces.gate is None:
        return {}
    covered = sorted(r for start, stop, step in pieces.rows for r in range(start, stop, step))
    if covered != list(range(pieces.width)):
        return {}
    gate = pieces.rows[pieces.gate]
    return {"gate": gate, "up": pieces.rows[1 - pieces.gate]}


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
def expert_statistics(mode: str) -> Iterator[None]:
    """While gathering statistics, the tokens an expert's statistics see (`experts.calibration`):
    `routed` (its own tokens), `all` (each experts module first runs every token through every expert,
    outputs discarded, then its routed forward without statistics) or `weighted` (its own tokens,
    weighted by their routing weights; see the module docstring)."""
    token = _STATISTICS.set(mode)
    try:
        yield
    finally:
        _STATISTICS.reset(token)


def statistics_mode() -> str:
    """The `experts.calibration` mode of the statistics forward now running (`routed` outside one)."""
    return _STATISTICS.get()


def _routing(args: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(hidden, top_k_index [T, k], top_k_weights [T, k]) of a call of the transformers-5 experts
    interface; None for any other call."""
    if len(args) < 3 or not all(isinstance(a, torch.Tensor) for a in args[:3]):
        return None
    hidden, index, weight = args[:3]
    if index.dtype not in (torch.int32, torch.int64) or index.dim() != 2 or tuple(weight.shape) != tuple(index.shape):
        return None
    return hidden, index, weight


def _statistics_forward(original: Callable, args: tuple, kwargs: dict, banks: dict[int, str],
                        routed: dict[tuple[int, int], ExpertSlice], routing: tuple, mode: str, experts: int,
                        store: ExpertStore | None = None) -> bool:
    """The forward the statistics see (outputs discarded): every token through every expert at weight
    zero (`all`), or the routed tokens with √w-scaled rows (`weighted`). False when the forward does
    not take its tokens as `hidden[token_idx]` (weighted only: nothing was recorded, see the caller)."""
    hidden, index, weight = routing
    with torch.no_grad():
        if mode == "all":
            every = torch.arange(experts, dtype=index.dtype, device=index.device).expand(index.shape[0], experts).contiguous()
            with ExpertCalls(banks, routed, store=store):
                original(hidden, every, torch.zeros(every.shape, dtype=weight.dtype, device=weight.device), *args[3:], **kwargs)
            return True
        try:
            with ExpertCalls(banks, routed, routing=routing, store=store):
                original(*args, **kwargs)
        except RoutingUnseen:
            return False
    return True


def _wrap_forward(owner: nn.Module, slices: dict[tuple[str, int], ExpertSlice]) -> None:
    """Run `owner`'s forward under `ExpertCalls` routing each expert product through its slice; the
    bank identities are looked up at each call (a streaming run replaces the parameters)."""
    original = owner.forward
    attrs = sorted({a for a, _e in slices})

    def forward(*args: Any, **kwargs: Any) -> Any:
        banks = {id(getattr(owner, attr)): attr for attr in attrs}
        store = store_of(owner)
        routed = {(bank_id, e): s for (attr, e), s in slices.items() for bank_id, name in banks.items() if name == attr}
        mode = _STATISTICS.get()
        if mode != "routed":
            routing = _routing(args)
            experts = getattr(owner, attrs[0]).shape[0]
            if routing is not None and _statistics_forward(original, args, kwargs, banks, routed, routing, mode, experts, store):
                with ExpertCalls(banks, None, store=store, start=_take_start(store)):
                    return original(*args, **kwargs)  # the routed output, seen by no statistic
            log.warning("experts.calibration = %s: %s is not called as (hidden, top_k_index, top_k_weights) with "
                        "hidden[token_idx] per expert; its experts' statistics stay routed", mode, type(owner).__name__)
        with ExpertCalls(banks, routed, store=store, start=_take_start(store)):
            return original(*args, **kwargs)

    object.__setattr__(owner, "forward", forward)


def _take_start(store: ExpertStore | None) -> torch.Tensor | None:
    """The accumulator the store holds for this output call (`graph.expert_store`), taken once."""
    if store is None:
        return None
    start, store.start, store.started = store.start, None, False
    return start


def bank_parameter(model: nn.Module, name: str) -> torch.Tensor | None:
    """The 3-D parameter (bank) `name` of `model`, or None when `name` is not one."""
    try:
        param = model.get_parameter(name)
    except AttributeError:
        return None
    return param if param.dim() == 3 else None


def bank_quant_buffers(model: nn.Module, name: str, *, take: bool = False) -> list[torch.Tensor] | None:
    """The stacked (scale, zero point) of the bank `name`, [E, out, groups] each, kept on its owner
    module (`graph.packing.bank_buffer_name`); None when the bank is not quantized. `take`: remove
    them from the owner."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    keys = [bank_buffer_name(attr, b) for b in QUANT_BUFFERS]
    if not all(key in owner._buffers for key in keys):
        return None
    return [owner._buffers.pop(key) if take else owner._buffers[key] for key in keys]  # type: ignore[misc]


def is_bank_expert(model: nn.Module, layer: str) -> bool:
    """Whether a recorded layer name is one expert of a bank (`...experts.gate_up_proj.3`)."""
    owner, _, index = layer.rpartition(".")
    return index.isdigit() and bank_parameter(model, owner) is not None


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
    from d2compiler.graph.layers import LinearLayer, slice_name

    slices = attach_experts(block, banks)
    by_name = {bank.local_name: bank for bank in banks}
    layers = []
    for local, module in slices.items():
        bank = by_name[local.rpartition(".")[0]]
        if not bank.pieces:
            layers.append(LinearLayer(f"{prefix}.{local}", local, module, bank.role))
        for role, rows in bank.pieces.items():  # a fused bank: each expert's gate and up rows
            named = slice_name(local, role)
            layers.append(LinearLayer(f"{prefix}.{named}", named, module, role, rows=rows))
    return layers


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
