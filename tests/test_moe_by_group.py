"""`experts.load = "group"` (issue 28): a streaming run that never holds a block's expert banks
whole gives the weights of the run that does, writes the same output, evaluates the same, and
refuses what it cannot do with one located line; the files it writes piece by piece are ordinary
safetensors files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from d2compiler.cli import main
from d2compiler.driver.sharded import split_by_expert
from d2compiler.errors import OutputError
from d2compiler.execution.streaming import StreamedModel, WeightSource, empty_model
from d2compiler.tensor_file import TensorFileWriter

from .test_moe import D2PRUNE, banks, moe_models, run  # noqa: F401  (moe_models: the module's fixture)

SPARSEGPT = '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n'
WANDA = '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "wanda"\nsparsity = 0.5\n'
STREAMING = "streaming = true\n"
BY_GROUP = STREAMING + '[experts]\nload = "group"\ngroup_size = 3\n'
EVALUATION = '[data.evaluation]\nsource = "builtin:python-docs"\nmax_windows = 2\n'


@pytest.mark.parametrize(("family", "passes"), [("qwen3_moe", D2PRUNE), ("deepseek_v3", WANDA), ("gpt_oss", SPARSEGPT)],
                         ids=["qwen3_moe-d2prune", "deepseek_v3-wanda", "gpt_oss-sparsegpt"])
def test_experts_read_by_group_give_the_whole_block_runs_weights(family, passes, moe_models, tmp_path):  # noqa: F811
    import transformers as tf

    code, whole = run(tmp_path, moe_models[family], passes + EVALUATION, name="whole", extra=STREAMING)
    assert code == 0
    code, grouped = run(tmp_path, moe_models[family], passes + EVALUATION, name="grouped", extra=BY_GROUP)
    assert code == 0
    assert grouped["weights_sha256"] == whole["weights_sha256"]
    ppl = [(r["results"]["dense_ppl"], r["results"]["pruned_ppl"]) for r in (whole, grouped)]
    assert ppl[0][1] is not None and ppl[1] == ppl[0]  # the evaluation reads the experts by group too
    assert {k: v["sparsity"] for k, v in grouped["layers"].items()} == {k: v["sparsity"] for k, v in whole["layers"].items()}
    assert not list(tmp_path.glob(".*d2c-work*"))  # the work folder is gone once the output is written
    a = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "whole")
    b = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "grouped")  # the model's own layout, written expert by expert
    for name, bank in banks(b).items():
        assert torch.equal(bank, banks(a)[name])
        zeros = (bank == 0).flatten(1).float().mean(1)
        assert torch.allclose(zeros, torch.full_like(zeros, 0.5), atol=0.02), name  # every expert pruned


def test_blocks_after_the_last_pruned_one_are_copied_expert_by_expert(moe_models, tmp_path):  # noqa: F811
    first_only = SPARSEGPT + 'targets = ["re:model\\\\.layers\\\\.0\\\\."]\n'
    extra = "allow_untargeted = true\n"
    code, whole = run(tmp_path, moe_models["qwen3_moe"], first_only, name="whole", extra=STREAMING + extra)
    assert code == 0
    code, grouped = run(tmp_path, moe_models["qwen3_moe"], first_only, name="grouped", extra=extra + BY_GROUP)
    assert code == 0
    assert grouped["weights_sha256"] == whole["weights_sha256"]
    assert {k.split(".")[2] for k in grouped["layers"]} == {"0"}  # block 1 was copied, not pruned


@pytest.mark.parametrize(("extra", "passes", "message"), [
    ('[experts]\nload = "group"\n', SPARSEGPT, "needs model.streaming = true"),
    (BY_GROUP, SPARSEGPT + "true_sequential = true\n", "re-observes the block"),
    (BY_GROUP, '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsity_allocation"\n' + SPARSEGPT.split("\n", 2)[2],
     "surveys the whole model first"),
    (BY_GROUP, D2PRUNE.replace('candidates = "one-off"\n', 'scoring = "block_output"\n'), "runs the block with stand-in weights"),
], ids=["no-streaming", "true-sequential", "survey", "block-output-scoring"])
def test_what_experts_by_group_cannot_do_is_refused_before_any_block(extra, passes, message, moe_models, tmp_path, capsys):  # noqa: F811
    code, _ = run(tmp_path, moe_models["qwen3_moe"], passes, extra=extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_expert_by_expert_output_equals_the_whole_tensor_conversion(moe_models, tmp_path):  # noqa: F811
    folder = moe_models["mixtral"]  # stored one tensor per expert: every bank is converted
    streamed = StreamedModel(empty_model(folder, torch.float32), WeightSource(folder), torch.float32)
    names = [n for n in streamed.converted if n.startswith(streamed.block_prefix(1))]
    assert names
    block = {n: streamed.read_source(n) for n in names}
    source = tmp_path / "block.safetensors"
    writer = TensorFileWriter(source)
    for name, tensor in block.items():
        writer.declare(name, tensor.dtype, tuple(tensor.shape))
        for e in reversed(range(tensor.shape[0])):  # any order
            writer.write_entry(name, e, tensor[e])
    writer.close()
    split_by_expert(source, tmp_path / "split.safetensors", streamed.checkpoint_pieces)
    got, want = load_file(tmp_path / "split.safetensors"), streamed.in_checkpoint_layout(block)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_tensor_file_refuses_a_tensor_left_unwritten_and_reads_back_by_entry(tmp_path):
    bank = torch.arange(24, dtype=torch.float32).view(4, 3, 2)
    writer = TensorFileWriter(tmp_path / "x.safetensors", header_bytes=None)
    writer.declare("bank", bank.dtype, tuple(bank.shape))
    writer.declare("rest", torch.int64, (3,))
    for e in (3, 1, 0, 2):
        writer.write_entry("bank", e, bank[e])
    with pytest.raises(OutputError, match="after the header was sized"):
        writer.declare("late", torch.float32, (1,))
    with pytest.raises(OutputError, match="rest was not written in full"):
        writer.close()
    writer = TensorFileWriter(tmp_path / "y.safetensors")
    writer.declare("bank", bank.dtype, tuple(bank.shape))
    for e in (2, 0, 3, 1):
        writer.write_entry("bank", e, bank[e])
    writer.declare("rest", torch.int64, (3,))  # declared after data was written: the header space is reserved
    writer.write("rest", torch.tensor([1, 2, 3]))
    writer.close()
    with safe_open(str(tmp_path / "y.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("bank"), bank) and f.get_tensor("rest").tolist() == [1, 2, 3]
        assert torch.equal(f.get_slice("bank")[2:3][0], bank[2])


def test_plan_shows_experts_read_by_group(moe_models, tmp_path, capsys):  # noqa: F811
    from .conftest import write_recipe

    recipe = write_recipe(tmp_path / "r.toml", str(moe_models["qwen3_moe"]), SPARSEGPT, samples=4, seq_len=32,
                          output=tmp_path / "out")
    recipe.write_text(recipe.read_text().replace('device = "cpu"\n', 'device = "cpu"\n' + BY_GROUP, 1))
    assert main(["plan", str(recipe)]) == 0
    assert "read by group" in capsys.readouterr().out


def test_a_killed_run_reading_experts_by_group_resumes_to_the_same_weights(tmp_path, tokenizer):
    """SIGKILLed after some blocks, the rerun resumes from the block files it wrote piece by piece."""
    import os
    import subprocess
    import sys

    import transformers as tf

    from d2compiler.execution.checkpoint import work_dir_for

    from .conftest import kill_after_blocks, write_recipe

    torch.manual_seed(0)
    config = tf.Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=8, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=32, intermediate_size=256, moe_intermediate_size=128,
                               num_experts=8, num_experts_per_tok=2)
    model = tmp_path / "moe"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(model)
    tokenizer.save_pretrained(model)
    recipe = write_recipe(tmp_path / "r.toml", str(model), SPARSEGPT, samples=8, seq_len=64)
    recipe.write_text(recipe.read_text().replace('device = "cpu"\n', 'device = "cpu"\n' + BY_GROUP, 1))
    reference = tmp_path / "reference"
    assert main(["--quiet", "run", str(recipe), "--output", str(reference), "--set", "experts.load=block"]) == 0
    output = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "d2compiler.cli", "run", str(recipe), "--output", str(output)]
    killed_at = kill_after_blocks(cmd, work_dir_for(output) / "state.json", 3)
    assert not output.exists() and 3 <= killed_at < 8
    rerun = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming at block {killed_at} of 8" in rerun.stderr
    read = [json.loads((folder / "sparsity.json").read_text()) for folder in (reference, output)]
    assert read[0]["weights_sha256"] == read[1]["weights_sha256"]


def test_a_weightless_model_makes_its_large_tensors_on_the_meta_device(moe_models, monkeypatch):  # noqa: F811
    """A bank is never allocated while the model is built (a DeepSeek-V3 layer's would be 30 GB), and
    the buffers computed at construction stay real."""
    import transformers as tf

    from d2compiler.execution import streaming

    monkeypatch.setattr(streaming, "LARGE", 1000)
    with streaming._LargeOnMeta():
        assert torch.empty(10, 200).is_meta and torch.zeros((10, 100)).is_meta and not torch.empty(3).is_meta
        assert not torch.empty(10, 200, device="cpu").is_meta  # a device named is kept
    folder = moe_models["deepseek_v3"]
    model = streaming.empty_model(folder, torch.float32)
    reference = tf.AutoModelForCausalLM.from_pretrained(folder)
    assert all(p.is_meta for p in model.parameters())
    buffers = dict(reference.named_buffers())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
