"""What a model takes and what it is for, found from transformers' own registries (never from
names): its main input (token ids or pixel values) and its task (causal LM, image classifier, or
an encoder)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

Task = Literal["causal-lm", "image-classification", "encoder"]


def takes_images(model: nn.Module) -> bool:
    """Whether the model's main input is `pixel_values` (a transformers vision model)."""
    return getattr(model, "main_input_name", "input_ids") == "pixel_values"


def _class_names(mapping: Any) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return names


def model_task(model: nn.Module) -> Task:
    """`causal-lm` or `image-classification` when the model's class is registered for that task in
    transformers' auto mappings (or it returns logits over a vocabulary / labels), else `encoder`."""
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    if name in _class_names(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return "causal-lm"
    if name in _class_names(modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES):
        return "image-classification"
    return "encoder"


def dummy_input(model: nn.Module, tokens: int = 16) -> torch.Tensor:
    """A random input of the right kind (one image, or `tokens` token ids) for tracing."""
    config = getattr(model, "config", None)
    if takes_images(model):
        size = getattr(config, "image_size", 224)
        h, w = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return torch.rand(1, getattr(config, "num_channels", 3), h, w)
    vocab = getattr(config, "vocab_size", 100) or 100
    return torch.randint(0, vocab, (1, tokens))
