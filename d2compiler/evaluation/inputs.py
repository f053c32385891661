"""What a model takes and what it is for, found from transformers' own registries (never from
names): its main input (token ids or pixel values) and its task (causal LM, image classifier,
or an encoder), plus the calibration batches a recipe's `data.calibration` describes."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from d2compiler.errors import DataError
from d2compiler.evaluation.data import (
    calibration_windows,
    is_token_windows_file,
    leading_tokens,
    load_text,
    load_token_windows,
    safetensors_keys,
    select_windows,
    tokenize,
)
from d2compiler.evaluation.images import fit_to_model, image_batches, is_image_source, load_images

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


def check_source_fits(model: nn.Module, source: str, field: str) -> None:
    """Image sources for vision models, text for the rest; the error names the recipe field."""
    if takes_images(model) and not is_image_source(source):
        raise DataError(f"{field}: {type(model).__name__} takes images, but {source!r} is text; use "
                        "`builtin:digits` or a .safetensors file with `pixel_values`")
    if not takes_images(model) and is_image_source(source):
        if source.endswith(".safetensors"):
            keys = safetensors_keys(source)
            if "pixel_values" not in keys:
                raise DataError(f"{field}: {source} has no `input_ids` tensor of token windows (windows, seq_len) for "
                                f"{type(model).__name__}; it holds: {', '.join(keys[:5]) or 'nothing readable'}")
        raise DataError(f"{field}: {source!r} holds images, but {type(model).__name__} takes token ids")



def check_seq_len(model: nn.Module, seq_len: int, field: str) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise DataError(f"{field}: {seq_len} tokens is more than the model's max_position_embeddings ({limit})")


def _stack(windows: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    return [torch.cat(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]


def calibration_inputs(spec: Any, model: nn.Module, tokenizer: Any) -> list[torch.Tensor]:
    """The calibration batches of `spec` (a `CalibrationData`): token windows shaped
    (batch, seq_len), or images fitted to the model (with `tokenizer`, its image processor) shaped
    (batch, C, H, W)."""
    check_source_fits(model, spec.source, "data.calibration.source")
    if takes_images(model):
        images = load_images(spec.source, "calibration")
        count = len(images.pixels)
        if spec.offset + spec.samples > count:
            skipped = f" after {spec.offset} skipped" if spec.offset else ""
            raise DataError(f"data.calibration.samples: {spec.samples} images asked for{skipped}, {spec.source} has {count}")
        if spec.sampling == "random":
            chosen = torch.randperm(count, generator=torch.Generator().manual_seed(spec.seed))[: spec.samples]
        else:
            chosen = torch.arange(spec.offset, spec.offset + spec.samples)
        return image_batches(fit_to_model(images.pixels[chosen], model.config, tokenizer), spec.batch_size)
    check_seq_len(model, spec.seq_len, "data.calibration.seq_len")
    if is_token_windows_file(spec.source):
        ids = load_token_windows(spec.source, spec.seq_len, getattr(model.config, "vocab_size", None))
        windows = select_windows(ids, spec.samples, sampling=spec.sampling, seed=spec.seed, source=spec.source,
                                 offset=spec.offset)
    else:
        text = {"config": spec.config, "split": spec.split, "field": spec.field}
        if spec.sampling == "sequential":  # only the windows' tokens are read and tokenized
            ids = leading_tokens(tokenizer, spec.source, "calibration", (spec.offset + spec.samples) * spec.seq_len, **text)
        else:  # random windows are drawn over the whole text
            ids = tokenize(tokenizer, load_text(spec.source, "calibration", **text))
        windows = calibration_windows(ids, spec.samples, spec.seq_len, sampling=spec.sampling, seed=spec.seed,
                                      offset=spec.offset)
    return _stack(windows, spec.batch_size)
