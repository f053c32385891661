"""ONNX export of a d2compiler output (`d2c export OUTPUT --format onnx`), through
`torch.onnx.export(dynamo=True)`.

The graph maps `input_ids` (batch, sequence) to `logits`. Then:
- quantized linears (those with `weight_scale` / `weight_zero_point`) get their weight initializer
  replaced by a `DequantizeLinear` of the integer levels (uint4 or uint8, per channel or blocked
  along the input dimension, opset 21): a QDQ graph that runtimes fuse into integer kernels;
- `metadata_props` carry `d2c.sparsity` (per-initializer zero fraction, JSON), `d2c.pattern`,
  `d2c.recipe_sha256` and `d2c.format_version`;
- `sparse_initializers=True` stores the pruned weight initializers as ONNX `sparse_initializer`s
  (values + int64 indices), a disk-size variant that runtimes densify at load;
- the file is validated with `onnx.checker.check_model`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..errors import OutputError
from ..packing import Packed24Linear, carry_quant_buffers
from .output_dir import atomic_output_dir, write_record

OPSET = 21


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def unpack_for_export(model: nn.Module) -> None:
    """Replace packed 2:4 layers by plain `nn.Linear` (the ONNX graph stores dense weights)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Packed24Linear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = nn.Parameter(module.dense_weight().float(), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach().float(), requires_grad=False)
            carry_quant_buffers(module, linear)
            model.set_submodule(name, linear)


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if hasattr(m, "weight_scale") and hasattr(m, "weight")}


def locate_weights(graph: onnx.GraphProto, weights: dict[str, np.ndarray]) -> dict[str, tuple[str, bool]]:
    """Find each (out, in) weight among the initializers by value: the exporter's optimizer folds
    the transpose of a linear's weight into a new, renamed initializer. Returns module name ->
    (initializer name, stored transposed)."""
    by_shape: dict[tuple[int, ...], list[onnx.TensorProto]] = {}
    for tensor in graph.initializer:
        by_shape.setdefault(tuple(tensor.dims), []).append(tensor)
    found = {}
    for module, weight in weights.items():
        for transposed, target in ((False, weight), (True, weight.T)):
            match = next((t for t in by_shape.get(target.shape, []) if np.array_equal(numpy_helper.to_array(t), target)), None)
            if match is not None:
                found[module] = (match.name, transposed)
                break
    return found


def _qdq(graph: onnx.GraphProto, name: str, transposed: bool, weight: np.ndarray, scale: np.ndarray, zero: np.ndarray,
         bits: int) -> None:
    """Replace initializer `name` (holding `weight`, (out, in), possibly transposed) by a
    DequantizeLinear of its integer levels: blocked along the input axis, or per output channel."""
    index = next(i for i, t in enumerate(graph.initializer) if t.name == name)
    groups = scale.shape[1]
    width = weight.shape[1] // groups
    levels = np.clip(np.round(weight / np.repeat(scale, width, axis=1)) + np.repeat(zero, width, axis=1), 0, 2**bits - 1)
    data_type = TensorProto.UINT4 if bits == 4 else TensorProto.UINT8
    if groups > 1:  # blocked: scale/zero have the weight's rank, block_size along the input axis
        attrs: dict[str, Any] = {"axis": 0 if transposed else 1, "block_size": width}
        sc, zp = (scale.T, zero.T) if transposed else (scale, zero)
    else:  # per channel: 1-D along the output axis
        attrs = {"axis": 1 if transposed else 0}
        sc, zp = scale.reshape(-1), zero.reshape(-1)
    if transposed:
        levels = levels.T
    q = helper.make_tensor(f"{name}_q", data_type, levels.shape, levels.astype(np.uint8).flatten().tolist())
    scale_t = numpy_helper.from_array(np.ascontiguousarray(sc, dtype=np.float32), f"{name}_scale")
    zero_t = helper.make_tensor(f"{name}_zero_point", data_type, zp.shape, zp.astype(np.uint8).flatten().tolist())
    del graph.initializer[index]
    graph.initializer.extend([q, scale_t, zero_t])
    graph.node.insert(0, helper.make_node("DequantizeLinear", [q.name, scale_t.name, zero_t.name], [name], name=f"{name}_dq", **attrs))


def _to_sparse(graph: onnx.GraphProto, names: set[str]) -> int:
    """Move the named initializers to sparse_initializer (values + flat int64 indices)."""
    moved = 0
    for tensor in list(graph.initializer):
        if tensor.name not in names:
            continue
        array = numpy_helper.to_array(tensor)
        flat = array.reshape(-1)
        idx = np.flatnonzero(flat).astype(np.int64)
        values = numpy_helper.from_array(flat[idx], tensor.name)
        indices = numpy_helper.from_array(idx, f"{tensor.name}_indices")
        graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(array.shape)))
        graph.initializer.remove(tensor)
        moved += 1
    return moved


def export_onnx(model: nn.Module, record: dict[str, Any], path: Path, *, overwrite: bool = False,
                sparse_initializers: bool = False, seq_len: int = 16, protected: Iterable[Path] = ()) -> dict[str, Any]:
    """Export `model` (a d2compiler output, loaded) to `path` (a folder holding model.onnx).
    Returns a summary: initializers quantized, sparse initializers, file size."""
    model = model.to("cpu").float().eval()
    unpack_for_export(model)
    quantized = _quantized_layers(model)
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    example = torch.randint(0, vocab, (1, seq_len))
    seq = torch.export.Dim("sequence", min=2, max=4096)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the exporter prints progress; stdout stays for results
            program = torch.onnx.export(_LogitsOnly(model).eval(), (example,), dynamo=True, opset_version=OPSET,
                                        input_names=["input_ids"], output_names=["logits"],
                                        dynamic_shapes={"input_ids": {1: seq}}, optimize=True)
    except Exception as exc:  # the exporter raises many types; report the model and the cause
        raise OutputError(f"ONNX export failed for {type(model).__name__}: {type(exc).__name__}: {str(exc)[:500]}") from exc
    proto = program.model_proto
    graph = proto.graph
    layers = record.get("layers", {})
    weights = {name: model.get_submodule(name).weight.detach().float().numpy() for name in layers}
    located = locate_weights(graph, weights)
    sparsity = {init: float((weights[module] == 0).mean()) for module, (init, _t) in located.items()}
    done = []
    for name, module in quantized.items():
        if name in located:
            init, transposed = located[name]
            bits = layers.get(name, {}).get("quant", {}).get("bits", 8)
            _qdq(graph, init, transposed, weights[name], module.weight_scale.float().numpy(),
                 module.weight_zero_point.float().numpy(), bits)
            done.append(init)
    moved = _to_sparse(graph, {init for init, s in sparsity.items() if s > 0 and init not in done}) if sparse_initializers else 0
    recipe_hash = hashlib.sha256(json.dumps(record.get("recipe", {}), sort_keys=True).encode()).hexdigest()
    meta = {"d2c.format_version": "1", "d2c.sparsity": json.dumps(sparsity), "d2c.pattern": ",".join(record.get("patterns", [])),
            "d2c.recipe_sha256": recipe_hash, "d2c.quantized": json.dumps(sorted(done)),
            "d2c.initializers": json.dumps({init: module for module, (init, _t) in located.items()})}
    helper.set_model_props(proto, meta)
    with atomic_output_dir(path, overwrite, protected) as tmp:
        file = tmp / "model.onnx"
        onnx.save_model(proto, str(file))
        onnx.checker.check_model(str(file), full_check=False)
        write_record(tmp, record)
    return {"path": str(path / "model.onnx"), "bytes": (path / "model.onnx").stat().st_size, "quantized": len(done),
            "sparse_initializers": moved, "opset": OPSET}
