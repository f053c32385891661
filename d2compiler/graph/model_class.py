"""Which transformers class a model's config names (the one decision every loader shares)."""

from __future__ import annotations

from typing import Any

from d2compiler.errors import ModelLoadError


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
