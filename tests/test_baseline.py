"""`data.evaluation.baseline`: a recipe compared with a plain pruning pass in the same run (the
embedded default prints SparseGPT beside D²Prune)."""

from __future__ import annotations

import json

import pytest

from d2compiler.cli import main
from d2compiler.errors import RecipeError

from .conftest import write_recipe

D2PRUNE = ('[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "attention_kl_update"\nstrategy = "kl"\n'
           '[[passes]]\ntype = "dual_taylor_mask"\nmask_structure = "2:4"\n')
EVALUATION = '[data.evaluation]\nsource = "builtin:python-docs"\nseq_len = 32\nmax_windows = 4\n'


def test_the_baseline_is_the_plain_pass_on_the_same_data(tiny_models, tmp_path, capsys):
    """The baseline's perplexity equals that of a separate run of calibrate + sparsegpt at the
    recipe's pattern (2:4) on the same data; it is printed beside the recipe's and recorded."""
    model = str(tiny_models["llama"])
    compared = write_recipe(tmp_path / "d2.toml", model, D2PRUNE, samples=4, seq_len=32, output=tmp_path / "d2",
                            extra=EVALUATION + 'baseline = "sparsegpt"\n')
    assert main(["run", str(compared)]) == 0
    table = capsys.readouterr().out
    baseline = json.loads((tmp_path / "d2" / "sparsity.json").read_text())["results"]["baseline"]
    assert baseline["type"] == "sparsegpt" and baseline["mask_structure"] == "2:4" and baseline["metric"] == "perplexity"
    assert f"sparsegpt perplexity (same data)  {baseline['value']:.3f}" in table

    plain = write_recipe(tmp_path / "sg.toml", model, '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\n'
                         'mask_structure = "2:4"\n', samples=4, seq_len=32, output=tmp_path / "sg", extra=EVALUATION)
    assert main(["--quiet", "run", str(plain)]) == 0
    assert json.loads((tmp_path / "sg" / "sparsity.json").read_text())["results"]["pruned_ppl"] == baseline["value"]


@pytest.mark.parametrize(("baseline", "passes", "streaming", "message"), [
    ("calibrate", D2PRUNE, False, "'calibrate' is not a pruning pass; use"),
    ("sparsegpt", '[[passes]]\ntype = "calibrate"\n', False, "no pass of the recipe has a sparsity and a mask structure"),
    ("sparsegpt", D2PRUNE, True, "prunes a copy of the model in memory; not with model.streaming"),
])
def test_a_baseline_that_cannot_run_is_refused_at_validation(baseline, passes, streaming, message, tmp_path):
    from d2compiler.recipe.schema import load_recipe

    recipe = write_recipe(tmp_path / "r.toml", "tiny", passes, output=tmp_path / "out",
                          extra=EVALUATION + f'baseline = "{baseline}"\n')
    if streaming:
        recipe.write_text(recipe.read_text().replace('device = "cpu"\n', 'device = "cpu"\nstreaming = true\n', 1))
    with pytest.raises(RecipeError, match="data.evaluation.baseline") as info:
        load_recipe(recipe)
    assert message in str(info.value)
