"""The compute device and the dtypes a run computes and stores in, from the recipe's names."""

from __future__ import annotations

from typing import Any

import torch

from d2compiler.errors import ModelLoadError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU. Asking for `cuda` without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device = 'cuda' but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | str:
    """Map the recipe's dtype name; `auto` keeps the checkpoint's own dtype (bf16 stays bf16, an fp32
    checkpoint stays fp32; but see `compute_dtype` on the CPU). Statistics and OBS solves are float32
    whatever this is."""
    if dtype == "auto":
        return "auto"
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `bfloat16`, as recipes and records write dtypes."""
    return str(dtype).removeprefix("torch.")


def stored_dtype(config: Any) -> torch.dtype:
    """The dtype a checkpoint's config declares for its weights (float32 when it declares none)."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return stored if isinstance(stored, torch.dtype) else DTYPES.get(str(stored).removeprefix("torch."), torch.float32)


def compute_dtype(stored: torch.dtype, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """`dtype = "auto"`: (the dtype to compute in, the dtype to store in when it differs). On the CPU
    a bfloat16 or float16 checkpoint computes in float32 (half-precision matmuls are several times
    slower on CPUs) and is stored in its own dtype; on CUDA it computes in its own dtype."""
    if device.type == "cpu" and stored in (torch.bfloat16, torch.float16):
        return torch.float32, stored
    return stored, None
