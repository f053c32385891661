"""Behaviour stays identical across refactors: every shipped recipe, run on a tiny model with a few
calibration windows, gives the `weights_sha256` recorded in tests/pinned_weights.json.

The file is written by `python -m tests.test_pinned_weights` (run it only when a change is meant to
alter results, and say why in the commit). The hashes are bit-exact float results, so they are
compared only on the CPU kind and torch version that wrote them; elsewhere the test is skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch

ROOT = Path(__file__).resolve().parents[1]
PINNED = Path(__file__).with_name("pinned_weights.json")
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.toml"))


def machine() -> dict[str, str]:
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def tiny_recipe(name: str, models: dict[str, Path]) -> dict[str, Any]:
    """The shipped recipe `name` on the tiny model of its kind, 4 calibration windows, no evaluation
    and no output (the weights are hashed in memory)."""
    data = tomllib.loads((ROOT / "recipes" / name).read_text())
    kind = "vit" if "vit" in name else "bert" if "minilm" in name else "llama"
    data["model"] |= {"source": str(models[kind]), "device": "cpu", "dtype": "float32", "streaming": False}
    calibration = data["data"]["calibration"]
    if kind != "vit":
        calibration |= {"source": "builtin:python-docs", "seq_len": 64}
    calibration["samples"] = 4
    data["data"].pop("evaluation", None)
    data.pop("output", None)
    return data


def weights_hash(data: dict[str, Any]) -> str:
    from d2compiler.driver.pipeline import compress
    from d2compiler.recipe.schema import validate_recipe

    return compress(validate_recipe(data), quiet=True).record["weights_sha256"]


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipe_weights_are_pinned(name, tiny_models):
    pinned = json.loads(PINNED.read_text())
    if pinned["machine"] != machine():
        pytest.skip(f"hashes pinned on {pinned['machine']}, this is {machine()}")
    assert name in pinned["hashes"], f"{name} is not pinned: run python -m tests.test_pinned_weights"
    assert weights_hash(tiny_recipe(name, tiny_models)) == pinned["hashes"][name]


def main() -> None:
    """Write tests/pinned_weights.json from the current code."""
    import tempfile

    from d2compiler.evaluation.synthetic import tiny_tokenizer

    from .conftest import build_tiny

    tokenizer = tiny_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        models = {kind: build_tiny(kind, tokenizer, Path(tmp) / kind) for kind in ("llama", "bert", "vit")}
        hashes = {name: weights_hash(tiny_recipe(name, models)) for name in RECIPES}
    PINNED.write_text(json.dumps({"machine": machine(), "hashes": hashes}, indent=1) + "\n")
    print(json.dumps(hashes, indent=1))


if __name__ == "__main__":
    main()
