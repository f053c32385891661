"""Quantized Mixture-of-Experts banks in a compressed-tensors checkpoint.

transformers 5 holds a block's routed experts as 3-D banks (`mlp.experts.gate_up_proj` [E, 2I, H]),
and a quantization pass keeps each expert's scales and zero points stacked beside its bank
(`graph.packing.bank_buffer_name`: `gate_up_proj__weight_scale` [E, 2I, groups]). A
compressed-tensors checkpoint stores quantized *linears*, so a bank is written as the linears the
model's own checkpoint layout has for it: transformers' save-time conversion says which checkpoint
tensor holds which rows of the bank (`graph.checkpoint_layout.learn_layout`, e.g. expert e's rows
0..I of `gate_up_proj` are `mlp.experts.{e}.gate_proj.weight`), and each such tensor becomes one
`nn.Linear` with its rows of the scales, compressed by the package like every other linear. That is
the layout of the published compressed-tensors MoE checkpoints, which vLLM's fused-MoE loaders stack
back into their banks and transformers' compressed-tensors loader decompresses and merges into its
own (checked with transformers: `tests/test_moe_outputs.py`).

Refused with one located line: a bank only some of whose experts are quantized or whose experts
use two grids (the fused kernels take one scheme per bank), a bank the checkpoint layout keeps 3-D
(no per-expert linears to write, e.g. gpt-oss) and a bank used transposed (`x @ W[e]`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from d2compiler.errors import OutputError
from d2compiler.graph.checkpoint_layout import Piece, learn_layout
from d2compiler.graph.experts import bank_parameter, bank_quant_buffers, is_bank_expert
from d2compiler.graph.packing import QUANT_BUFFERS

Grid = tuple[int, int, bool]  # (bits, group size, symmetric)
WAY_OUT = "export with --format hf, or quantize with ignore = [\"re:.*experts\"]"


def grid_of(quant: dict[str, Any]) -> Grid:
    """The grid a layer's `quant` record entry describes."""
    return quant["bits"], quant["group_size"], quant["symmetric"]


@dataclass
class QuantizedBank:
    """A bank all of whose experts a quantization pass put on one grid."""

    name: str  # the parameter's full name
    grid: Grid


def quantized_banks(model: nn.Module, layers: dict[str, dict[str, Any]]) -> list[QuantizedBank]:
    """The banks whose experts the record says are quantized (`bank.e` entries with `quant`),
    checked: every expert, one grid, used as (out, in) (see the module docstring)."""
    grids: dict[str, dict[int, Grid]] = {}
    for name, layer in layers.items():
        owner, _, index = name.rpartition(".")
        if layer.get("quant") and is_bank_expert(model, name):
            if layer.get("transposed"):
                raise OutputError(f"{name}: an expert of a bank used as x @ W[e] (stored (in, out)); compressed-tensors "
                                  f"stores (out, in) linears and this layout is not written: {WAY_OUT}")
            grids.setdefault(owner, {})[int(index)] = grid_of(layer["quant"])
    banks = []
    for owner, by_expert in sorted(grids.items()):
        experts = bank_parameter(model, owner).shape[0]  # type: ignore[union-attr]
        if len(by_expert) != experts or len(set(by_expert.values())) != 1:
            raise OutputError(f"{owner}: {len(by_expert)} of its {experts} experts quantized, on {len(set(by_expert.values()))} "
                              "grid(s); a compressed-tensors Mixture-of-Experts bank needs all its experts on one grid "
                              f"(vLLM's fused kernels take one scheme): quantize all of them alike, or {WAY_OUT}")
        banks.append(QuantizedBank(owner, next(iter(by_expert.values()))))
    return banks


def _whole_rows(piece: Piece, width: int) -> torch.Tensor | None:
    """The bank rows (of the bank seen as (-1, width)) a checkpoint tensor holds in order, each whole and
    in its own order; None when it holds anything else (columns, cut or reordered rows)."""
    if piece.transposed:
        return None
    if piece.width == width:
        return piece.rows.reshape(-1)
    entries = piece.rows  # probed entry by entry: the checkpoint tensor's shape, holding entry numbers
    if piece.width != 1 or entries.dim() != 2 or entries.shape[1] != width:
        return None
    rows = entries[:, 0] // width
    return rows if torch.equal(entries, rows[:, None] * width + torch.arange(width)) else None


def _expert_linear(bank: str, piece: Piece, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> nn.Linear:
    """The `nn.Linear` of one checkpoint tensor (`piece`) of a bank, with its rows of the scales."""
    rows = _whole_rows(piece, weight.shape[-1])
    if rows is None or not piece.key.endswith(".weight"):
        raise OutputError(f"{bank}: the checkpoint stores it as {piece.key} {piece.shape()}, not as (out, in) linears "
                          f"of whole rows; compressed-tensors cannot take this layout: {WAY_OUT}")
    flat = weight.reshape(-1, weight.shape[-1])
    linear = nn.Linear(flat.shape[1], rows.numel(), bias=False, dtype=weight.dtype)
    linear.weight.data = flat[rows].clone()
    linear.register_buffer(QUANT_BUFFERS[0], scale.reshape(-1, scale.shape[-1])[rows].clone())
    linear.register_buffer(QUANT_BUFFERS[1], zero.reshape(-1, zero.shape[-1])[rows].clone())
    return linear


def expert_linears(model: nn.Module, banks: list[QuantizedBank]) -> tuple[dict[str, nn.Linear], set[str]]:
    """({checkpoint module name: its `nn.Linear`, carrying `weight_scale` / `weight_zero_point`},
    the checkpoint keys of the dense tensors they replace). Takes the stacked buffers off the model."""
    linears: dict[str, nn.Linear] = {}
    replaced: set[str] = set()
    for bank in banks:
        weight = model.get_parameter(bank.name).detach()
        pieces = learn_layout(model, {bank.name: tuple(weight.shape)}).get(bank.name)
        if not pieces:
            raise OutputError(f"{bank.name}: this model's checkpoints keep the bank 3-D (one tensor for all its experts), "
                              f"with no per-expert linears for compressed-tensors to store: {WAY_OUT}")
        grid = bank_quant_buffers(model, bank.name, take=True)
        if grid is None:
            raise OutputError(f"{bank.name}: sparsity.json says its experts are quantized, but the model has no scales for "
                              "them (was quantization.safetensors removed from the output folder?)")
        scale, zero = grid
        for piece in pieces:
            linears[piece.key.removesuffix(".weight")] = _expert_linear(bank.name, piece, weight, scale, zero)
            replaced.add(piece.key)
    return linears, replaced


def module_tree(linears: dict[str, nn.Module]) -> nn.Module:
    """A module holding `linears` under their dotted names (intermediate modules made empty), so
    that the package's `apply_quantization_config` finds each by its checkpoint name."""
    root = nn.Module()
    for name, linear in linears.items():
        parent = root
        *path, last = name.split(".")
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]  # type: ignore[assignment]
        parent.add_module(last, linear)
    return root
