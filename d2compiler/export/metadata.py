"""`sparsity.json`: per-layer sparsity and metrics, the pattern, the resolved recipe, package
versions and the weight hash."""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from itertools import chain
from typing import Any

import torch
from torch import nn

FORMAT_VERSION = 1
_PACKAGES = ("d2compiler", "torch", "transformers", "pydantic", "networkx", "safetensors")


@dataclass
class Entries:
    """A tensor of `shape` given as its first-dimension entries in order (one expert of a bank at a
    time), never whole."""

    shape: tuple[int, ...]
    entries: Iterable[torch.Tensor]


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensors_sha256(items: Iterable[tuple[str, torch.Tensor | Entries]]) -> str:
    """sha256 over (name, tensor) pairs, given in name order: each one's name, dtype, shape and raw
    bytes (the same digest for a tensor given whole or as `Entries`)."""
    digest = hashlib.sha256()
    for name, tensor in items:
        if isinstance(tensor, Entries):
            entries = iter(tensor.entries)
            first = next(entries)
            digest.update(f"{name}|{first.dtype}|{tuple(tensor.shape)}|".encode())
            for entry in chain([first], entries):
                digest.update(_bytes(entry))
            continue
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_bytes(tensor))
    return digest.hexdigest()



def weights_sha256(model: nn.Module) -> str:
    """sha256 over the state dict in name order (see `tensors_sha256`)."""
    return tensors_sha256(sorted(model.state_dict().items()))


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def weight_zeros(tensors: Iterable[torch.Tensor]) -> tuple[int, int]:
    """(zeros, entries) over the floating tensors of at least two dimensions among `tensors` (pass
    weights only: no biases, which an expert bank stores 2-D)."""
    zeros = entries = 0
    for t in tensors:
        if t.is_floating_point() and t.dim() >= 2:
            zeros += int((t == 0).sum())
            entries += t.numel()
    return zeros, entries


def module_weights(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every weight of `module` as the model computes with it: parameters, and the dense weight of a
    layer stored packed (whose own tensors are its values and metadata)."""
    packed = {name for name, m in module.named_modules() if hasattr(m, "dense_weight")}
    for name, m in module.named_modules():
        if name in packed:
            yield m.dense_weight()
    for name, param in module.named_parameters():
        if name.rpartition(".")[0] not in packed and not name.endswith("bias"):
            yield param.detach()


def overall_sparsity(layers: dict[str, dict[str, Any]]) -> float:
    """Zero fraction over all pruned layers together."""
    pruned = [m for m in layers.values() if "shape" in m and "sparsity" in m]  # not layers only observed
    total = sum(m["shape"][0] * m["shape"][1] for m in pruned)
    zeros = sum(m["sparsity"] * m["shape"][0] * m["shape"][1] for m in pruned)
    return zeros / total if total else 0.0


def sparsity_record(*, model: nn.Module, recipe: dict[str, Any], layers: dict[str, dict[str, Any]],
                    patterns: list[str], blocks: list[dict[str, Any]], results: dict[str, Any],
                    sha256: str | None = None) -> dict[str, Any]:
    """The record; `sha256` is the weights' hash when the caller computed it (a streaming run)."""
    return {
        "format_version": FORMAT_VERSION,
        "patterns": patterns,
        "overall_sparsity": overall_sparsity(layers),
        "weights_sha256": sha256 or weights_sha256(model),
        "results": results,
        "layers": layers,
        "blocks": blocks,
        "recipe": recipe,
        "versions": package_versions(),
    }
