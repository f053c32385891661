"""`d2c export`: convert a finished output folder to ONNX, to the packed 2:4 checkpoint, or back to
a plain dense folder (optionally casting the floating weights, e.g. to fp16 for deployment)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import OutputError
from ..graph import weight_is_transposed
from ..packing import Packed24Linear, violations_2_4
from .hf import write_output
from .onnx_export import export_onnx

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pack_model(model: torch.nn.Module, layers: dict[str, dict[str, Any]]) -> int:
    """Replace every recorded layer that is exactly 2:4 by a `Packed24Linear`; returns how many layers
    are packed (counting those that already were)."""
    count = 0
    for name in layers:
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
                  sparse_initializers: bool = False) -> dict[str, Any]:
    from ..models import load_model

    folder = Path(source)
    record_file = folder / "sparsity.json"
    if not record_file.is_file():
        raise OutputError(f"{folder}: not a d2c output folder (no sparsity.json)")
    record = json.loads(record_file.read_text())
    loaded = load_model(str(folder), "float32", "cpu")
    model = loaded.model
    if fmt == "onnx":
        if dtype not in (None, "float32"):
            raise OutputError("--dtype applies to the safetensors formats; the ONNX graph is exported in float32")
        return export_onnx(model, record, Path(dest), overwrite=overwrite, sparse_initializers=sparse_initializers)
    if dtype is not None:
        for module in model.modules():  # cast weights and packed values, not quantization scales
            tensors = [*module._parameters.values(), module._buffers.get("values")]
            for tensor in tensors:
                if tensor is not None and tensor.is_floating_point():
                    tensor.data = tensor.data.to(_DTYPES[dtype])
        model.config.dtype = dtype
    packed = pack_model(model, record["layers"]) if fmt == "d2c-packed" else 0
    if fmt == "d2c-packed" and not packed:
        raise OutputError(f"{folder}: no exactly 2:4 layer to pack (prune with mask_structure = \"2:4\")")
    write_output(Path(dest), model, loaded.tokenizer, record, overwrite=overwrite, fmt=fmt)
    files = [p for p in Path(dest).iterdir() if p.suffix == ".safetensors"]
    return {"path": dest, "format": fmt, "packed_layers": packed, "weight_bytes": sum(p.stat().st_size for p in files)}
