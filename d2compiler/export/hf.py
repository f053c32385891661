"""The output folder: config, tokenizer, weights (a plain transformers folder, or the packed 2:4
layout), `sparsity.json` and `report.html`, written atomically."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from d2compiler.export.compressed import FORMAT as COMPRESSED_TENSORS
from d2compiler.export.compressed import write_compressed_tensors
from d2compiler.export.output_dir import atomic_output_dir, write_record
from d2compiler.export.packed import write_packed
from d2compiler.export.report import write_report
from d2compiler.graph.packing import Packed24Linear, is_quant_buffer, unpack_linears

QUANT_FILE = "quantization.safetensors"


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every packed 2:4 layer written back as its dense `weight`."""
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, Packed24Linear):
            state.pop(f"{name}.values")
            state.pop(f"{name}.meta")
            state[f"{name}.weight"] = module.original_weight()
    return state


def write_output(path: Path, model: nn.Module, tokenizer: Any, record: dict[str, Any], *, overwrite: bool,
                 fmt: str = "hf", protected: Iterable[Path] = ()) -> Path:
    """Write the output folder (`hf`: plain transformers folder; `d2c-packed`: packed 2:4 checkpoint;
    `compressed-tensors`: quantized checkpoint for vLLM / transformers, which consumes `model`) with
    the tokenizer, `sparsity.json` and `report.html`; nothing appears at `path` until complete."""
    with atomic_output_dir(path, overwrite, protected) as tmp:
        model.to("cpu")
        if fmt == "d2c-packed":
            write_packed(tmp, model, record.get("layers", {}))
        elif fmt == COMPRESSED_TENSORS:
            unpack_linears(model)
            write_compressed_tensors(tmp, model, record.get("layers", {}))
        else:
            state = dense_state(model)
            quant = {k: v.contiguous() for k, v in state.items() if is_quant_buffer(k)}
            # the plain folder keeps standard keys; scales and zero points go beside it
            model.save_pretrained(tmp, safe_serialization=True, state_dict={k: v for k, v in state.items() if k not in quant})
            if quant:
                save_file(quant, str(tmp / QUANT_FILE))
        write_metadata(tmp, tokenizer, record)
    return path


def write_metadata(folder: Path, tokenizer: Any, record: dict[str, Any]) -> None:
    """The tokenizer (or image processor), `sparsity.json` and `report.html` of an output being assembled."""
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_record(folder, record)
    write_report(folder, json.loads(json.dumps(record, default=str)))
