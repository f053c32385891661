"""The `compressed-tensors` output format: a transformers folder that vLLM and transformers load as a
quantized checkpoint (`quantization_config.quant_method = "compressed-tensors"`).

Written with the `compressed-tensors` package's own API: a `QuantizationConfig` with one config
group per (bits, group size, symmetric) combination that the quantization passes produced, targets
naming the quantized linears exactly and `ignore` naming every other linear; `apply_quantization_config`
attaches the schemes, our scales and zero points are copied in, the package's `compress_module`
packs each layer and `ModelCompressor` writes the config (the package picks `pack-quantized` for weight-only int4 and int8) and writes the config.

Grids: d2compiler stores unsigned levels q ∈ [0, 2^b − 1] with w = (q − z)·s; compressed-tensors
stores signed levels with w = (q' − z')·s, so q' = q − 2^(b−1) and z' = z − 2^(b−1) (0 when
symmetric). The weights are already on the grid, so the package's rounding reproduces our levels
and the decompressed weights equal ours; a pruned weight (q = z) decompresses to exactly 0. No
sparsity config is written (vLLM rejects sparsity targets; the zeros simply stay zeros)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from d2compiler.errors import OutputError
from d2compiler.graph.packing import QUANT_BUFFERS

FORMAT = "compressed-tensors"
log = logging.getLogger(__name__)
INSTALL_HINT = "install it with pip install 'd2compiler[deploy]' (compressed-tensors needs Python >= 3.11)"


def available() -> bool:
    """Whether the optional `compressed-tensors` package is installed."""
    return importlib.util.find_spec("compressed_tensors") is not None


def quantized_layers(model: nn.Module, layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> the `quant` entry of every recorded layer that a quantization pass produced (checked:
    each must be an `nn.Linear` carrying its scales and zero points)."""
    found = {}
    for name, layer in layers.items():
        quant = layer.get("quant")
        if not quant:
            continue
        owner, _, index = name.rpartition(".")
        bank = _parameter(model, owner)
        if bank is not None and bank.dim() == 3 and index.isdigit():
            raise OutputError(f"{name}: an expert of the Mixture-of-Experts bank {owner}, quantized in place (the hf "
                              "output holds its dequantized weights); a compressed-tensors checkpoint of quantized 3-D "
                              "expert banks is not written yet: export with --format hf, or quantize with "
                              "ignore = [\"re:.*experts\"]")
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            raise OutputError(f"{name}: compressed-tensors stores torch.nn.Linear layers, and this layer is a "
                              f"{type(module).__name__}; export it with --format hf or onnx")
        if not all(hasattr(module, b) for b in QUANT_BUFFERS):
            raise OutputError(f"{name}: sparsity.json says it is quantized, but the model has no scales for it "
                              "(was quantization.safetensors removed from the output folder?)")
        found[name] = quant
    if not found:
        raise OutputError("compressed-tensors stores quantized weights and this output has no quantized layer: add a "
                          "quantization pass to the recipe, or write format hf")
    return found


def _parameter(model: nn.Module, name: str) -> torch.Tensor | None:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


def quantization_config(model: nn.Module, quantized: dict[str, dict[str, Any]]) -> Any:
    """The package's `QuantizationConfig`: one weight-only group per grid kind, the quantized linears
    as exact targets, every other linear in `ignore`."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    kinds: dict[tuple[int, int, bool], list[str]] = {}
    for name, quant in quantized.items():
        kinds.setdefault((quant["bits"], quant["group_size"], quant["symmetric"]), []).append(name)
    groups = {}
    for index, ((bits, group_size, symmetric), names) in enumerate(sorted(kinds.items())):
        weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                   strategy="group" if group_size else "channel", group_size=group_size or None)
        groups[f"group_{index}"] = QuantizationScheme(targets=sorted(names), weights=weights)
    ignore = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in quantized]
    return QuantizationConfig(config_groups=groups, ignore=ignore, quantization_status=QuantizationStatus.FROZEN)


def write_compressed_tensors(folder: Path, model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Write `model` (a d2compiler model whose quantized linears carry `weight_scale` /
    `weight_zero_point` buffers) into `folder` as a compressed-tensors checkpoint. The model is
    consumed: its quantized linears are compressed in place."""
    if not available():
        raise OutputError(f"format {FORMAT} needs the compressed-tensors package; {INSTALL_HINT}")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.base import compress_module
    from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config

    quantized = quantized_layers(model, layers)
    asymmetric = [name for name, quant in quantized.items() if not quant["symmetric"]]
    if asymmetric:
        log.warning("%s: %d linear(s) (e.g. %s) have asymmetric grids: written in compressed-tensors' own layout, "
                    "which loads with CompressedTensorsConfig(dequantize=True) (and d2compiler.load) but not with plain "
                    "from_pretrained (transformers' compressed mode, up to 5.25 at least, misreads packed zero points: "
                    "docs/deploy.md); quantize with symmetric = true for plain loading", folder, len(asymmetric),
                    asymmetric[0])
    grids = {}
    for name in quantized:
        module = model.get_submodule(name)
        grids[name] = tuple(module._buffers.pop(b) for b in QUANT_BUFFERS)
    config = quantization_config(model, quantized)
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for name, (scale, zero) in grids.items():
            module = model.get_submodule(name)
            if module.weight_scale.shape != scale.shape:
                raise OutputError(f"{name}: scales shaped {tuple(scale.shape)}, compressed-tensors expects "
                                  f"{tuple(module.weight_scale.shape)}")
            module.weight_scale.copy_(scale)
            if hasattr(module, "weight_zero_point"):  # symmetric schemes keep no zero point
                module.weight_zero_point.copy_(zero - 2 ** (quantized[name]["bits"] - 1))
    compressor = ModelCompressor.from_pretrained_model(model)
    for name in quantized:  # ModelCompressor.compress_model's loop, without its progress bar (--quiet)
        compress_module(model.get_submodule(name))
    compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
    model.save_pretrained(folder, safe_serialization=True)
    compressor.update_config(str(folder))


def load_config() -> Any:
    """The transformers quantization config that loads a compressed-tensors folder as a dense float
    model (decompressed at load; also the only mode that loads asymmetric zero points with
    transformers 5.x, see docs/deploy.md)."""
    from transformers import CompressedTensorsConfig

    return CompressedTensorsConfig(dequantize=True)
