"""ONNX export of a d2compiler output (`d2c export OUTPUT --format onnx`), through
`torch.onnx.export(dynamo=True)` and `onnx_ir` passes.

The graph maps `input_ids` (batch, sequence) to `logits`. Then, on the exporter's `onnx_ir` model:
- `FoldWeightTransposesPass` finds every recorded linear's weight initializer by its name
  (`model.<module>.weight`) and stores it transposed (`..._t`) where the exporter transposes it;
- `QuantizeWeightsPass` replaces the weights of quantized linears (those with `weight_scale` /
  `weight_zero_point`) by a `DequantizeLinear` of the integer levels (uint4 or uint8, per channel
  or blocked along the input dimension, opset 21): a QDQ graph that runtimes fuse into integer kernels;
- onnxscript's optimizer then simplifies the rest (it never folds a `DequantizeLinear`);
- `metadata_props` carry `d2c.sparsity` (per-initializer zero fraction, JSON), `d2c.pattern`,
  `d2c.recipe_sha256` and `d2c.format_version`;
- weights past `EXTERNAL_DATA_ABOVE` bytes (or always, on request) go to `model.onnx.data` beside
  `model.onnx` (ONNX external data), so models past protobuf's 2 GiB limit export;
- `sparse_initializers=True` stores the pruned weight initializers as ONNX `sparse_initializer`s
  (values + int64 indices), a disk-size variant that runtimes densify at load;
- the file is validated with `onnx.checker.check_model` by path (which handles external data).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch
from onnx import helper, numpy_helper
from torch import nn

from d2compiler.errors import OutputError
from d2compiler.export.output_dir import atomic_output_dir, write_record
from d2compiler.graph.experts import bank_names
from d2compiler.graph.packing import unpack_linears

OPSET = 21
DATA_FILE = "model.onnx.data"
PROTOBUF_LIMIT = 2**31
EXTERNAL_DATA_ABOVE = 1 << 30  # initializer bytes past which the weights go to DATA_FILE (protobuf's limit is 2 GiB)


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if hasattr(m, "weight_scale") and hasattr(m, "weight")}


def weight_initializer(module: str) -> str:
    """The name the exporter gives the weight of linear `module` (the wrapper's `model.` prefix)."""
    return f"model.{module}.weight"


def _is_plain_transpose(node: ir.Node) -> bool:
    perm = node.attributes.get("perm")
    return node.op_type == "Transpose" and node.domain == "" and (perm is None or list(perm.as_ints()) == [1, 0])


class FoldWeightTransposesPass(ir.passes.InPlacePass):
    """Find each recorded linear's weight initializer by name; where the exporter feeds it through a
    `Transpose`, store the transposed (in, out) tensor instead as `<name>_t` and drop the Transpose.
    `self.located`: module -> (initializer name, stored transposed)."""

    def __init__(self, modules: Iterable[str]):
        super().__init__()
        self.modules = list(modules)
        self.located: dict[str, tuple[str, bool]] = {}

    def requires(self, model: ir.Model) -> None:
        missing = [m for m in self.modules if weight_initializer(m) not in model.graph.initializers]
        if missing:
            raise ir.passes.PreconditionError(f"no weight initializer named {weight_initializer(missing[0])} "
                                              f"(and {len(missing) - 1} more) in the exported graph")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for module in self.modules:
            name = weight_initializer(module)
            value = graph.initializers[name]
            users = [node for node, _ in value.uses()]
            if not users or not all(_is_plain_transpose(node) for node in users):
                self.located[module] = (name, False)
                continue
            array = value.const_value.numpy()
            transposed = ir.Value(name=f"{name}_t", shape=ir.Shape(array.T.shape), type=value.type,
                                  const_value=ir.tensor(np.ascontiguousarray(array.T), name=f"{name}_t"))
            graph.register_initializer(transposed)
            for node in users:
                node.outputs[0].replace_all_uses_with(transposed, replace_graph_outputs=True)
                graph.remove(node, safe=True)
            graph.initializers.pop(name)
            self.located[module] = (transposed.name, True)
        return ir.passes.PassResult(model, modified=any(transposed for _n, transposed in self.located.values()))


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Replace the named weight initializers of quantized linears by a `DequantizeLinear` of their
    integer levels (uint4 or uint8), blocked along the input axis or per output channel. `grids`:
    initializer name -> (stored transposed, (out, in) weight, scale, zero, bits)."""

    def __init__(self, grids: dict[str, tuple[bool, np.ndarray, np.ndarray, np.ndarray, int]]):
        super().__init__()
        self.grids = grids

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for name, (transposed, weight, scale, zero, bits) in self.grids.items():
            value = graph.initializers[name]
            groups = scale.shape[1]
            width = weight.shape[1] // groups
            levels = np.clip(np.round(weight / np.repeat(scale, width, axis=1)) + np.repeat(zero, width, axis=1), 0, 2**bits - 1)
            if groups > 1:  # blocked: scale/zero have the weight's rank, block_size along the input axis
                attrs: dict[str, Any] = {"axis": 0 if transposed else 1, "block_size": width}
                sc, zp = (scale.T, zero.T) if transposed else (scale, zero)
            else:  # per channel: 1-D along the output axis
                attrs = {"axis": 1 if transposed else 0}
                sc, zp = scale.reshape(-1), zero.reshape(-1)
            dtype = ml_dtypes.uint4 if bits == 4 else np.uint8
            inputs = []
            for suffix, array in (("_q", levels.T if transposed else levels), ("_scale", sc.astype(np.float32)), ("_zero_point", zp)):
                array = np.ascontiguousarray(array if suffix == "_scale" else array.astype(dtype))
                tensor = ir.tensor(array, name=name + suffix)
                inputs.append(ir.Value(name=name + suffix, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor))
                graph.register_initializer(inputs[-1])
            node = ir.node("DequantizeLinear", inputs, attributes=attrs, name=f"{name}_dq")
            node.outputs[0].name = f"{name}_dq"
            graph.insert_before(graph.node(0), node)
            value.replace_all_uses_with(node.outputs[0])
            graph.initializers.pop(name)
        return ir.passes.PassResult(model, modified=bool(self.grids))


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
                sparse_initializers: bool = False, external_data: bool | None = None, seq_len: int = 16,
                protected: Iterable[Path] = ()) -> dict[str, Any]:
    """Export `model` (a d2compiler output, loaded) to `path` (a folder holding model.onnx, and
    model.onnx.data when the weights are stored outside the protobuf: `external_data` True, or None
    and the initializers exceed EXTERNAL_DATA_ABOVE bytes). Returns a summary: initializers
    quantized, sparse initializers, external data, file sizes."""
    banks = bank_names(model)
    if banks:
        raise OutputError(f"ONNX export does not take Mixture-of-Experts models yet: {banks[0]} (and {len(banks) - 1} "
                          "more) holds routed experts, whose data-dependent loop has no ONNX export here; keep "
                          "output.format = \"hf\" (it loads with from_pretrained)")
    model = model.to("cpu").float().eval()
    unpack_linears(model)
    quantized = _quantized_layers(model)
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    example = torch.randint(0, vocab, (1, seq_len))
    seq = torch.export.Dim("sequence", min=2, max=4096)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the exporter prints progress; stdout stays for results
            program = torch.onnx.export(_LogitsOnly(model).eval(), (example,), dynamo=True, opset_version=OPSET,
                                        input_names=["input_ids"], output_names=["logits"],
                                        dynamic_shapes={"input_ids": {1: seq}}, optimize=False)
    except Exception as exc:  # the exporter raises many types; report the model and the cause
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise OutputError(f"ONNX export failed for {type(model).__name__}: {type(exc).__name__}: {first}") from exc
    graph_model = program.model
    layers = record.get("layers", {})
    weights = {name: model.get_submodule(name).weight.detach().float().numpy() for name in layers}
    fold = FoldWeightTransposesPass(layers)
    grids = {}
    try:
        fold(graph_model)
        for name, module in quantized.items():
            if name in fold.located:
                init, transposed = fold.located[name]
                bits = layers.get(name, {}).get("quant", {}).get("bits", 8)
                grids[init] = (transposed, weights[name], module.weight_scale.float().numpy(),
                               module.weight_zero_point.float().numpy(), bits)
        QuantizeWeightsPass(grids)(graph_model)
    except ir.passes.PassError as exc:
        raise OutputError(f"ONNX export of {type(model).__name__}: {exc.__cause__ or exc}") from None
    onnxscript.optimizer.optimize(graph_model)
    located = fold.located
    sparsity = {init: float((weights[module] == 0).mean()) for module, (init, _t) in located.items()}
    recipe_hash = hashlib.sha256(json.dumps(record.get("recipe", {}), sort_keys=True).encode()).hexdigest()
    graph_model.metadata_props.update({
        "d2c.format_version": "1", "d2c.sparsity": json.dumps(sparsity), "d2c.pattern": ",".join(record.get("patterns", [])),
        "d2c.recipe_sha256": recipe_hash, "d2c.quantized": json.dumps(sorted(grids)),
        "d2c.initializers": json.dumps({init: module for module, (init, _t) in located.items()})})
    weight_bytes = sum(v.const_value.nbytes for v in graph_model.graph.initializers.values())
    if external_data is None:
        external_data = weight_bytes > EXTERNAL_DATA_ABOVE
    elif not external_data and weight_bytes >= PROTOBUF_LIMIT:
        raise OutputError(f"{path}: {weight_bytes / 2**30:.2f} GiB of weights do not fit in one ONNX protobuf (2 GiB at "
                          "most); export with --external-data auto or always")
    moved = 0
    with atomic_output_dir(path, overwrite, protected) as tmp:
        file = tmp / "model.onnx"
        if sparse_initializers:  # onnx_ir has no sparse initializers: move them in the protobuf
            proto = ir.to_proto(graph_model)
            moved = _to_sparse(proto.graph, {init for init, s in sparsity.items() if s > 0 and init not in grids})
            onnx.save_model(proto, str(file), save_as_external_data=external_data, location=DATA_FILE, size_threshold=1024)
        else:
            ir.save(graph_model, file, external_data=DATA_FILE if external_data else None, size_threshold_bytes=1024)
        onnx.checker.check_model(str(file), full_check=False)  # by path: works past the 2 GB protobuf limit
        write_record(tmp, record)
    data = path / DATA_FILE
    return {"path": str(path / "model.onnx"), "bytes": (path / "model.onnx").stat().st_size,
            "external_data_bytes": data.stat().st_size if data.is_file() else 0, "quantized": len(grids),
            "sparse_initializers": moved, "opset": OPSET}
