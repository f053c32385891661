"""Every pruning pass and pattern on tiny random Llama and OPT models, end to end through `d2c run`:
exact sparsity, N:M structure, finite outputs, and a folder that `from_pretrained` loads."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from d2compiler.cli import main
from d2compiler.export.metadata import weights_sha256
from d2compiler.recipe.passmanager import PassManager
from d2compiler.recipe.schema import validate_recipe

from .conftest import write_recipe

PASSES = {
    "magnitude": '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "magnitude"\n',
    "wanda": '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "wanda"\n',
    "sparsegpt": '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nblock_size = 32\n',
}
PATTERNS = {"unstructured": 'sparsity = 0.6\n', "2:4": 'mask_structure = "2:4"\n', "4:8": 'mask_structure = "4:8"\n'}


def check_nm(weight: torch.Tensor, n: int, m: int) -> None:
    groups = (weight == 0).reshape(weight.shape[0], -1, m).sum(-1)
    assert torch.all(groups == n), f"not {n}:{m}"


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("method", list(PASSES))
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_pass_pattern(arch, method, pattern, tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models[arch]), PASSES[method] + PATTERNS[pattern], output=out)
    assert main(["--quiet", "run", str(recipe)]) == 0
    assert "sparsity (pruned layers)" in capsys.readouterr().out

    record = json.loads((out / "sparsity.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert record["weights_sha256"] == weights_sha256(model)
    modules = dict(model.named_modules())
    assert len(record["layers"]) == (14 if arch == "llama" else 12)
    for name, metrics in record["layers"].items():
        weight = modules[name].weight.data
        zeros = int((weight == 0).sum())
        if pattern == "unstructured":
            assert zeros == round(0.6 * weight.numel()), name  # exact count, not approximately
        else:
            n, m = map(int, pattern.split(":"))
            check_nm(weight, n, m)
        assert metrics["sparsity"] == pytest.approx(zeros / weight.numel())
        assert metrics["recon_error"] is not None and metrics["recon_error"] >= 0
    logits = model(torch.randint(0, 100, (1, 16))).logits
    assert torch.isfinite(logits).all()
    untouched = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and n not in record["layers"]]
    assert untouched == ["lm_head"]


def test_targets_and_ignore(tiny_models, tmp_path):
    out = tmp_path / "out"
    passes = ('[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n'
              'targets = ["re:.*layers\\\\.1\\\\."]\nignore = ["role:down"]\n')
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), passes, output=out)
    assert main(["--quiet", "run", str(recipe)]) == 0
    layers = json.loads((out / "sparsity.json").read_text())["layers"]
    assert sorted(layers) == sorted(f"model.layers.1.{n}" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"))


def test_targets_matching_nothing_lists_layers(tiny_models, tmp_path, capsys):
    passes = '[[passes]]\ntype = "magnitude"\nsparsity = 0.5\ntargets = ["re:.*attn\\\\.qq_proj"]\n'
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), passes, output=tmp_path / "o")
    assert main(["--quiet", "run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "match no linear" in err and "self_attn.q_proj (Linear, role q)" in err
    assert not (tmp_path / "o").exists()


def test_scheduler_moves_providers_first():
    recipe = validate_recipe({"version": 1, "passes": [{"type": "sparsegpt", "sparsity": 0.5}, {"type": "calibrate"}]})
    assert [p.name for p in PassManager(list(recipe.passes)).schedule] == ["calibrate", "sparsegpt"]


def test_existing_output_needs_overwrite(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["opt"]), PASSES["magnitude"] + PATTERNS["2:4"], output=out)
    assert main(["--quiet", "run", str(recipe)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["--quiet", "run", str(recipe), "--overwrite"]) == 2  # not ours: never replaced
    assert "not written by d2compiler" in capsys.readouterr().err and (out / "keep.txt").exists()
    (out / "keep.txt").unlink()  # an empty folder may be replaced
    assert main(["--quiet", "run", str(recipe), "--overwrite"]) == 0
    assert main(["--quiet", "run", str(recipe), "--overwrite"]) == 0  # and so may our own output
    assert (out / "sparsity.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_eval_cli_on_output(tiny_models, tmp_path, capsys):
    """`d2c eval` reads a d2c output folder and reports perplexity with the windows protocol."""
    text = tmp_path / "text.txt"
    text.write_text(" = Title = \n \n" + "Some words in a line of text.\n" * 400)
    assert main(["--quiet", "eval", str(tiny_models["opt"]), "--data", str(text), "--seq-len", "32", "--max-windows", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["windows"] == 3 and result["ppl"] > 1
    assert main(["--quiet", "eval", str(tiny_models["opt"]), "--data", str(tmp_path / "none.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


D2PRUNE = '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "attention_kl_update"\n[[passes]]\ntype = "dual_taylor_mask"\n'


@pytest.mark.parametrize("method", ["sparsegpt", "dual_taylor_mask"])
def test_true_sequential_reobserves_after_each_stage(tiny_models, tmp_path, monkeypatch, method):
    """true_sequential: q/k/v (first stage) are pruned as without it; o, gate/up and down from
    statistics of the partly pruned block, so they differ; sparsity stays exact. Each re-run ends once
    its stage has run: `down` runs in the re-run before it only, so once more per sample and block
    than without true_sequential (not three times more)."""
    from safetensors.torch import load_file

    config = json.loads((tiny_models["llama"] / "config.json").read_text())
    down_calls = []
    linear_forward = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: (
        down_calls.append(self.in_features == config["intermediate_size"]), linear_forward(self, x))[1])
    weights, downs, samples = {}, {}, 4
    for flag in ("false", "true"):
        out = tmp_path / flag
        passes = (PASSES["sparsegpt"] if method == "sparsegpt" else D2PRUNE) + f"sparsity = 0.6\ntrue_sequential = {flag}\n"
        down_calls.clear()
        recipe = write_recipe(tmp_path / f"{flag}.toml", str(tiny_models["llama"]), passes, samples=samples, output=out)
        assert main(["--quiet", "run", str(recipe)]) == 0
        weights[flag], downs[flag] = load_file(out / "model.safetensors"), sum(down_calls)
        record = json.loads((out / "sparsity.json").read_text())
    assert downs["true"] - downs["false"] == samples * config["num_hidden_layers"]
    stages = record["blocks"][0]["passes"][method]["stages"]
    assert stages == [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]
    for name, tensor in weights["true"].items():
        if name.startswith("model.layers.0.") and name.endswith("proj.weight"):
            same = torch.equal(tensor, weights["false"][name])
            assert same == any(f".{r}_proj." in name for r in ("q", "k", "v")), name
            assert int((tensor == 0).sum()) == round(0.6 * tensor.numel())


def test_sequential_stages_re_observe_only_before_the_named_stages(tiny_models, tmp_path, capsys, monkeypatch):
    """sequential_stages = [[q, k, v, o, gate, up], [down]]: one re-observation, so only down differs
    from the run without true_sequential. The block's first observation skips down's statistics (they
    are re-observed before use): down's inputs are accumulated once per sample, not twice, and the
    weights equal those of a run that records them anyway. A role left out, or stages without
    true_sequential, are refused, located, with exit status 2."""
    from safetensors.torch import load_file

    from passes.gram import Gram
    from passes.pruning import PruningPass

    model = str(tiny_models["llama"])
    config = json.loads((tiny_models["llama"] / "config.json").read_text())
    down_widths = []
    add = Gram.add
    monkeypatch.setattr(Gram, "add", lambda self, x: (down_widths.append(self.width == config["intermediate_size"]), add(self, x))[1])
    stages_toml = 'true_sequential = true\nsequential_stages = [["q", "k", "v", "o", "gate", "up"], ["down"]]\n'
    weights, down_adds = {}, {}
    for flag, extra in (("plain", ""), ("down", stages_toml), ("all-observed", stages_toml)):
        if flag == "all-observed":
            monkeypatch.setattr(PruningPass, "statistics_read", lambda self, ctx: {layer.name for layer in ctx.select(self.params)})
        down_widths.clear()
        out = tmp_path / flag
        recipe = write_recipe(tmp_path / f"{flag}.toml", model, PASSES["sparsegpt"] + "sparsity = 0.6\n" + extra, output=out)
        assert main(["--quiet", "run", str(recipe)]) == 0
        weights[flag], down_adds[flag] = load_file(out / "model.safetensors"), sum(down_widths)
    assert down_adds["down"] == down_adds["plain"] and down_adds["all-observed"] == 2 * down_adds["plain"] > 0
    stages = json.loads((tmp_path / "down" / "sparsity.json").read_text())["blocks"][0]["passes"]["sparsegpt"]["stages"]
    assert stages == [["q", "k", "v", "o", "gate", "up"], ["down"]]
    for name, tensor in weights["down"].items():
        assert torch.equal(tensor, weights["all-observed"][name]), name
        if name.startswith("model.layers.0.") and name.endswith("proj.weight"):
            assert torch.equal(tensor, weights["plain"][name]) == ("down_proj" not in name), name
    capsys.readouterr()
    for extra, message in (('true_sequential = true\nsequential_stages = [["q", "k", "v", "o"], ["down"]]\n', "leaves out"),
                           ('sequential_stages = [["q"], ["down"]]\n', "needs true_sequential")):
        recipe = write_recipe(tmp_path / "bad.toml", model, PASSES["sparsegpt"] + "sparsity = 0.6\n" + extra, output=tmp_path / "bad")
        assert main(["--quiet", "run", str(recipe)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and ("bad.toml" in err or "block 0" in err), err
        assert not (tmp_path / "bad").exists()
