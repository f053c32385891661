"""The calibration batches a recipe's `data.calibration` describes, from its resolved source:
token windows shaped (batch, seq_len) or images fitted to the model (batch, C, H, W)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from d2compiler.errors import DataError
from d2compiler.evaluation.data import (
    calibration_windows,
    leading_tokens,
    load_text,
    load_token_windows,
    select_windows,
    tokenize,
)
from d2compiler.evaluation.images import fit_to_model, image_batches, load_images
from d2compiler.evaluation.sources import ResolvedSource


def _stack(windows: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    return [torch.cat(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]


def calibration_inputs(resolved: ResolvedSource, model: nn.Module, tokenizer: Any) -> list[torch.Tensor]:
    """The calibration batches of `resolved` (a `CalibrationData` resolved for `model`): token
    windows shaped (batch, seq_len), or images fitted to the model (with `tokenizer`, its image
    processor) shaped (batch, C, H, W)."""
    spec = resolved.spec
    if resolved.kind == "images":
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
    if resolved.kind == "token-windows":
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
                                      offset=spec.offset, source=spec.source)
    return _stack(windows, spec.batch_size)
