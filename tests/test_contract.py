"""The pass contract: declared artifacts, recipes whose parts do not fit rejected by `d2c validate`,
update plans honoured by every OBS pass, and the import graph (no cycles; `passes/` imports only
the public contract)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import networkx as nx
import pytest
import torch

from d2compiler.cli import main
from d2compiler.errors import RecipeError
from d2compiler.recipe.schema import validate_recipe

from .conftest import write_recipe

ROOT = Path(__file__).resolve().parents[1]
CAL = {"type": "calibrate"}


def recipe(*passes: dict) -> dict:
    return {"version": 1, "passes": [CAL, *passes]}


@pytest.mark.parametrize("passes,message", [
    ([{"type": "attention_kl_update"}],
     "pass 'attention_kl_update' provides 'update_plan', but no later pass uses it, so it would do nothing; add a pass "
     "of type 'admm' or 'dual_taylor_mask' or 'sparsegpt' after it"),
    ([{"type": "attention_kl_update", "strategy": "fixed"}, {"type": "wanda", "sparsity": 0.5}],
     "pass 'attention_kl_update' provides 'update_plan', but no later pass uses it"),
])
def test_recipes_that_used_to_be_silently_wrong_are_rejected(passes, message, tmp_path, capsys):
    with pytest.raises(RecipeError, match="passes: " + message.replace("(", r"\(").replace(")", r"\)")):
        validate_recipe(recipe(*passes))
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe(*passes)))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"r.json: passes: {message}" in err and "Traceback" not in err


def test_sparsegpt_honours_an_update_plan(tmp_path, tiny_models):
    """A fixed plan leaving k and v without the update: their kept weights are the dense ones (the
    SparseGPT mask alone), while q and o are reconstructed."""
    from safetensors.torch import load_file

    passes = ('[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "attention_kl_update"\nstrategy = "fixed"\n'
              'no_update = ["k", "v"]\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n')
    out = tmp_path / "out"
    assert main(["--quiet", "run", str(write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), passes, output=out))]) == 0
    dense = load_file(str(tiny_models["llama"] / "model.safetensors"))
    pruned = load_file(str(out / "model.safetensors"))
    for role, updated in (("q", True), ("k", False), ("v", False), ("o", True)):
        key = f"model.layers.0.self_attn.{role}_proj.weight"
        kept = pruned[key] != 0
        assert int((~kept).sum()) == pruned[key].numel() // 2
        assert torch.equal(pruned[key][kept], dense[key][kept]) is not updated, role
    record = json.loads((out / "sparsity.json").read_text())
    assert record["layers"]["model.layers.1.self_attn.k_proj"]["update"] is False
    assert record["attention_choices"] == {"0": ["k", "v"], "1": ["k", "v"]}


def test_kl_strategy_needs_a_pass_that_computes_variants():
    from d2compiler.contract import Pass, PassParams, PassResult
    from d2compiler.recipe.registry import PASSES

    class PlanReader(Pass):
        name = "test_plan_reader"
        Params = PassParams
        optional = frozenset({"update_plan"})

        def apply(self, ctx):
            return PassResult(modified=False)

    class Unknown(PlanReader):
        name = "test_unknown_artifact"
        requires = frozenset({"no_such_artifact"})

    with PASSES.temporarily(PlanReader, Unknown):
        with pytest.raises(RecipeError, match="strategy 'kl' scores candidates with the pruning pass that applies the plan, "
                                              "and 'test_plan_reader' cannot compute them"):
            validate_recipe(recipe({"type": "attention_kl_update"}, {"type": "test_plan_reader"}))
        validate_recipe(recipe({"type": "attention_kl_update", "strategy": "fixed"}, {"type": "test_plan_reader"}))
        with pytest.raises(RecipeError, match="pass 'test_unknown_artifact' names the artifact 'no_such_artifact', which is "
                                              "not a registered kind"):
            validate_recipe(recipe({"type": "test_unknown_artifact"}))


def test_undeclared_or_mistyped_writes_are_refused(tmp_path, tiny_models, capsys):
    from d2compiler.contract import Pass, PassResult, TargetedParams
    from d2compiler.recipe.registry import PASSES

    class Sneaky(Pass):
        name = "test_sneaky"
        Params = TargetedParams

        def apply(self, ctx):
            ctx.publish("update_plan", ctx.layers[0].name, True)
            return PassResult(modified=False)

    class Mistyped(Sneaky):
        name = "test_mistyped"
        provides = frozenset({"update_plan"})

        def apply(self, ctx):
            ctx.publish("update_plan", ctx.layers[0].name, "yes")
            return PassResult(modified=False)

    with PASSES.temporarily(Sneaky, Mistyped):
        for name, message in (("test_sneaky", "pass 'test_sneaky' wrote the artifact 'update_plan' without declaring it"),
                              ("test_mistyped", "pass 'test_mistyped' published 'update_plan' of model.layers.0.self_attn.q_proj "
                                                "as str; the kind holds bool")):
            path = write_recipe(tmp_path / f"{name}.toml", str(tiny_models["llama"]), f'[[passes]]\ntype = "{name}"\n')
            if name == "test_mistyped":  # its update plan must feed a pass
                path.write_text(path.read_text() + '[[passes]]\ntype = "magnitude"\nsparsity = 0.5\n')
            assert main(["--quiet", "run", str(path)]) == 2
            assert message in capsys.readouterr().err


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of d2compiler/ and passes/ (a package: its __init__)."""
    found = {}
    for top in ("d2compiler", "passes"):
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(typing_only_imports: bool = False) -> nx.DiGraph:
    """module -> module for every import statement (at any depth, lazy ones included; a `from
    package import name` counts as importing the module `package.name` if there is one, else
    `package`). Imports under `if TYPE_CHECKING:` (annotations only) are edges only with
    `typing_only_imports` (an annotation is a dependency for the layering, not a cycle at run time);
    modules found by name at run time (pass discovery: the shipped `passes` package and the plugins'
    entry points) are not edges."""
    known = modules()

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph = nx.DiGraph()
    for module, path in known.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        graph.add_node(module)
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only and not typing_only_imports:  # annotations only, never executed
                continue
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                resolved = resolve(target)
                if resolved and resolved != module:
                    graph.add_edge(module, resolved)
    return graph


def test_passes_import_only_the_public_contract():
    graph = import_graph(typing_only_imports=True)
    outside = {(m, t) for m, t in graph.edges if m.startswith("passes") and t.startswith("d2compiler") and t != "d2compiler.contract"}
    assert not outside, sorted(outside)


def test_import_graph_has_no_cycles():
    cycles = sorted(nx.simple_cycles(import_graph()), key=len)
    assert not cycles, cycles[:5]


def test_the_core_names_no_pass():
    """No pass name and no duck typing on another pass in d2compiler/ (passes declare what the core needs)."""
    from d2compiler.recipe.registry import registered_passes

    names = set(registered_passes())
    for path in (ROOT / "d2compiler").rglob("*.py"):
        text = path.read_text()
        for name in names:
            assert f"'{name}'" not in text and f'"{name}"' not in text and f"`{name}`" not in text, (path, name)
        assert not re.search(r"hasattr\((p|c|consumer|pass_|p\.params|c\.params)\s*,", text), path


LAYERS = [  # top to bottom: a module imports only from its own layer or the layers below it
    {"d2compiler", "d2compiler.__main__", "d2compiler.cli"},
    {"d2compiler.driver"},  # the jobs: compress, plan, export, the launcher
    {"d2compiler.contract"},  # the public pass API (passes/ import only this)
    {"d2compiler.loading"},  # models from every source
    {"d2compiler.evaluation"},  # data sources, inputs, metrics, lm-eval tasks
    {"d2compiler.execution"},  # block executor, placement, checkpoints, processes, streaming
    {"d2compiler.export"},  # output formats
    {"d2compiler.recipe"},  # recipe schema, pass manager, artifact kinds
    {"d2compiler.graph"},  # tracing, roles, attention capture, 2:4 storage
    {"d2compiler.errors", "d2compiler.lifetime", "d2compiler.weight_index", "d2compiler.tensor_file"},  # stdlib-level helpers
]


def layer_of(module: str) -> int:
    for rank, names in enumerate(LAYERS):
        if module in names or any(module.startswith(name + ".") for name in names if name != "d2compiler"):
            return rank
    raise AssertionError(f"{module} is in no layer")


def test_imports_go_one_way_from_the_cli_down_to_the_graph():
    """Annotations included: a lower layer may not name a type of a higher one even under TYPE_CHECKING."""
    graph = import_graph(typing_only_imports=True)
    upward = sorted((m, t) for m, t in graph.edges if m.startswith("d2compiler") and t.startswith("d2compiler")
                    and layer_of(t) < layer_of(m))
    assert not upward, upward


def test_a_pass_field_that_would_overwrite_a_core_key_of_the_record_is_refused(tmp_path, tiny_models, capsys):
    from d2compiler.contract import Pass, PassResult, TargetedParams
    from d2compiler.recipe.registry import PASSES

    class Overwrites(Pass):
        name = "test_overwrites"
        Params = TargetedParams

        def apply(self, ctx):
            return PassResult(modified=False)

        def record_fields(self, blocks):
            return {"overall_sparsity": 0.5}  # would replace the measured value

    with PASSES.temporarily(Overwrites):
        path = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), '[[passes]]\ntype = "test_overwrites"\n',
                            output=tmp_path / "out")
        assert main(["--quiet", "run", str(path)]) == 2
        assert capsys.readouterr().err.strip() == ("error: pass 'test_overwrites': record_fields returned the key "
                                                   "'overall_sparsity', which d2compiler already writes to sparsity.json; "
                                                   "name it after the pass")
        assert not (tmp_path / "out").exists()


def test_the_core_reads_in_one_sitting():
    """No module of d2compiler/ over 400 lines, no function of execution/ or driver/ over 60 (issue 29)."""
    long_files = [(str(p.relative_to(ROOT)), n) for p in (ROOT / "d2compiler").rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > 400]
    assert not long_files, long_files
    long_functions = []
    for folder in ("execution", "driver"):
        for path in (ROOT / "d2compiler" / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                    long_functions.append((str(path.relative_to(ROOT)), node.name, node.end_lineno - node.lineno + 1))
    assert not long_functions, long_functions
