"""Coverage that cannot lie (issue 27, item 1): the share of the parameters a recipe's passes target
is stated by `d2c inspect`, `d2c plan`, the summary and `sparsity.json`, with the sparsity over
every block weight beside the sparsity of the pruned layers; a recipe that leaves 10% or more of the
block parameters in no layer a pass can act on is refused unless it says so (`ignore`, or
`model.allow_untargeted`). The untargetable weights here: the expert banks of a tiny Qwen3-MoE with
the expert probe switched off (`unseen_experts`), as for an MoE whose forward never indexes its banks
per expert (a grouped-matmul-only implementation)."""

from __future__ import annotations

import json

import pytest
import torch

from d2compiler.cli import main

from .conftest import tiny_bart, write_recipe

SPARSEGPT = '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n'


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory, tokenizer):
    """A tiny Qwen3-MoE (transformers 5: routed experts as 3-D parameters [E, 2I, H] and [E, H, I])."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
                               num_experts=4, num_experts_per_tok=2)
    folder = tmp_path_factory.mktemp("moe") / "qwen3-moe"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def unseen_experts(monkeypatch):
    """The executor finds no expert banks (see the module docstring)."""
    from d2compiler.graph import block_trace

    monkeypatch.setattr(block_trace, "probe_banks", lambda _block, _run: [])


def recipe(tmp_path, model, passes=SPARSEGPT, extra="", output=True):
    path = write_recipe(tmp_path / "r.toml", str(model), passes, samples=4, seq_len=32,
                        output=tmp_path / "out" if output else None)
    path.write_text(path.read_text().replace('device = "cpu"\n', f'device = "cpu"\n{extra}', 1))
    return path


def test_a_recipe_that_leaves_the_experts_dense_is_refused(qwen3_moe, unseen_experts, tmp_path, capsys):
    assert main(["--quiet", "run", str(recipe(tmp_path, qwen3_moe))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model: the passes cannot act on")
    assert "model.layers.*.mlp.experts.gate_up_proj (3-D, in no linear layer" in err[0]
    assert "model.allow_untargeted = true" in err[0] and not (tmp_path / "out").exists()


def test_allow_untargeted_runs_and_reports_both_sparsities(qwen3_moe, unseen_experts, tmp_path, capsys, caplog):
    assert main(["run", str(recipe(tmp_path, qwen3_moe, extra="allow_untargeted = true\n"))]) == 0
    table = capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    results = record["results"]
    assert "cannot act on" in caplog.text
    assert results["block_weight_sparsity"] < 0.25  # the experts (two thirds of the blocks) stayed dense
    families = {f["family"] for f in results["coverage"]["untargeted_families"]}
    assert {"model.layers.*.mlp.experts.gate_up_proj", "model.layers.*.mlp.experts.down_proj"} <= families
    assert results["coverage"]["targeted_share"] < 0.25
    assert "sparsity (all block weights)" in table and f"{results['block_weight_sparsity']:.4f}" in table
    assert "parameters targeted" in table


def test_an_ignore_naming_the_experts_is_explicit_enough(qwen3_moe, unseen_experts, tmp_path, caplog):
    passes = SPARSEGPT + 'ignore = ["re:.*experts"]\n'
    assert main(["--quiet", "run", str(recipe(tmp_path, qwen3_moe, passes))]) == 0
    assert "cannot act on" not in caplog.text


def test_plan_and_inspect_state_the_coverage(qwen3_moe, unseen_experts, tmp_path, capsys):
    assert main(["plan", str(recipe(tmp_path, qwen3_moe, output=False))]) == 0
    out = capsys.readouterr().out
    assert "passes target" in out and "untargeted: model.layers.*.mlp.experts.gate_up_proj" in out
    assert "the run will refuse: the passes cannot act on" in out
    assert main(["inspect", str(qwen3_moe)]) == 0
    out = capsys.readouterr().out
    assert "coverage (every linear layer targeted" in out and "experts.down_proj (3-D, in no linear layer" in out


def test_a_dense_model_is_covered_and_its_sparsities_agree(tiny_models, tmp_path, capsys):
    assert main(["--quiet", "run", str(recipe(tmp_path, tiny_models["llama"]))]) == 0
    results = json.loads((tmp_path / "out" / "sparsity.json").read_text())["results"]
    coverage = results["coverage"]
    assert coverage["unexplained_block_share"] == 0 and coverage["targeted"] > 0
    assert not [f for f in coverage["untargeted_families"] if ".layers." in f["family"]]  # only embeddings / head
    assert abs(results["block_weight_sparsity"] - 0.5) < 0.01  # every block weight is a pruned linear


def test_a_second_stack_of_blocks_left_dense_is_refused(tmp_path, tokenizer, capsys):
    """BART: one stack (the decoder's) is pruned; the encoder's would stay dense, so the run is refused
    with a line naming it, unless model.allow_untargeted."""

    folder = tiny_bart(tmp_path, tokenizer)
    assert main(["--quiet", "run", str(recipe(tmp_path, folder))]) == 2
    err = capsys.readouterr().err
    assert "the passes act on one stack of blocks, model.decoder.layers; the stack model.encoder.layers (2 blocks" in err
    assert main(["--quiet", "run", str(recipe(tmp_path, folder, extra="allow_untargeted = true\n"))]) == 0


def test_model_blocks_prunes_each_named_stack_in_order(tmp_path, tokenizer, capsys):
    """BART with model.blocks naming both stacks: the encoder, then the decoder (calibrated on the pruned
    encoder's outputs), each at exactly 50% per linear; the record covers both; a wrong path is one line."""
    import json

    import transformers as tf
    from safetensors.torch import load_file

    folder = tiny_bart(tmp_path, tokenizer)
    stacks = 'blocks = ["model.encoder.layers", "model.decoder.layers"]\n'
    assert main(["--quiet", "run", str(recipe(tmp_path, folder, extra=stacks))]) == 0
    record = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    weights = load_file(tmp_path / "out" / "model.safetensors")
    for stack in ("model.encoder.layers", "model.decoder.layers"):
        names = [n for n in record["layers"] if n.startswith(stack + ".")]
        assert len(names) == 2 * (6 if "encoder" in stack else 10), stack  # q/k/v/o + fc1/fc2 (+ cross-attention q/k/v/o)
        for name in names:
            w = weights[f"{name}.weight"]
            assert int((w == 0).sum()) == w.numel() // 2, name
    assert record["results"]["coverage"]["targeted_share"] > 0.3 and abs(record["results"]["block_weight_sparsity"] - 0.5) < 0.01
    assert tf.BartForConditionalGeneration.from_pretrained(tmp_path / "out") is not None
    capsys.readouterr()
    assert main(["plan", str(recipe(tmp_path, folder, extra=stacks, output=False))]) == 0
    plan = capsys.readouterr().out
    assert "(model.encoder.layers, model.decoder.layers x 4)" in plan  # both stacks, 2 blocks each
    assert "model.encoder.layers blocks 0-1:" in plan and "model.decoder.layers blocks 0-1:" in plan
    assert "encoder_attn.q_proj (q)" in plan.split("model.decoder.layers blocks 0-1:")[1]

    wrong = 'blocks = ["model.encoder.layer"]\n'
    assert main(["--quiet", "run", str(recipe(tmp_path, folder, extra=wrong, output=False))]) == 2
    assert ("model.blocks: 'model.encoder.layer' is not a stack of blocks of BartForConditionalGeneration"
            in capsys.readouterr().err)
