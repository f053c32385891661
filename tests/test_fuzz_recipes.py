"""Fuzz the recipe loader (TOML and JSON) with hypothesis, with a fixed seed: whatever the input,
loading either succeeds or raises `RecipeError` whose every line is `source: location: message`;
never another exception, never a traceback."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import tomli_w
import tomllib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d2compiler.errors import RecipeError
from d2compiler.recipe.recipe_text import apply_overrides, parse_text
from d2compiler.recipe.schema import validate_recipe

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [tomllib.loads(p.read_text()) for p in sorted((ROOT / "recipes").glob("*.toml"))]
FUZZ = settings(max_examples=1500, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SEGMENT = r'(\.?[A-Za-z_][\w-]*|\[\d+\]|\["(?:[^"\\]|\\.)*"\])'
OVERRIDE = r'--set ([\w.-]+|"(?:[^"\\]|\\.)*")'
LINE = re.compile(rf"^  (\S+\.(toml|json)|<recipe>): (<root>|{SEGMENT}+|{OVERRIDE}): .+$")

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["2:4", "4:8", "4:4", "0:4", "2:0", "re:(", "re:.*", "role:q", "kl", "fixed", "calibrate",
                     "sparsegpt", "dual_taylor_mask", "float32", "auto", "builtin:python-docs", "hf", "one-off"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=8)
KEYS = ["version", "model", "source", "dtype", "device", "roles", "data", "calibration", "evaluation", "samples",
        "seq_len", "sampling", "seed", "passes", "type", "sparsity", "mask_structure", "targets", "ignore",
        "block_size", "dampening_frac", "lambda1", "lambda2", "s", "stats", "rho", "strategy", "candidates",
        "no_update", "selection", "kl_samples", "refit_steps", "output", "path", "format", "overwrite", "resume", "hessian"]


def assert_clean(call) -> None:
    try:
        call()
    except RecipeError as exc:
        head, *lines = str(exc).splitlines()
        assert head == "invalid recipe" and lines and exc.problems
        for line in lines:
            assert LINE.match(line), line


@st.composite
def mutated(draw) -> Any:
    """A shipped recipe with random keys set, replaced or deleted, at any depth."""
    data = json.loads(json.dumps(draw(st.sampled_from(SEEDS))))
    for _ in range(draw(st.integers(1, 4))):
        node = data
        for _depth in range(draw(st.integers(0, 3))):
            children = [k for k, v in (node.items() if isinstance(node, dict) else enumerate(node)) if isinstance(v, (dict, list))]
            if not children:
                break
            node = node[draw(st.sampled_from(children))]
        if isinstance(node, dict):
            key = draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)))
            if draw(st.booleans()) and key in node:
                del node[key]
            else:
                node[key] = draw(values)
        elif node:
            node[draw(st.integers(0, len(node) - 1))] = draw(values)
    return data


def _toml(data: Any) -> str | None:
    try:
        return tomli_w.dumps(data)
    except (TypeError, ValueError):
        return None  # not representable in TOML (None, non-table root, ...): covered by the JSON path


@FUZZ
@given(st.text(max_size=300), st.sampled_from(["r.toml", "r.json"]))
def test_arbitrary_text(text, name):
    assert_clean(lambda: validate_recipe(parse_text(text, name), name))


@FUZZ
@given(mutated())
def test_mutated_recipes_as_json_and_toml(data):
    assert_clean(lambda: validate_recipe(parse_text(json.dumps(data), "r.json"), "r.json"))
    text = _toml(data)
    if text is not None:
        assert_clean(lambda: validate_recipe(parse_text(text, "r.toml"), "r.toml"))


@FUZZ
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.sampled_from(["passes.1.sparsity", "passes.0.type", "model.source",
                                                                   "passes.9.rho", "data.calibration.samples", "x.y",
                                                                   "passes", "version", "passes.-1.s"]),
                                                  st.text(max_size=10)), max_size=3))
def test_overrides(seed, pairs):
    overrides = [f"{k}={v}" for k, v in pairs]
    assert_clean(lambda: validate_recipe(apply_overrides(json.loads(json.dumps(seed)), overrides, "r.toml"), "r.toml"))


def test_fuzz_found_real_values():
    """The NaN/inf floats the fuzzer generates are rejected with a location, not accepted."""
    data = json.loads(json.dumps(SEEDS[0]))
    data["passes"][-1]["sparsity"] = math.nan
    data["passes"][-1].pop("mask_structure", None)
    assert_clean(lambda: validate_recipe(data, "r.json"))
