"""A recipe's data source, resolved once: what it holds (text, pre-tokenized token windows, or
images), checked against the model that will read it, so that calibration and every metric take
the typed value instead of each deciding again what the source is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from d2compiler.errors import DataError
from d2compiler.evaluation.data import TOKEN_WINDOWS_KEY, safetensors_keys
from d2compiler.evaluation.images import BUILTIN_DIGITS
from d2compiler.evaluation.model_kind import takes_images

SourceKind = Literal["text", "token-windows", "images"]


@dataclass(frozen=True)
class ResolvedSource:
    """`spec` (a recipe's `CalibrationData` or `EvaluationData`) with its kind, checked against the
    model: a vision model reads images, the others text or token windows no longer than the model's
    positions. `field` names the recipe table in errors (`data.calibration`)."""

    spec: Any
    kind: SourceKind
    field: str

    @property
    def source(self) -> str:
        return self.spec.source


def source_kind(source: str) -> SourceKind:
    """What a source holds, from its name and (for a `.safetensors` file) its tensor names, read once:
    `input_ids` is pre-tokenized windows, anything else in such a file (or `builtin:digits`) images,
    every other source text (a builtin corpus, a text or jsonl file, a hub dataset)."""
    if source == BUILTIN_DIGITS:
        return "images"
    path = Path(source).expanduser()
    if path.suffix == ".safetensors":
        return "token-windows" if path.is_file() and TOKEN_WINDOWS_KEY in safetensors_keys(source) else "images"
    return "text"


def resolve_source(spec: Any, model: nn.Module, field: str) -> ResolvedSource:
    """Classify `spec.source` and check it fits `model`; every problem is a `DataError` naming `field`."""
    kind, name = source_kind(spec.source), type(model).__name__
    if takes_images(model) and kind != "images":
        raise DataError(f"{field}.source: {name} takes images, but {spec.source!r} is text; use "
                        "`builtin:digits` or a .safetensors file with `pixel_values`")
    if not takes_images(model) and kind == "images":
        if spec.source.endswith(".safetensors"):
            keys = safetensors_keys(spec.source)
            if "pixel_values" not in keys:
                raise DataError(f"{field}.source: {spec.source} has no `input_ids` tensor of token windows (windows, seq_len) "
                                f"for {name}; it holds: {', '.join(keys[:5]) or 'nothing readable'}")
        raise DataError(f"{field}.source: {spec.source!r} holds images, but {name} takes token ids")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if kind != "images" and isinstance(limit, int) and spec.seq_len > limit:
        raise DataError(f"{field}.seq_len: {spec.seq_len} tokens is more than the model's max_position_embeddings ({limit})")
    return ResolvedSource(spec, kind, field)
