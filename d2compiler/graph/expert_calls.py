"""What one forward of an experts module does with its 3-D banks, seen through a
`TorchFunctionMode` (`ExpertCalls`): each `bank[e]` index and the linear product that uses it, the
pieces its output is cut into (and the piece that reaches an activation), and, when statistics are
gathered, each product routed through expert e's `ExpertSlice` (optionally with its rows weighted by
their routing weights). `graph.experts` builds the layers and roles from what this records."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from d2compiler.errors import D2Error
from d2compiler.graph.expert_store import ExpertStore, store_of
from d2compiler.graph.packing import bank_buffer_name

GETITEM = {torch._C.TensorBase.__getitem__, torch.Tensor.__getitem__}
PRODUCTS = {F.linear, torch.matmul, torch._C.TensorBase.matmul, torch._C.TensorBase.__matmul__, torch.Tensor.__matmul__}


class ExpertSlice(nn.Module):
    """Expert `index` of the 3-D parameter `attr` of `owner`, as a linear layer: `weight` is a view of
    `owner.attr[index]` ((out, in), or (in, out) when `transposed`), read afresh each time (a
    streaming run replaces the parameter), or the owner's `ExpertStore` tensor of that expert when it
    has one (`graph.expert_store`). Not registered in the model: the model's layout is kept."""

    def __init__(self, owner: nn.Module, attr: str, index: int, transposed: bool):
        super().__init__()
        object.__setattr__(self, "_owner", weakref.ref(owner))
        self.attr, self.index, self.transposed_weight = attr, index, transposed

    @property
    def bank(self) -> nn.Parameter:
        return getattr(self._owner(), self.attr)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        store = store_of(self._owner())
        return store.weight(self.attr, self.index) if store is not None else self.bank[self.index]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of `weight`, known whether or not the expert is loaded."""
        return tuple(self.bank.shape[1:])

    def set_row_buffer(self, name: str, rows: slice, value: torch.Tensor) -> None:
        """Write this expert's `rows` (its output features) of the bank's per-row buffer `name` (e.g. a
        quantization scale), kept on the owner module stacked over the experts as `bank_buffer_name(attr,
        name)`, [E, out, ...], zeros until each expert has written: the buffer travels with the model's
        state dict as the bank does."""
        owner, bank = self._owner(), self.bank
        key = bank_buffer_name(self.attr, name)
        shape = (bank.shape[0], bank.shape[2] if self.transposed_weight else bank.shape[1], *value.shape[1:])
        current = getattr(owner, key, None)
        if not isinstance(current, torch.Tensor) or tuple(current.shape) != shape or current.dtype != value.dtype:
            current = torch.zeros(shape, dtype=value.dtype, device=value.device)
            owner.register_buffer(key, current)
        current[self.index, rows] = value.to(current.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.detach().to(x.dtype)
        return x @ w if self.transposed_weight else F.linear(x, w)


@dataclass
class BankUse:
    """How a forward used one bank: transposed or not, and its position in an expert's calls."""

    transposed: bool = False
    order: int = 0


ACTIVATIONS = {F.silu, F.gelu, F.relu, F.sigmoid, F.tanh, F.softplus, F.mish, torch.sigmoid, torch.tanh, torch.relu,
               torch._C.TensorBase.sigmoid, torch._C.TensorBase.tanh, torch._C.TensorBase.relu}
CUTS = {torch.chunk, torch._C.TensorBase.chunk, torch.split, torch._C.TensorBase.split, torch.tensor_split,
        torch._C.TensorBase.tensor_split}


@dataclass
class Pieces:
    """How one expert's product with a fused bank is cut along its output features: the pieces' rows
    (start, stop, step) in the order they were taken, and the piece that reached an activation."""

    width: int
    rows: list[tuple[int, int, int]] = field(default_factory=list)
    gate: int | None = None


@dataclass
class ExpertCalls(TorchFunctionMode):
    """Sees `bank[e]` indexing and the linear products that use it (see the module docstring). With
    `slices` ({(id(bank), e): ExpertSlice}), each product runs through its slice (hooks fire);
    without (probing), the first product of each bank is followed to see where it is cut (`pieces`)."""

    banks: dict[int, str]  # id(parameter) -> name in the owner module
    slices: dict[tuple[int, int], ExpertSlice] | None = None
    uses: dict[str, BankUse] = field(default_factory=dict)
    pieces: dict[str, Pieces] = field(default_factory=dict)  # bank -> how its first product was cut
    routing: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # weighted statistics: (hidden, index, weights)
    store: ExpertStore | None = None  # banks held one group at a time: bank[e] comes from it (`graph.expert_store`)
    start: torch.Tensor | None = None  # the call's zeros_like(hidden) accumulator is this tensor instead (taken once)
    _rows: torch.Tensor | None = None  # the token rows the forward last took of `hidden`
    _tags: dict[int, tuple[int, int, Any]] = field(default_factory=dict)
    _calls: dict[int, list[str]] = field(default_factory=dict)  # expert -> the banks it called, in order
    _followed: dict[int, tuple[str, frozenset[int], Any]] = field(default_factory=dict)  # id -> (bank, pieces, tensor)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.start is not None and func is torch.zeros_like and self._fits(args[0], kwargs):
            start, self.start = self.start, None
            self.store.started = True
            return start
        if self.routing is not None and func in GETITEM and args and args[0] is self.routing[0] and \
                isinstance(args[1], torch.Tensor) and args[1].dtype in (torch.int32, torch.int64):
            self._rows = args[1]  # hidden[token_idx]: the tokens of the expert about to run
        if func in GETITEM and args and id(args[0]) in self.banks:
            index = args[1]
            single = isinstance(index, (int, torch.Tensor)) and (not isinstance(index, torch.Tensor) or index.numel() == 1)
            out = func(*args, **kwargs) if self.store is None else self._stored(self.banks[id(args[0])], args[0], index, single)
            if single:
                self._tags[id(out)] = (id(args[0]), int(index), out)  # keep `out` alive while tagged
            return out
        if func in PRODUCTS and len(args) >= 2 and id(args[1]) in self._tags:
            bank_id, expert, weight = self._tags.pop(id(args[1]))
            transposed = func is not F.linear
            self._record(self.banks[bank_id], expert, transposed)
            if weight.is_meta and self.store is not None:  # an expert that is not resident: contributes nothing
                out = args[0].new_zeros(*args[0].shape[:-1], weight.shape[-1] if transposed else weight.shape[0])
            elif self.slices is not None and (bank_id, expert) in self.slices:
                if self.routing is not None:
                    return self._weighted(self.slices[(bank_id, expert)], args[0], expert)
                return self.slices[(bank_id, expert)](args[0])  # the mode is off inside its own handler
            else:
                out = func(*args, **kwargs)
            name = self.banks[bank_id]
            if self.slices is None and name not in self.pieces and isinstance(out, torch.Tensor):
                self.pieces[name] = Pieces(out.shape[-1])
                self._followed[id(out)] = (name, frozenset(), out)  # the whole product: no piece yet
            return out
        if self._followed:
            return self._follow(func, args, kwargs)
        return func(*args, **kwargs)

    def _fits(self, like: torch.Tensor, kwargs: dict) -> bool:
        start = self.start
        return (tuple(like.shape) == tuple(start.shape) and kwargs.get("dtype", like.dtype) == start.dtype
                and torch.device(kwargs.get("device", like.device)) == start.device)

    def _stored(self, attr: str, bank: torch.Tensor, index: Any, single: bool) -> torch.Tensor:
        """`bank[index]` of a bank held in the store: the resident tensor, or a meta tensor of its shape."""
        if not single:
            raise D2Error(f"bank {attr} is indexed by {type(index).__name__} {getattr(index, 'shape', '')}, not by one expert: "
                          "experts held one group at a time need a forward that takes bank[e] per expert")
        resident = self.store.get(attr, int(index))
        return resident if resident is not None else torch.empty(bank.shape[1:], dtype=bank.dtype, device="meta")

    def _follow(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """While probing: record the pieces taken of a followed product's features, carry each piece's
        identity through the ops that use it, and note the piece that reaches an activation."""
        out = func(*args, **kwargs)
        source = next((self._followed[id(a)] for a in args if isinstance(a, torch.Tensor) and id(a) in self._followed), None)
        if source is None:
            return out
        bank, from_pieces, tensor = source
        pieces = self.pieces[bank]
        if not from_pieces and tensor is args[0]:  # the whole product, being cut
            cut = _cut_rows(func, args, kwargs, pieces.width)
            if cut is not None:
                outs = out if isinstance(out, (tuple, list)) else [out]
                for rows, piece in zip(cut, outs):
                    if rows not in pieces.rows:
                        pieces.rows.append(rows)
                    self._followed[id(piece)] = (bank, frozenset({pieces.rows.index(rows)}), piece)
                return out
        if func in ACTIVATIONS and len(from_pieces) == 1 and pieces.gate is None:
            pieces.gate = next(iter(from_pieces))
        inputs = {p for a in args if isinstance(a, torch.Tensor) and id(a) in self._followed for p in self._followed[id(a)][1]}
        for result in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(result, torch.Tensor):
                self._followed[id(result)] = (bank, frozenset(inputs), result)
        return out

    def _weighted(self, expert_slice: ExpertSlice, x: torch.Tensor, expert: int) -> torch.Tensor:
        """The slice's product with its input rows scaled by √w and its output scaled back (the hooks
        see the weighted rows; the caller gets the plain product)."""
        _hidden, index, weights = self.routing
        if self._rows is None or x.shape[0] != self._rows.shape[0]:
            raise RoutingUnseen
        per_token = (weights * (index == expert)).sum(-1).to(x.dtype)  # a token is routed to an expert once at most
        root = per_token[self._rows].clamp_min(torch.finfo(x.dtype).tiny).sqrt().unsqueeze(-1)
        return expert_slice(x * root) / root

    def _record(self, bank: str, expert: int, transposed: bool) -> None:
        calls = self._calls.setdefault(expert, [])
        self.uses.setdefault(bank, BankUse(transposed, len(calls)))
        calls.append(bank)


class RoutingUnseen(Exception):
    """The experts forward did not take its tokens as `hidden[token_idx]`: no weights per row."""


def _cut_rows(func: Callable, args: tuple, kwargs: dict, width: int) -> list[tuple[int, int, int]] | None:
    """The output-feature rows (start, stop, step) of each piece `func` takes of a product with
    `width` features: `chunk`/`split` on the last dimension, or indexing with a slice on it."""
    if func in GETITEM and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        *leading, last = index
        whole = all(i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in leading)
        on_last_dim = any(i is Ellipsis for i in leading) or len(index) == args[0].dim()
        return [last.indices(width)] if isinstance(last, slice) and whole and on_last_dim else None
    if func not in CUTS:
        return None
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    tensor = args[0]
    if dim not in (-1, tensor.dim() - 1):
        return None
    spec = kwargs.get("split_size_or_sections", kwargs.get("chunks", args[1] if len(args) > 1 else None))
    if func in (torch.chunk, torch._C.TensorBase.chunk) and isinstance(spec, int):
        size = -(-width // spec)
        sizes = [min(size, width - i) for i in range(0, width, size)]
    elif isinstance(spec, int):
        sizes = [min(spec, width - i) for i in range(0, width, spec)]
    elif isinstance(spec, (list, tuple)):
        sizes = list(spec)
    else:
        return None
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(a, a + n, 1) for a, n in zip(starts, sizes)]
