"""Recipe schema: valid recipes, located errors, overrides, JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2compiler.cli import main
from d2compiler.errors import RecipeError
from d2compiler.recipe.recipe_text import apply_overrides, parse_text
from d2compiler.recipe.schema import load_recipe, recipe_json_schema, validate_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

BASE = {"version": 1, "passes": [{"type": "calibrate"}, {"type": "sparsegpt", "sparsity": 0.5}]}


def problems(data, source="r.toml"):
    with pytest.raises(RecipeError) as info:
        validate_recipe(data, source)
    return info.value.problems, str(info.value)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")) + sorted(RECIPES.glob("*.json")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.version == 1


def test_defaults_and_pattern():
    recipe = validate_recipe({"version": 1, "passes": [{"type": "magnitude", "mask_structure": "2:4"}]})
    assert recipe.passes[0].n_of_m == (2, 4)
    assert recipe.passes[0].target_sparsity == 0.5
    assert recipe.model.source == "builtin:smollm2-135m"


def test_unknown_key_is_located():
    data = json.loads(json.dumps(BASE))
    data["passes"][1]["sparsty"] = 0.5
    probs, text = problems(data)
    assert ("passes[1].sparsty", "unknown key (not part of the schema; see `d2c schema`)") in probs
    assert "r.toml: passes[1].sparsty" in text


def test_unknown_top_level_and_nested_keys():
    probs, _ = problems({**BASE, "modle": {}, "model": {"sorce": "x"}})
    locs = {loc for loc, _ in probs}
    assert {"modle", "model.sorce"} <= locs


@pytest.mark.parametrize("value", [1.0, 1.5, -0.1])
def test_sparsity_out_of_range(value):
    data = json.loads(json.dumps(BASE))
    data["passes"][1]["sparsity"] = value
    probs, _ = problems(data)
    assert probs[0][0] == "passes[1].sparsity"
    assert repr(value) in probs[0][1]


@pytest.mark.parametrize("structure", ["4:4", "5:4", "0:4", "2-4", "two:four"])
def test_bad_mask_structure(structure):
    probs, _ = problems({"version": 1, "passes": [{"type": "magnitude", "mask_structure": structure}]})
    assert probs[0][0] == "passes[0].mask_structure"


def test_sparsity_contradicting_pattern():
    probs, _ = problems({"version": 1, "passes": [{"type": "magnitude", "mask_structure": "2:4", "sparsity": 0.6}]})
    assert probs[0][0] == "passes[0]" and "contradicts" in probs[0][1]


def test_unstructured_needs_sparsity():
    probs, _ = problems({"version": 1, "passes": [{"type": "magnitude"}]})
    assert "'sparsity' is required" in probs[0][1]


def test_unknown_pass_type_lists_choices():
    probs, _ = problems({"version": 1, "passes": [{"type": "sparsegtp", "sparsity": 0.5}]})
    assert probs[0][0] == "passes[0]"
    assert "'sparsegtp'" in probs[0][1] and "'sparsegpt'" in probs[0][1]


def test_wrong_version_and_types():
    probs, _ = problems({"version": 2, "passes": [{"type": "magnitude", "sparsity": "half"}], "model": {"device": "tpu"}})
    locs = {loc for loc, _ in probs}
    assert {"version", "passes[0].sparsity", "model.device"} <= locs


def test_missing_requirement_names_pass_and_artifact():
    probs, _ = problems({"version": 1, "passes": [{"type": "sparsegpt", "sparsity": 0.5}]})
    loc, msg = probs[0]
    assert loc == "passes"
    assert "passes[0] (sparsegpt) requires 'hessian'" in msg and "'calibrate'" in msg


def test_bad_regex_in_targets():
    probs, _ = problems({"version": 1, "passes": [{"type": "magnitude", "sparsity": 0.5, "targets": ["re:(["]}]})
    assert probs[0][0] == "passes[0].targets"


def test_toml_and_json_syntax_errors():
    with pytest.raises(RecipeError, match=r"x.toml: <root>: invalid TOML"):
        parse_text("version = = 1", "x.toml")
    with pytest.raises(RecipeError, match=r"x.json: <root>: invalid JSON at line 1, column"):
        parse_text("{version: 1}", "x.json")
    with pytest.raises(RecipeError, match="must be a table"):
        parse_text("[1, 2]", "x.json")


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "nope.toml")


def test_overrides():
    data = apply_overrides(BASE, ["passes.1.sparsity=0.6", "model.source=some/folder", "output.resume=false"], "r")
    assert data["passes"][1]["sparsity"] == 0.6
    assert data["model"]["source"] == "some/folder"
    assert data["output"]["resume"] is False
    assert BASE["passes"][1]["sparsity"] == 0.5  # not mutated
    with pytest.raises(RecipeError, match="no list item 5"):
        apply_overrides(BASE, ["passes.5.sparsity=0.6"], "r")
    with pytest.raises(RecipeError, match="dotted.key=value"):
        apply_overrides(BASE, ["passes"], "r")


def test_schema_documents_every_pass():
    schema = recipe_json_schema()
    for name in ("CalibratePass", "MagnitudePass", "WandaPass", "SparsegptPass"):
        assert name in schema["$defs"]
    sparsity = schema["$defs"]["SparsegptPass"]["properties"]["sparsity"]
    assert "Fraction of weights pruned" in sparsity["description"]


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\n[[passes]]\ntype = "wanda"\nsparsity = 1.2\n')
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: passes[0].sparsity:" in err
    assert "Traceback" not in err
    assert main(["validate", str(bad), "--set", "passes.0.sparsity=0.5"]) == 2  # wanda lacks act_norms
    assert "requires 'act_norms'" in capsys.readouterr().err


def test_cli_schema(capsys):
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "Recipe"
