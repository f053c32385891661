"""3-D Mixture-of-Experts banks in the `d2c-packed` checkpoint.

A bank whose every expert is exactly 2:4 (the packing pass verified it and recorded `packed = "2:4"` for
each `bank.e`) is stored like a packed linear, all experts at once: its experts' (out, in) matrices
stacked into (E·out, in) rows (a bank used as `x @ W[e]` is transposed first), kept values + 2-bit
positions (or, when quantized, integer levels with the stacked per-expert scales and zero points).
It is read back into the dense bank: the model's own forward indexes the bank expert by expert, so
a packed bank saves storage, not compute (docs/deploy.md)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from d2compiler.graph.experts import bank_parameter, is_bank_expert
from d2compiler.graph.packing import QUANT_BUFFERS, bank_buffer_name, pack_two_of_four, unpack_two_of_four, violations_2_4


def packed_bank_names(model: nn.Module, layers: dict[str, dict[str, Any]]) -> list[str]:
    """The banks all of whose experts the record says are packed 2:4."""
    counts: dict[str, int] = {}
    for name, layer in layers.items():
        owner = name.rpartition(".")[0]
        if layer.get("packed") == "2:4" and is_bank_expert(model, name):
            counts[owner] = counts.get(owner, 0) + 1
    return sorted(name for name, count in counts.items() if count == bank_parameter(model, name).shape[0])  # type: ignore[union-attr]


def mark_packed_banks(model: nn.Module, layers: dict[str, dict[str, Any]]) -> int:
    """Record `packed = "2:4"` for every expert of each recorded bank whose experts are all exactly 2:4
    (a finished output being converted to `d2c-packed`); returns how many experts that is."""
    banks = {name.rpartition(".")[0] for name in layers if name.rpartition(".")[2].isdigit()}
    count = 0
    for name in sorted(banks):
        bank = bank_parameter(model, name)
        if bank is None:
            continue
        transposed = bool(layers.get(f"{name}.0", {}).get("transposed"))
        matrices = bank.detach().transpose(1, 2) if transposed else bank.detach()
        if matrices.shape[-1] % 8 or any(violations_2_4(matrix) for matrix in matrices):
            continue
        for e in range(bank.shape[0]):
            layers.setdefault(f"{name}.{e}", {})["packed"] = "2:4"
        count += bank.shape[0]
    return count


def expert_rows(bank: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The bank's experts as stacked (E·out, in) rows."""
    matrices = bank.transpose(1, 2) if transposed else bank
    return matrices.reshape(-1, matrices.shape[-1])


def pack_bank(model: nn.Module, name: str, transposed: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(values (E·out, in/2), meta (E·out, in/8), the checkpoint entry) of a 2:4 bank."""
    bank = model.get_parameter(name).detach().cpu()
    values, meta = pack_two_of_four(expert_rows(bank, transposed))
    experts, rows, cols = bank.shape
    shape = [experts, cols, rows] if transposed else [experts, rows, cols]
    return values, meta, {"name": name, "bank": True, "shape": shape, "transposed": transposed,
                          "dtype": str(values.dtype).removeprefix("torch.")}


def restore_bank(model: nn.Module, entry: dict[str, Any], values: torch.Tensor, meta: torch.Tensor,
                 quant: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Write the dense bank of a packed entry into `model` (and its stacked scales, when quantized)."""
    experts, out_f, in_f = entry["shape"]
    dense = unpack_two_of_four(values, meta).reshape(experts, out_f, in_f)
    param = model.get_parameter(entry["name"])
    with torch.no_grad():
        param.copy_(dense.transpose(1, 2) if entry["transposed"] else dense)
    if quant is not None:
        owner, _, attr = entry["name"].rpartition(".")
        for buffer, tensor in zip(QUANT_BUFFERS, quant):
            model.get_submodule(owner).register_buffer(bank_buffer_name(attr, buffer), tensor.reshape(experts, out_f, -1))
