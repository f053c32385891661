"""d2compiler: a declarative, pass-based compression compiler for transformer models.

Public API: `load_recipe`, `validate_recipe`, `compress`, `load_model`, `load` (a d2c output folder).
They are imported on first use, so that importing the package itself is cheap (a launched process
binds its lifetime to its launcher's before torch is imported: `d2compiler.lifetime`)."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["compress", "load", "load_model", "load_recipe", "validate_recipe", "RunSummary"]
__version__ = "0.1.0"

_HOMES = {"compress": "d2compiler.driver.pipeline", "RunSummary": "d2compiler.driver.summary",
          "load": "d2compiler.loading.models", "load_model": "d2compiler.loading.models",
          "load_recipe": "d2compiler.recipe.schema", "validate_recipe": "d2compiler.recipe.schema"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'd2compiler' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
