"""Where a model tensor lives in a checkpoint stored in another layout, learnt from transformers'
own save-time conversion, so that a streaming run can read (and write) one block at a time.

transformers 5 holds a Mixture-of-Experts' experts as 3-D banks (`mlp.experts.gate_up_proj`
[E, 2I, H]) but reads and writes checkpoints in the layout the model was published in (one
`experts.{e}.w1.weight` [I, H] per expert, `block_sparse_moe.` for `mlp.`, ...), converting whole
tensors as it loads. A streaming run reads tensors by name, so for every model tensor missing from
the checkpoint under its own name, `CheckpointLayout` asks `revert_weight_conversion` (the
conversion `save_pretrained` applies) where each of its rows goes: it converts a *probe*, a tensor
of the model tensor's shape whose values are its own row numbers, and reads the row numbers back out
of each checkpoint tensor the conversion produced. No model family is named. To keep probes small
for large tensors (more than `SMALL` entries) the probe keeps one column (the conversion must then
keep each row's columns together, which the checkpoint's shapes confirm); smaller tensors are probed
entry by entry.

A model tensor is then read as the checkpoint tensors that hold it, each copied into its rows
(`assemble`), and written back as them (`pieces_of`). Anything the probe cannot explain (a row held
twice or not at all, shapes that do not match) is refused with the tensor's name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import prod

import torch
from torch import nn

from d2compiler.errors import ModelLoadError

SMALL = 1 << 22  # entries: tensors up to this size are probed entry by entry


@dataclass
class Piece:
    """One checkpoint tensor holding part of a model tensor: the rows of the model tensor seen as
    (-1, width) it holds, in its own order; with `transposed`, it stores them as columns."""

    key: str
    rows: torch.Tensor  # int64, the checkpoint tensor's shape without its width dimension
    width: int
    transposed: bool = False

    def shape(self) -> tuple[int, ...]:
        if self.width == 1:
            return tuple(self.rows.shape)
        return (self.width, *self.rows.shape) if self.transposed else (*self.rows.shape, self.width)


def _probe(shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """(a tensor of `shape`, or of `shape` with its last dimension cut to 1, holding its row
    numbers; the width of a row)."""
    if prod(shape) <= SMALL or len(shape) < 2:
        return torch.arange(prod(shape)).view(shape), 1
    return torch.arange(prod(shape[:-1])).view(*shape[:-1], 1), shape[-1]


def _piece(key: str, probe: torch.Tensor, width: int) -> Piece:
    if width == 1:
        return Piece(key, probe, 1)
    if probe.shape[-1] == 1:
        return Piece(key, probe[..., 0], width)
    if probe.dim() == 2 and probe.shape[0] == 1:
        return Piece(key, probe[0], width, transposed=True)
    raise ModelLoadError(f"{key}: the checkpoint's layout cuts a row of the model's tensor; streaming cannot read it "
                         "(set model.streaming = false)")


def learn_layout(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[Piece]]:
    """{model tensor name: the checkpoint pieces holding it} for the model tensors `shapes` names
    (those the checkpoint lacks under their own names; each converted on its own), leaving out the
    ones transformers does not convert."""
    from transformers.core_model_loading import revert_weight_conversion

    layout: dict[str, list[Piece]] = {}
    for name, shape in shapes.items():
        probe, width = _probe(shape)
        converted = revert_weight_conversion(model, {name: probe})
        if set(converted) == {name}:
            continue
        pieces = [_piece(key, value, width) for key, value in converted.items()]
        held = torch.cat([p.rows.reshape(-1) for p in pieces]).sort().values
        if not torch.equal(held, torch.arange(probe.numel())):
            raise ModelLoadError(f"{name}: the checkpoint's layout does not hold each of its rows once (it is converted "
                                 "together with other tensors); streaming cannot read it (set model.streaming = false)")
        layout[name] = pieces
    return layout


def assemble(name: str, shape: tuple[int, ...], pieces: list[Piece], read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The model tensor `name` of `shape` from its checkpoint pieces (each read with `read`)."""
    width = pieces[0].width
    out: torch.Tensor | None = None
    for piece in pieces:
        tensor = read(piece.key)
        if tuple(tensor.shape) != piece.shape():
            raise ModelLoadError(f"{piece.key}: shape {tuple(tensor.shape)} in the checkpoint, but the model's {name} "
                                 f"{shape} needs {piece.shape()}")
        if out is None:
            out = torch.empty(prod(shape) // width, width, dtype=tensor.dtype)
        out[piece.rows.reshape(-1)] = (tensor.T if piece.transposed else tensor).reshape(-1, width)
    assert out is not None
    return out.view(shape)


def assemble_expert(name: str, shape: tuple[int, ...], pieces: list[Piece], expert: int,
                    read: Callable[[str, slice | None], torch.Tensor]) -> torch.Tensor:
    """Entry `expert` of the first dimension of the model tensor `name` of `shape` (one expert of a
    bank, [out, in]) from the pieces that hold its rows, never the whole tensor: `read(key, lead)`
    returns a checkpoint tensor, or only its leading-dimension range `lead` when that is not None (a
    piece that holds several experts is read only where this one's rows are)."""
    width = pieces[0].width
    per = prod(shape[1:]) // width  # the model tensor's rows (as (-1, width)) in one expert
    lo, hi = expert * per, (expert + 1) * per
    out: torch.Tensor | None = None
    for piece in pieces:
        rows = piece.rows
        inside = (rows >= lo) & (rows < hi)
        if not bool(inside.any()):
            continue
        lead = None
        if not piece.transposed and rows.dim() >= 1 and not bool(inside.all()):
            hit = inside.reshape(rows.shape[0], -1).any(1).nonzero().flatten()
            lead = slice(int(hit[0]), int(hit[-1]) + 1)
            rows, inside = rows[lead], inside[lead]
        tensor = read(piece.key, lead)
        expected = piece.shape() if lead is None else (lead.stop - lead.start, *piece.shape()[1:])
        if tuple(tensor.shape) != tuple(expected):
            raise ModelLoadError(f"{piece.key}: shape {tuple(tensor.shape)} in the checkpoint, but the model's {name} "
                                 f"{shape} needs {tuple(expected)}")
        flat = (tensor.T if piece.transposed else tensor).reshape(-1, width)
        if out is None:
            out = torch.empty(per, width, dtype=tensor.dtype)
        out[rows.reshape(-1)[inside.reshape(-1)] - lo] = flat[inside.reshape(-1)]
    if out is None:
        raise ModelLoadError(f"{name}: the checkpoint holds no row of expert {expert}")
    return out.view(shape[1:])


def pieces_of(tensor: torch.Tensor, pieces: list[Piece]) -> dict[str, torch.Tensor]:
    """The checkpoint tensors that hold `tensor` (the inverse of `assemble`)."""
    width = pieces[0].width
    rows = tensor.reshape(-1, width)
    out = {}
    for piece in pieces:
        part = rows[piece.rows.reshape(-1)]
        part = part.reshape(*piece.rows.shape, width) if width > 1 else part.reshape(piece.rows.shape)
        out[piece.key] = (part.T if piece.transposed else part).contiguous()
    return out
