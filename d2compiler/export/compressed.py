"""The `compressed-tensors` output format: a transformers folder that vLLM and transformers load as a
quantized checkpoint (`quantization_config.quant_method = "compressed-tensors"`).

Written with the `compressed-tensors` package's own API: a `QuantizationConfig` with one config
group per (bits, group size, symmetric) combination that the quantization passes produced, targets
naming the quantized linears exactly and `ignore` naming every other linear; `apply_quantization_config`
attaches the schemes, our scales and zero points are copied in, the package's `compress_module`
packs each layer and `ModelCompressor` writes the config (the package picks `pack-quantized` for weight-only int4 and int8) and writes the config.

A model whose Mixture-of-Experts banks are quantized gets one config group targeting `Linear` (the
layout of published compressed-tensors MoE checkpoints, which vLLM's fused-MoE method reads), each
bank written as the per-expert linears of the model's checkpoint layout (`compressed_experts`).

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
from d2compiler.export.compressed_experts import (
    Grid,
    QuantizedBank,
    expert_linears,
    grid_of,
    module_tree,
    quantized_banks,
)
from d2compiler.graph.experts import is_bank_expert
from d2compiler.graph.packing import QUANT_BUFFERS

FORMAT = "compressed-tensors"
log = logging.getLogger(__name__)
INSTALL_HINT = "install it with pip install 'd2compiler[deploy]' (compressed-tensors needs Python >= 3.11)"


def available() -> bool:
    """Whether the optional `compressed-tensors` package is installed."""
    return importlib.util.find_spec("compressed_tensors") is not None


def quantized_layers(model: nn.Module, layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> the `quant` entry of every recorded linear module that a quantization pass produced
    (checked: each must be an `nn.Linear` carrying its scales and zero points). The experts of 3-D
    banks are left to `compressed_experts`."""
    found = {}
    for name, layer in layers.items():
        quant = layer.get("quant")
        if not quant or is_bank_expert(model, name):
            continue
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            raise OutputError(f"{name}: compressed-tensors stores torch.nn.Linear layers, and this layer is a "
                              f"{type(module).__name__}; export it with --format hf or onnx")
        if not all(hasattr(module, b) for b in QUANT_BUFFERS):
            raise OutputError(f"{name}: sparsity.json says it is quantized, but the model has no scales for it "
                              "(was quantization.safetensors removed from the output folder?)")
        found[name] = quant
    return found


def weight_args(grid: Grid) -> Any:
    """The package's weight-only `QuantizationArgs` of one grid (bits, group size or 0 per channel, symmetric)."""
    from compressed_tensors.quantization import QuantizationArgs

    bits, group_size, symmetric = grid
    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group" if group_size else "channel",
                            group_size=group_size or None)


def quantization_config(model: nn.Module, quantized: dict[str, dict[str, Any]]) -> Any:
    """The package's `QuantizationConfig`: one weight-only group per grid kind, the quantized linears
    as exact targets, every other linear in `ignore`."""
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    kinds: dict[tuple[int, int, bool], list[str]] = {}
    for name, quant in quantized.items():
        kinds.setdefault(grid_of(quant), []).append(name)
    groups = {f"group_{index}": QuantizationScheme(targets=sorted(names), weights=weight_args(grid))
              for index, (grid, names) in enumerate(sorted(kinds.items()))}
    ignore = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in quantized]
    return QuantizationConfig(config_groups=groups, ignore=ignore, quantization_status=QuantizationStatus.FROZEN)


def moe_quantization_config(model: nn.Module, quantized: dict[str, dict[str, Any]], banks: list[QuantizedBank],
                            checkpoint_weights: list[str], experts: set[str]) -> Any:
    """The `QuantizationConfig` of a model with quantized expert banks: one group targeting `Linear`
    (what vLLM's fused-MoE method reads, and the layout of published MoE checkpoints), with every
    linear and 2-D checkpoint weight that is not quantized in `ignore` (routers included), by the
    model's name and by the checkpoint's."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus

    grids = {grid_of(quant) for quant in quantized.values()} | {bank.grid for bank in banks}
    if len(grids) > 1:
        raise OutputError(f"{banks[0].name}: the model's quantized layers use {len(grids)} grids {sorted(grids)}; a "
                          "compressed-tensors Mixture-of-Experts checkpoint is written with one scheme (bits, group "
                          "size, symmetric) for every quantized linear: quantize them alike, or export with --format hf")
    weights = weight_args(grids.pop())
    embeddings = {name for name, module in model.named_modules() if isinstance(module, nn.Embedding)}
    ignore = {name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in quantized}
    ignore |= {key.removesuffix(".weight") for key in checkpoint_weights} - embeddings - set(quantized) - experts
    return QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                              ignore=sorted(ignore), quantization_status=QuantizationStatus.FROZEN)


def _checkpoint_weights(model: nn.Module) -> list[str]:
    """The names of the 2-D `.weight` tensors `save_pretrained` would write (shapes only: converted on
    the meta device)."""
    from transformers.core_model_loading import revert_weight_conversion

    state = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in model.state_dict().items()}
    return [key for key, t in revert_weight_conversion(model, state).items() if key.endswith(".weight") and t.dim() == 2]


def _set_grid(module: nn.Module, scale: torch.Tensor, zero: torch.Tensor, bits: int, name: str) -> None:
    """Copy our scales and (unsigned) zero points into the package's parameters (see the module docstring)."""
    if module.weight_scale.shape != scale.shape:
        raise OutputError(f"{name}: scales shaped {tuple(scale.shape)}, compressed-tensors expects "
                          f"{tuple(module.weight_scale.shape)}")
    module.weight_scale.copy_(scale)
    if hasattr(module, "weight_zero_point"):  # symmetric schemes keep no zero point
        module.weight_zero_point.copy_(zero - 2 ** (bits - 1))


def write_compressed_tensors(folder: Path, model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Write `model` (a d2compiler model whose quantized linears carry `weight_scale` /
    `weight_zero_point` buffers, and whose quantized expert banks carry them stacked) into `folder`
    as a compressed-tensors checkpoint. The model is consumed: its quantized linears are compressed
    in place."""
    if not available():
        raise OutputError(f"format {FORMAT} needs the compressed-tensors package; {INSTALL_HINT}")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.base import compress_module
    from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config

    banks = quantized_banks(model, layers)
    quantized = quantized_layers(model, layers)
    if not quantized and not banks:
        raise OutputError("compressed-tensors stores quantized weights and this output has no quantized layer: add a "
                          "quantization pass to the recipe, or write format hf")
    asymmetric = [name for name, quant in quantized.items() if not quant["symmetric"]] + [b.name for b in banks if not b.grid[2]]
    if asymmetric:
        log.warning("%s: %d linear(s) (e.g. %s) have asymmetric grids: written in compressed-tensors' own layout, "
                    "which loads with CompressedTensorsConfig(dequantize=True) (and d2compiler.load) but not with plain "
                    "from_pretrained (transformers' compressed mode, up to 5.25 at least, misreads packed zero points: "
                    "docs/deploy.md); quantize with symmetric = true for plain loading", folder, len(asymmetric),
                    asymmetric[0])
    checkpoint_weights = _checkpoint_weights(model) if banks else []
    experts, replaced = expert_linears(model, banks)
    grids = {name: (model.get_submodule(name), quant["bits"]) for name, quant in quantized.items()}
    grids.update({name: (linear, banks[0].grid[0]) for name, linear in experts.items()})
    buffers = {name: tuple(module._buffers.pop(b) for b in QUANT_BUFFERS) for name, (module, _bits) in grids.items()}
    config = (moe_quantization_config(model, quantized, banks, checkpoint_weights, set(experts)) if banks
              else quantization_config(model, quantized))
    apply_quantization_config(model, config, show_progress=False)
    tree = module_tree(experts)
    if experts:
        apply_quantization_config(tree, config, show_progress=False)
    with torch.no_grad():
        for name, (module, bits) in grids.items():
            _set_grid(module, *buffers[name], bits, name)
    compressor = ModelCompressor.from_pretrained_model(model)
    for module, _bits in grids.values():  # ModelCompressor.compress_model's loop, without its progress bar (--quiet)
        compress_module(module)
    compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
    if experts:
        from transformers.core_model_loading import revert_weight_conversion

        state = {k: v for k, v in revert_weight_conversion(model, dict(model.state_dict())).items() if k not in replaced}
        model.save_pretrained(folder, safe_serialization=True, state_dict={**state, **tree.state_dict()},
                              save_original_format=False)
    else:
        model.save_pretrained(folder, safe_serialization=True)
    compressor.update_config(str(folder))


def load_config() -> Any:
    """The transformers quantization config that loads a compressed-tensors folder as a dense float
    model (decompressed at load; also the only mode that loads asymmetric zero points with
    transformers 5.x, see docs/deploy.md)."""
    from transformers import CompressedTensorsConfig

    return CompressedTensorsConfig(dequantize=True)
