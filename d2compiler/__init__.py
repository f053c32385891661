"""d2compiler: a declarative, pass-based compression compiler for transformer models.

Public API: `load_recipe`, `validate_recipe`, `compress`, `load_model`, `load` (a d2c output folder)."""

from d2compiler.driver.pipeline import RunSummary, compress
from d2compiler.loading.models import load, load_model
from d2compiler.recipe.schema import load_recipe, validate_recipe

__all__ = ["compress", "load", "load_model", "load_recipe", "validate_recipe", "RunSummary"]
__version__ = "0.1.0"
