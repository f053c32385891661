"""`sparsity_allocation`: exact global counts, bounds, and on synthetic models with planted layers,
those layers pruned least; N:M refused; the allocation recorded in sparsity.json and the report."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from d2compiler.cli import main
from passes.allocation import error_block_sparsities, exact_counts, owl_block_sparsities

from .conftest import tiny_config, write_recipe

LAYERS = 4


def test_exact_counts_sum_and_bounds():
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.randint(1, 5000) for _ in range(rng.randint(1, 12))]
        target, lmbda = rng.uniform(0.1, 0.8), rng.uniform(0.0, 0.09)
        wanted = [target + rng.uniform(-lmbda, lmbda) for _ in sizes]
        counts = exact_counts(sizes, wanted, target, target - lmbda, target + lmbda)
        assert sum(counts) == round(target * sum(sizes))
        for count, n in zip(counts, sizes):
            assert (target - lmbda) * n - 1 <= count <= (target + lmbda) * n + 1


@pytest.mark.parametrize("spread", [owl_block_sparsities, error_block_sparsities])
def test_block_sparsities_stay_in_range_and_average_to_target(spread):
    scores = [0.01, 0.5, 0.02, 0.3, 0.07]
    out = spread(scores, 0.7, 0.08)
    assert all(0.62 - 1e-9 <= s <= 0.78 + 1e-9 for s in out)
    even = [0.1, 0.2, 0.3] if spread is owl_block_sparsities else [0.01, 0.1, 1.0]  # evenly spaced (the error profile: in log)
    assert spread(even, 0.7, 0.08) == pytest.approx([0.78, 0.7, 0.62])  # the full range, centred on the target
    assert out.index(min(out)) == scores.index(max(scores))  # highest score, lowest sparsity
    assert spread([0.3] * 4, 0.6, 0.1) == [0.6] * 4


def planted_model(tmp_path, tokenizer, kind: str, planted: tuple[int, ...]):
    """A tiny random Llama of LAYERS blocks. `outliers`: a tenth of the weights of every linear in the planted
    blocks are 40x the others (OWL's outliers). `dominant`: the planted blocks' output projections
    are scaled 30x, so their contribution dominates the hidden state and pruning them hurts most."""
    import transformers as tf

    torch.manual_seed(0)
    config = tiny_config("llama", len(tokenizer))
    config.num_hidden_layers = LAYERS
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for index in planted:
            block = model.model.layers[index]
            for name, module in block.named_modules():
                if not isinstance(module, torch.nn.Linear):
                    continue
                if kind == "outliers":
                    flat = module.weight.view(-1)
                    picks = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(index))[: flat.numel() // 10]
                    flat[picks] *= 40.0
                elif name.endswith(("o_proj", "down_proj")):
                    module.weight.mul_(30.0)
    folder = tmp_path / kind
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("profile", "kind"), [("owl", "outliers"), ("error", "dominant")])
def test_planted_layers_get_lower_sparsity(profile, kind, tmp_path, tokenizer):
    planted = (1, 2)
    folder = planted_model(tmp_path, tokenizer, kind, planted)
    out = tmp_path / "out"
    passes = (f'[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsity_allocation"\nprofile = "{profile}"\n'
              'owl_lmbda = 0.1\n[[passes]]\ntype = "wanda"\nsparsity = 0.6\n')
    assert main(["--quiet", "run", str(write_recipe(tmp_path / "r.toml", str(folder), passes, output=out))]) == 0
    record = json.loads((out / "sparsity.json").read_text())
    blocks = {int(i): b["sparsity"] for i, b in record["sparsity_allocation"]["blocks"].items()}
    assert max(blocks[i] for i in planted) < min(blocks[i] for i in range(LAYERS) if i not in planted)
    sizes = {name: metrics["shape"][0] * metrics["shape"][1] for name, metrics in record["layers"].items()}
    slack = 1 / min(sizes.values())  # the bounds hold to within one weight per layer
    assert all(0.5 - slack <= s <= 0.7 + slack for s in blocks.values())
    weights = load_file(out / "model.safetensors")
    pruned = sum(int((weights[f"{name}.weight"] == 0).sum()) for name in sizes)
    assert pruned == round(0.6 * sum(sizes.values()))  # the global count is exact
    for name, metrics in record["layers"].items():
        block = int(name.split(".")[2])
        assert metrics["allocated_sparsity"] == pytest.approx(blocks[block], abs=2 / min(sizes.values()) + 1e-9)
        assert metrics["sparsity"] == pytest.approx(metrics["allocated_sparsity"])
    assert any(f["title"].startswith("Allocated sparsity per block") for f in record["figures"])
    assert "Allocated sparsity per block" in (out / "report.html").read_text()


@pytest.mark.parametrize(("pruning", "message"), [
    ('type = "sparsegpt"\nmask_structure = "2:4"\n', "N:M pattern"),
    ('type = "wanda"\nsparsity = 0.95\n', "outside [0, 1)"),
    ('type = "sparsity_allocation"\nprofile = "owl"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n', "keep one allocation"),
])
def test_refused_schedules(pruning, message, tiny_models, tmp_path, capsys):
    passes = f'[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsity_allocation"\n[[passes]]\n{pruning}'
    assert main(["validate", str(write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), passes))]) == 2
    err = capsys.readouterr().err
    assert message in err and "r.toml" in err


def test_allocation_without_pruning_pass_is_refused(tiny_models, tmp_path, capsys):
    passes = '[[passes]]\ntype = "sparsity_allocation"\n'
    assert main(["validate", str(write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), passes))]) == 2
    assert "no later pass uses it" in capsys.readouterr().err


def test_allocation_is_scheduled_before_the_update_plan():
    """The update plan's candidates are pruned at the allocated sparsity, so the allocation runs first
    even when the recipe lists it after attention_kl_update."""
    from d2compiler.recipe.passmanager import PassManager
    from d2compiler.recipe.schema import validate_recipe

    recipe = validate_recipe({"version": 1, "model": {"source": "x"}, "passes": [
        {"type": "calibrate"}, {"type": "attention_kl_update"}, {"type": "sparsity_allocation"},
        {"type": "dual_taylor_mask", "sparsity": 0.6}]})
    names = [p.name for p in PassManager(list(recipe.passes)).schedule]
    assert names.index("sparsity_allocation") < names.index("attention_kl_update") < names.index("dual_taylor_mask")
