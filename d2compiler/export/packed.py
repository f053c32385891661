"""The `d2c-packed` checkpoint (layout: docs/format.md): a transformers-style folder whose
`model.safetensors` stores each packed 2:4 linear as kept values + 2-bit positions (and, when the
layer is quantized, its integer levels instead of float values, with per-group scales and zero
points). `load_packed` rebuilds a model whose outputs match the unpacked model bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from d2compiler.errors import ModelLoadError
from d2compiler.export.packed_banks import pack_bank, packed_bank_names, restore_bank
from d2compiler.graph.experts import bank_quant_buffers
from d2compiler.graph.packing import BANK_SEPARATOR, QUANT_BUFFERS, Packed24Linear, bank_buffer_name, is_quant_buffer

FORMAT = "d2c-packed"
FORMAT_VERSION = "1"


def is_packed_folder(folder: Path) -> bool:
    path = folder / "model.safetensors"
    if not path.is_file():
        return False
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("format") == FORMAT


def _levels(values: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """Integer levels of the kept values, each with its group's scale/zero (by original column)."""
    g = _kept_columns(meta) // group
    return torch.round(values.float() / torch.gather(scale, 1, g)) + torch.gather(zero, 1, g)


def _kept_columns(meta: torch.Tensor) -> torch.Tensor:
    """The original input column of every stored value, (out, in/2)."""
    out_f = meta.shape[0]
    nibble = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(out_f, -1).to(torch.int64)
    positions = torch.stack([nibble & 0x3, nibble >> 2], dim=-1)
    base = 4 * torch.arange(positions.shape[1]).view(1, -1, 1)
    return (base + positions).reshape(out_f, -1)


def _nibbles(levels: torch.Tensor) -> torch.Tensor:
    pairs = levels.to(torch.uint8).reshape(levels.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _from_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def _store(tensors: dict[str, torch.Tensor], name: str, values: torch.Tensor, meta: torch.Tensor,
           grid: tuple[torch.Tensor, torch.Tensor] | None, quant: dict[str, Any] | None, in_features: int,
           entry: dict[str, Any]) -> None:
    """Put one packed layer's (or bank's) tensors in `tensors`: positions, and kept values or, when
    quantized, their integer levels with the scales and zero points."""
    tensors[f"{name}.meta"] = meta.cpu().contiguous()
    if quant and grid is not None:
        scale, zero = (t.cpu().reshape(meta.shape[0], -1) for t in grid)
        group = quant["group_size"] or in_features
        levels = _levels(values.cpu(), meta.cpu(), scale, zero, group)
        tensors[f"{name}.qvalues"] = _nibbles(levels) if quant["bits"] == 4 else levels.to(torch.uint8)
        tensors[f"{name}.weight_scale"], tensors[f"{name}.weight_zero_point"] = scale.contiguous(), zero.to(torch.uint8).contiguous()
        entry["quant"] = {"bits": quant["bits"], "group_size": group}
    else:
        tensors[f"{name}.values"] = values.cpu().contiguous()


def packed_state(model: nn.Module, layers: dict[str, dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The tensors and the per-layer entries of a packed checkpoint. `layers` is sparsity.json's
    per-layer record (it says which layers are quantized, with how many bits and what group size,
    and which expert banks are packed)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    entries = []
    for name, module in model.named_modules():
        if not isinstance(module, Packed24Linear):
            continue
        for key in ("values", "meta", *QUANT_BUFFERS):
            tensors.pop(f"{name}.{key}", None)
        entry: dict[str, Any] = {"name": name, "shape": [module.out_features, module.in_features],
                                 "transposed": module.transposed, "dtype": str(module.values.dtype).removeprefix("torch.")}
        grid = (module.weight_scale, module.weight_zero_point) if hasattr(module, "weight_scale") else None
        _store(tensors, name, module.values, module.meta, grid, layers.get(name, {}).get("quant"), module.in_features, entry)
        entries.append(entry)
    for name in packed_bank_names(model, layers):
        first = layers[f"{name}.0"]
        values, meta, entry = pack_bank(model, name, bool(first.get("transposed")))
        owner, _, attr = name.rpartition(".")
        for key in (name, *(f"{owner}.{bank_buffer_name(attr, b)}" for b in QUANT_BUFFERS)):
            tensors.pop(key, None)
        _store(tensors, name, values, meta, bank_quant_buffers(model, name), first.get("quant"), entry["shape"][2], entry)
        entries.append(entry)
    return tensors, entries


def write_packed(folder: Path, model: nn.Module, layers: dict[str, dict[str, Any]]) -> Path:
    """Write `folder/model.safetensors` in the packed layout and the model's config."""
    tensors, entries = packed_state(model, layers)
    model.config.save_pretrained(folder)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "packed": json.dumps(entries)}
    save_file(_untie(tensors), str(folder / "model.safetensors"), metadata=metadata)
    return folder


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: keep one copy of tied tensors (the loader re-ties)."""
    seen: dict[int, str] = {}
    out = {}
    for key, tensor in tensors.items():
        ptr = tensor.data_ptr()
        if ptr in seen and tensor.numel():
            continue
        seen[ptr] = key
        out[key] = tensor
    return out


def _stored_values(tensors: dict[str, torch.Tensor], name: str, entry: dict[str, Any], meta: torch.Tensor
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(kept values, (scale, zero point) when quantized) of one packed entry, taken out of `tensors`."""
    if "quant" not in entry:
        return tensors.pop(f"{name}.values"), None  # kept in the stored dtype (cast at compute)
    q = tensors.pop(f"{name}.qvalues")
    levels = (_from_nibbles(q) if entry["quant"]["bits"] == 4 else q).float()
    scale = tensors.pop(f"{name}.weight_scale")
    zero = tensors.pop(f"{name}.weight_zero_point").float()
    g = _kept_columns(meta) // entry["quant"]["group_size"]
    values = ((levels - torch.gather(zero, 1, g)) * torch.gather(scale, 1, g)).to(getattr(torch, entry["dtype"]))
    return values, (scale, zero)


def load_packed(folder: Path) -> nn.Module:
    """Rebuild the model of a packed checkpoint, with `Packed24Linear` layers."""
    from d2compiler.graph.model_class import model_class, model_load_errors, read_config

    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{path}: unsupported d2c-packed version {meta.get('format_version')!r}")
    entries = json.loads(meta["packed"])
    tensors = load_file(str(path))
    config = read_config(str(folder), str(folder))
    with model_load_errors(str(folder)):
        model = model_class(config, str(folder))(config)  # float32: stored fp16/bf16 tensors are widened exactly
    dtype = next(model.parameters()).dtype
    banks: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]] = []
    for entry in entries:
        name = entry["name"]
        meta_t = tensors.pop(f"{name}.meta")
        values, grid = _stored_values(tensors, name, entry, meta_t)
        if entry.get("bank"):  # written into the model once its other tensors are loaded
            banks.append((entry, values, meta_t, grid))
            continue
        bias = tensors.pop(f"{name}.bias", None)
        bias = bias.to(dtype) if bias is not None else None
        packed = Packed24Linear(entry["shape"][1], entry["shape"][0], values, meta_t, bias, entry["transposed"])
        if grid is not None:
            packed.register_buffer("weight_scale", grid[0])
            packed.register_buffer("weight_zero_point", grid[1])
        model.set_submodule(name, packed)
    bank_grids = {key: tensors.pop(key) for key in list(tensors) if BANK_SEPARATOR in key and is_quant_buffer(key)}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    packed_names = {e["name"] for e in entries}
    missing = {k for k in missing if k.rpartition(".")[0] not in packed_names and k not in packed_names}  # set above
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or missing - tied:
        raise ModelLoadError(f"{path}: tensors do not match the model (missing {sorted(missing - tied)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]})")
    if tied:
        model.tie_weights()
    for bank in banks:
        restore_bank(model, *bank)
    for key, tensor in bank_grids.items():  # the scales of a quantized bank that is not packed
        owner, _, buffer = key.rpartition(".")
        model.get_submodule(owner).register_buffer(buffer, tensor)
    return model.eval()

