"""Pass plugins from other distributions (entry-point group `d2compiler.passes`): the example of
docs/writing-a-pass.md, installed into a temporary site folder on the path, runs from a recipe."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import write_recipe

ROOT = Path(__file__).resolve().parents[1]


def doc_example() -> str:
    """The pass source in docs/writing-a-pass.md (its first python block)."""
    return re.search(r"```python\n(.*?)```", (ROOT / "docs" / "writing-a-pass.md").read_text(), re.S)[1]


def install(site: Path, dist: str, module: str, source: str, entry: str) -> None:
    """A minimal installed distribution: the module and its dist-info with the entry point."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[d2compiler.passes]\n{entry}\n")


def d2c(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "d2compiler", *args], env=env, capture_output=True, text=True, timeout=300)


def test_plugin_pass_runs_from_a_recipe(tmp_path, tiny_models):
    site = tmp_path / "site"
    install(site, "d2c-row-magnitude", "d2c_row_magnitude", doc_example(), "row_magnitude = d2c_row_magnitude:RowMagnitudePass")
    schema = d2c(site, "schema")
    assert schema.returncode == 0, schema.stderr
    assert "row_magnitude" in json.dumps(json.loads(schema.stdout))

    passes = '[[passes]]\ntype = "row_magnitude"\nsparsity = 0.25\nignore = ["role:down"]\n'
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), passes, output=out)
    run = d2c(site, "--quiet", "run", str(recipe))
    assert run.returncode == 0, run.stderr
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    up = weights["model.layers.0.mlp.up_proj.weight"]
    assert ((up == 0).sum(dim=1) == 16).all()  # 25% of each row of 64 inputs
    assert (weights["model.layers.0.mlp.down_proj.weight"] != 0).all()  # ignored
    record = json.loads((out / "sparsity.json").read_text())
    assert record["layers"]["model.layers.1.self_attn.q_proj"]["passes"] == ["row_magnitude"]

    bad = write_recipe(tmp_path / "b.toml", str(tiny_models["llama"]), '[[passes]]\ntype = "row_magnitude"\nsparsity = 1.5\n')
    checked = d2c(site, "validate", str(bad))
    assert checked.returncode == 2 and "b.toml: passes[0].sparsity: Input should be less than 1" in checked.stderr
    assert "Traceback" not in checked.stderr
    without = d2c(tmp_path / "empty-site", "validate", str(recipe))  # not installed: an unknown type
    assert without.returncode == 2 and "row_magnitude" in without.stderr


def test_broken_or_clashing_plugin_is_one_located_line(tmp_path, tiny_models):
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), '[[passes]]\ntype = "magnitude"\nsparsity = 0.5\n')
    broken = tmp_path / "broken"
    install(broken, "d2c-broken", "d2c_broken", "import no_such_module\n", "broken = d2c_broken")
    result = d2c(broken, "validate", str(recipe))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "plugin 'broken' (d2compiler.passes: d2c_broken, from d2c-broken 0.1) failed to load: ModuleNotFoundError" in lines[0]

    clash = tmp_path / "clash"
    source = doc_example().replace('name = "row_magnitude"', 'name = "magnitude"').replace("@register_pass\n", "")
    install(clash, "d2c-clash", "d2c_clash", source, "magnitude = d2c_clash:RowMagnitudePass")
    result = d2c(clash, "validate", str(recipe))
    assert result.returncode == 2 and "pass name 'magnitude' registered twice" in result.stderr, result.stderr


class _Breaks:
    """Passes registered for one test (and removed after): each breaks a default postcondition, adds
    its own, breaks its word (writes while reporting `modified = False` or declaring `reads_only`),
    or raises."""

    @staticmethod
    def define():
        import torch

        from d2compiler.contract import Pass, PassResult, TargetedParams

        class Revive(Pass):
            name = "test_revive"
            Params = TargetedParams

            def apply(self, ctx):
                for layer in ctx.select(self.params):
                    layer.set_weight_matrix(torch.ones_like(layer.weight_matrix()))
                return PassResult(modified=True)

        class Poison(Revive):
            name = "test_poison"

            def apply(self, ctx):
                layer = ctx.select(self.params)[0]
                weight = layer.weight_matrix().clone()
                weight[0, 0] = float("nan")
                layer.set_weight_matrix(weight)
                return PassResult(modified=True)

        class Strict(Revive):
            name = "test_strict"

            def apply(self, ctx):
                return PassResult(modified=False)

            def postconditions(self, ctx, result):
                layer = ctx.select(self.params)[0]
                return super().postconditions(ctx, result) + [((layer.weight_matrix() != 0).sum(), f"kept {{}} nonzeros in {layer.name}")]

        class ReadOnly(Revive):
            name = "test_readonly"
            reads_only = True  # but it writes (without reviving a weight or leaving a NaN)

            def apply(self, ctx):
                layer = ctx.select(self.params)[0]
                layer.set_weight_matrix(layer.weight_matrix() * 2)
                return PassResult(modified=True)

        class Unmodified(Revive):
            name = "test_unmodified"

            def apply(self, ctx):  # writes, and says it did not: the next block would see the dense outputs
                layer = ctx.select(self.params)[0]
                layer.set_weight_matrix(layer.weight_matrix() * 2)
                return PassResult(modified=False)

            def postconditions(self, ctx, result):  # and skips the default checks: the executor's own still run
                return []

        class Crash(Revive):
            name = "test_crash"

            def apply(self, ctx):
                return {}["no such key"]

        return [Revive, Poison, Strict, ReadOnly, Unmodified, Crash]


def test_postconditions_name_the_pass_the_block_and_what_ran_before(tmp_path, tiny_models, capsys):
    from d2compiler.cli import main
    from d2compiler.recipe.registry import PASSES

    with PASSES.temporarily(*_Breaks.define()):
        expected = {"test_revive": "pass 'test_revive' revived 2048 pruned weights of model.layers.0.self_attn.q_proj "
                                   "(block 0; passes run before: magnitude)",
                    "test_poison": "pass 'test_poison' left 1 NaN or Inf values in model.layers.0.self_attn.q_proj "
                                   "(block 0; passes run before: magnitude)",
                    "test_strict": "pass 'test_strict' kept 2048 nonzeros in model.layers.0.self_attn.q_proj "
                                   "(block 0; passes run before: magnitude)",
                    "test_readonly": "pass 'test_readonly' declares reads_only but wrote self_attn.q_proj.weight "
                                     "(block 0; passes run before: magnitude)",
                    "test_unmodified": "pass 'test_unmodified' reported modified = False but wrote self_attn.q_proj.weight "
                                       "(block 0; passes run before: magnitude)",
                    "test_crash": "pass 'test_crash' raised KeyError in apply: 'no such key' (block 0; passes run before: "
                                  "magnitude); --verbose shows the traceback"}
        for name, message in expected.items():
            passes = f'[[passes]]\ntype = "magnitude"\nsparsity = 0.5\n[[passes]]\ntype = "{name}"\ntargets = ["re:.*q_proj"]\n'
            recipe = write_recipe(tmp_path / f"{name}.toml", str(tiny_models["llama"]), passes, output=tmp_path / name)
            assert main(["--quiet", "run", str(recipe)]) == 2
            assert capsys.readouterr().err.strip() == f"error: {message}"
            assert not (tmp_path / name).exists()


CRASHING_PLUGIN = """
from d2compiler.contract import Pass, PassResult, TargetedParams, register_pass


@register_pass
class Crashes(Pass):
    name = "crashes"
    Params = TargetedParams

    def apply(self, ctx):
        raise ZeroDivisionError("the plugin's own bug")
"""


def test_a_plugin_pass_that_raises_is_one_line_naming_the_plugin_the_pass_and_the_block(tmp_path, tiny_models):
    site = tmp_path / "site"
    install(site, "d2c-crashes", "d2c_crashes", CRASHING_PLUGIN, "crashes = d2c_crashes")
    passes = '[[passes]]\ntype = "magnitude"\nsparsity = 0.5\n[[passes]]\ntype = "crashes"\n'
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), passes, output=tmp_path / "out")
    result = d2c(site, "--quiet", "run", str(recipe))
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: pass 'crashes' from plugin 'crashes' (d2compiler.passes: d2c_crashes, from d2c-crashes 0.1) raised "
        "ZeroDivisionError in apply: the plugin's own bug (block 0; passes run before: magnitude); --verbose shows the traceback")
    assert not (tmp_path / "out").exists()
    verbose = d2c(site, "--verbose", "run", str(recipe))  # the traceback, ending in the plugin's line
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr and 'd2c_crashes.py", line 11, in apply' in verbose.stderr


@pytest.mark.parametrize(("source", "entry", "says"), [
    ("import sys\nsys.exit(0)\n", "quits = d2c_plugin", "called sys.exit(0) while loading"),
    ("VALUE = 3\n", "quits = d2c_plugin:VALUE", "names a int: it must name a module that registers its passes or a Pass subclass"),
    (None, "quits = d2c_plugin:RowMagnitudePass", "the default of sparsity (nan) is invalid"),
])
def test_a_plugin_that_quits_names_no_pass_or_breaks_its_defaults_is_one_located_line(source, entry, says, tmp_path, tiny_models):
    if source is None:  # a NaN default that its own ge=0 would refuse
        source = doc_example().replace('sparsity: float = Field(ge=0.0', 'sparsity: float = Field(default=float("nan"), ge=0.0')
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), '[[passes]]\ntype = "magnitude"\nsparsity = 0.5\n')
    site = tmp_path / "site"
    install(site, "d2c-plugin", "d2c_plugin", source, entry)
    commands = [["validate", str(recipe)]] + ([["--quiet", "run", str(recipe)]] if "sys.exit" in source else [])
    for command in commands:  # `run` too for the plugin that quits (it made both exit 0 with nothing done)
        result = d2c(site, *command)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "plugin 'quits' (d2compiler.passes: " in lines[0] and says in lines[0], lines[0]


def test_a_nan_pass_parameter_is_refused(tmp_path, tiny_models):
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]),
                          '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\ndampening_frac = nan\n')
    result = d2c(tmp_path / "empty-site", "validate", str(recipe))
    assert result.returncode == 2 and "passes[1].dampening_frac: Input should be a finite number" in result.stderr and "Traceback" not in result.stderr, result.stderr
