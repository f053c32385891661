"""A model's config and the transformers class it names (what every loader shares); a model that
cannot be read or built is a `ModelLoadError` of one line."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from d2compiler.errors import ModelLoadError, first_line


@contextmanager
def model_load_errors(source: str) -> Iterator[None]:
    """Turns what transformers raises for a model it cannot read or build into a ModelLoadError of one
    line located at `source`: a missing or unreachable file, a truncated GGUF header (`struct.error`),
    bad config values (huggingface_hub's strict validators, or a tensor of negative size when the model
    is built), an unknown model type."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        yield
    except OSError as exc:
        raise ModelLoadError(f"{source}: cannot load the model: {first_line(exc)}") from None
    except struct.error as exc:
        raise ModelLoadError(f"{source}: truncated or damaged GGUF file ({first_line(exc)})") from None
    except StrictDataclassError as exc:  # its message names the validator; the cause says what failed
        raise ModelLoadError(f"{source}: unsupported model: {first_line(exc.__cause__ or exc)}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{source}: unsupported model: {first_line(exc)}") from None
    except RuntimeError as exc:  # torch, while the model is built: a negative size, too little memory
        raise ModelLoadError(f"{source}: cannot build the model: {first_line(exc)}") from None


def read_config(folder: str, source: str, **extra: Any) -> Any:
    """The transformers config of `folder` (a folder or a hub id; `extra`: `gguf_file`, `revision`).
    Raises ModelLoadError, located at `source`, when it cannot be read or is not valid."""
    from transformers import AutoConfig

    with model_load_errors(source):
        return AutoConfig.from_pretrained(folder, **extra)


def model_class(config: Any, source: str) -> Any:
    """The transformers model class named by the config's `architectures` (refused when that names
    anything but a `PreTrainedModel` subclass), else AutoModelForCausalLM."""
    import transformers

    names = getattr(config, "architectures", None) or []
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ModelLoadError(f"{source}: config.json: `architectures` must be a list of class names")
    for arch in names:
        cls = getattr(transformers, arch, None) if arch.isidentifier() else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    if names:
        raise ModelLoadError(f"{source}: config.json: architectures {names} names no transformers model class")
    return transformers.AutoModelForCausalLM
