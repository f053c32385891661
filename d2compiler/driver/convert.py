"""`d2c export`: convert a finished output folder to ONNX, to the packed 2:4 checkpoint, or back to
a plain dense folder (optionally casting the floating weights, e.g. to fp16 for deployment)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from d2compiler.errors import OutputError
from d2compiler.export.hf import write_output
from d2compiler.export.onnx_export import export_onnx
from d2compiler.export.output_dir import RECORD_FILE, check_output_path, output_lock, user_path
from d2compiler.export.packed_banks import mark_packed_banks
from d2compiler.graph.experts import is_bank_expert
from d2compiler.graph.layers import weight_is_transposed
from d2compiler.graph.packing import Packed24Linear, violations_2_4
from d2compiler.loading.dtypes import DTYPES


def pack_model(model: torch.nn.Module, layers: dict[str, dict[str, Any]]) -> int:
    """Replace every recorded layer that is exactly 2:4 by a `Packed24Linear`; returns how many layers
    are packed (counting those that already were)."""
    count = mark_packed_banks(model, layers)  # the experts of 3-D banks (stored packed by the writer)
    for name in layers:
        if is_bank_expert(model, name):
            continue
        module = model.get_submodule(name)
        if isinstance(module, Packed24Linear):  # already packed (a d2c-packed source)
            count += 1
            continue
        if not hasattr(module, "weight"):
            continue
        weight = module.weight.detach()
        transposed = weight_is_transposed(module)
        matrix = weight.t() if transposed else weight
        if matrix.shape[1] % 8 or violations_2_4(matrix):
            continue
        model.set_submodule(name, Packed24Linear.replacing(module, matrix, transposed))
        layers[name]["packed"] = "2:4"
        count += 1
    return count


def export_output(source: str, fmt: str, dest: str, *, dtype: str | None = None, overwrite: bool = False,
                  sparse_initializers: bool = False, external_data: bool | None = None) -> dict[str, Any]:
    """Convert the output folder `source` into `dest` (checked, locked and written atomically; `dest`
    may not be `source`, inside it or contain it)."""
    folder, target = user_path(source), user_path(dest)
    record_file = folder / RECORD_FILE
    if not record_file.is_file():
        raise OutputError(f"{source}: not a d2c output folder (no {RECORD_FILE})")
    check_output_path(target, overwrite, [folder])
    with output_lock(target):
        return _export(folder, fmt, target, dtype, overwrite, sparse_initializers, external_data)


def _export(folder: Path, fmt: str, dest: Path, dtype: str | None, overwrite: bool, sparse_initializers: bool,
            external_data: bool | None) -> dict[str, Any]:
    from d2compiler.loading.models import load_model

    try:
        record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutputError(f"{folder / RECORD_FILE}: unreadable ({exc})") from None
    loaded = load_model(str(folder), "float32", "cpu")
    model = loaded.model
    if fmt == "onnx":
        if dtype not in (None, "float32"):
            raise OutputError("--dtype applies to the safetensors formats; the ONNX graph is exported in float32")
        return export_onnx(model, record, dest, overwrite=overwrite, sparse_initializers=sparse_initializers,
                           external_data=external_data, protected=[folder])
    if dtype is not None:
        for module in model.modules():  # cast weights and packed values, not quantization scales
            tensors = [*module._parameters.values(), module._buffers.get("values")]
            for tensor in tensors:
                if tensor is not None and tensor.is_floating_point():
                    tensor.data = tensor.data.to(DTYPES[dtype])
        model.config.dtype = dtype
    packed = pack_model(model, record["layers"]) if fmt == "d2c-packed" else 0
    if fmt == "d2c-packed" and not packed:
        raise OutputError(f"{folder}: no exactly 2:4 layer to pack (prune with mask_structure = \"2:4\")")
    write_output(dest, model, loaded.tokenizer, record, overwrite=overwrite, fmt=fmt, protected=[folder])
    files = [p for p in dest.iterdir() if p.suffix == ".safetensors"]
    return {"path": str(dest), "format": fmt, "packed_layers": packed, "weight_bytes": sum(p.stat().st_size for p in files)}
