"""Image corpora for vision models: `builtin:digits` (scikit-learn's 8×8 handwritten digits, shipped
with the package, so it works offline) and `.safetensors` files holding `pixel_values`
(N, C, H, W) and optionally `labels` (N,).

The digits are split once by a fixed permutation: the first 75% are the calibration (and training)
part, the rest the evaluation part, so the two never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from d2compiler.errors import DataError
from d2compiler.evaluation.data import CALIBRATION_FRACTION, Part

BUILTIN_DIGITS = "builtin:digits"
DIGITS_SEED = 0


@dataclass
class ImageSet:
    """Images in [0, 1] shaped (N, C, H, W), with class labels (N,) when known."""

    pixels: torch.Tensor
    labels: torch.Tensor | None


def digits(part: Part) -> ImageSet:
    """scikit-learn's digits (1,797 grey 8×8 images, 10 classes), scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a required dependency
        raise DataError(f"{BUILTIN_DIGITS}: the scikit-learn package is needed") from exc
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SEED))
    cut = int(CALIBRATION_FRACTION * len(labels))
    chosen = order[:cut] if part == "calibration" else order[cut:]
    return ImageSet(images[chosen], labels[chosen])


def _safetensors_images(path: Path) -> ImageSet:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise DataError(f"{path}: not a readable safetensors file: {exc}") from None
    pixels = tensors.get("pixel_values")
    if pixels is None or pixels.dim() != 4 or not pixels.is_floating_point():
        raise DataError(f"{path}: needs a floating-point tensor 'pixel_values' shaped (N, C, H, W)")
    labels = tensors.get("labels")
    if labels is not None and labels.shape != (pixels.shape[0],):
        raise DataError(f"{path}: 'labels' must be shaped ({pixels.shape[0]},), got {tuple(labels.shape)}")
    return ImageSet(pixels.float(), None if labels is None else labels.long())


def load_images(source: str, part: Part) -> ImageSet:
    """The images of an image source (see the module docstring)."""
    if source == BUILTIN_DIGITS:
        return digits(part)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"{source}: no such file")
    return _safetensors_images(path)


def fit_to_model(pixels: torch.Tensor, config: object, processor: Any = None) -> torch.Tensor:
    """Images as the model expects them: resized to `config.image_size`, grey repeated to
    `config.num_channels`, normalised with the image processor's `image_mean` / `image_std` when
    it has them, else mean 0.5 and std 0.5 (the ViT convention)."""
    size = getattr(config, "image_size", pixels.shape[-1])
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    channels = getattr(config, "num_channels", pixels.shape[1])
    if tuple(pixels.shape[-2:]) != size:
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
    if pixels.shape[1] != channels:
        if pixels.shape[1] != 1:
            raise DataError(f"images have {pixels.shape[1]} channels but the model takes {channels}")
        pixels = pixels.expand(-1, channels, -1, -1)
    mean, std = getattr(processor, "image_mean", None) or 0.5, getattr(processor, "image_std", None) or 0.5
    shape = (1, -1, 1, 1)
    return (pixels - torch.tensor(mean, dtype=pixels.dtype).reshape(shape)) / torch.tensor(std, dtype=pixels.dtype).reshape(shape)


def image_batches(pixels: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive batches of at most `batch_size` images."""
    return [pixels[i : i + batch_size].contiguous() for i in range(0, len(pixels), batch_size)]
