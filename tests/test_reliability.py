"""Reliability: kill-and-resume with a real SIGKILL, determinism, NaN handling, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from d2compiler.cli import main
from d2compiler.execution.checkpoint import work_dir_for

from .conftest import kill_after_blocks, tiny_bart, write_recipe

SPARSEGPT = '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n'


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama with enough blocks (and work per block) to kill a run in the middle."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=8,
                            num_attention_heads=4, num_key_value_heads=2)
    folder = tmp_path_factory.mktemp("deep") / "llama"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _record(output: Path) -> dict:
    return json.loads((output / "sparsity.json").read_text())


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_kill_and_resume_is_byte_identical(tmp_path, deep_llama, streaming):
    """A SIGKILLed run resumes to the uninterrupted in-memory run's exact weights (a streaming run too)."""
    recipe = write_recipe(tmp_path / "r.toml", str(deep_llama), SPARSEGPT, samples=8, seq_len=64)
    reference = tmp_path / "reference"
    assert main(["--quiet", "run", str(recipe), "--output", str(reference)]) == 0

    output = tmp_path / "resumed"
    state_file = work_dir_for(output) / "state.json"
    cmd = [sys.executable, "-m", "d2compiler.cli", "run", str(recipe), "--output", str(output),
           "--set", f"model.streaming={str(streaming).lower()}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed_at = kill_after_blocks(cmd, state_file, 3)
    assert not output.exists(), "a killed run left something at the output path"
    assert 3 <= killed_at < 8

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming at block {killed_at} of 8" in rerun.stderr
    resumed = _record(output)
    assert resumed["weights_sha256"] == _record(reference)["weights_sha256"]
    assert [b["resumed"] for b in resumed["blocks"]] == [i < killed_at for i in range(8)]
    assert not work_dir_for(output).exists(), "the work folder outlived a finished run"


def test_a_killed_run_over_two_stacks_resumes_in_the_second(tmp_path, tokenizer):
    """BART with `model.blocks` naming both stacks, killed after the decoder's first block: the rerun
    restores the encoder and the finished decoder blocks from their stores and ends with the
    uninterrupted run's exact weights."""
    folder = tiny_bart(tmp_path, tokenizer, decoder_layers=6)
    recipe = write_recipe(tmp_path / "r.toml", str(folder), SPARSEGPT, samples=8, seq_len=64)
    recipe.write_text(recipe.read_text().replace('device = "cpu"\n', 'device = "cpu"\nblocks = ["model.encoder.layers", '
                                                 '"model.decoder.layers"]\n', 1))
    reference = tmp_path / "reference"
    assert main(["--quiet", "run", str(recipe), "--output", str(reference)]) == 0

    output = tmp_path / "resumed"
    decoder_state = work_dir_for(output).with_name(work_dir_for(output).name + ".stack1") / "state.json"
    cmd = [sys.executable, "-m", "d2compiler.cli", "run", str(recipe), "--output", str(output)]
    killed_at = kill_after_blocks(cmd, decoder_state, 1)
    assert not output.exists() and 1 <= killed_at < 6
    rerun = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming at block {killed_at} of 6" in rerun.stderr
    resumed = _record(output)
    assert resumed["weights_sha256"] == _record(reference)["weights_sha256"]
    # both encoder blocks come from their store (a stack followed by another saves its last block too)
    assert [b["resumed"] for b in resumed["blocks"]] == [True, True] + [i < killed_at for i in range(6)]


def test_checkpoints_of_another_recipe_are_discarded(tmp_path, tiny_models, caplog):
    from d2compiler.execution.checkpoint import CheckpointStore

    output = tmp_path / "out"
    stale = CheckpointStore(work_dir_for(output), key="another recipe")
    stale.start()
    stale.save_block(0, torch.nn.Linear(2, 2), [torch.zeros(1)], [])
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), SPARSEGPT, output=output)
    assert main(["run", str(recipe)]) == 0
    assert "checkpoints of a different recipe" in caplog.text
    assert not any(b["resumed"] for b in _record(output)["blocks"])


def test_same_recipe_same_hash(tmp_path, tiny_models):
    passes = '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "attention_kl_update"\n[[passes]]\ntype = "dual_taylor_mask"\nsparsity = 0.6\n'
    hashes = []
    for run in ("a", "b"):
        recipe = write_recipe(tmp_path / f"{run}.toml", str(tiny_models["qwen3"]), passes, output=tmp_path / run,
                              extra='sampling = "random"\nseed = 7\n')
        assert main(["--quiet", "run", str(recipe)]) == 0
        hashes.append(_record(tmp_path / run)["weights_sha256"])
    assert hashes[0] == hashes[1]


def test_checkpoint_restores_packed_and_quantized_layers(tmp_path):
    """A block finished with pack_2_4 (and quantization buffers) is rebuilt packed on resume."""
    import copy

    from d2compiler.execution.checkpoint import CheckpointStore
    from d2compiler.graph.packing import Packed24Linear

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    fresh = copy.deepcopy(block)
    groups = block[0].weight.detach().clone().reshape(8, 4, 4)
    groups.scatter_(-1, groups.abs().argsort(-1)[..., :2], 0.0)
    block[0].register_buffer("weight_scale", torch.rand(8, 1))
    block.set_submodule("0", Packed24Linear.replacing(block[0], groups.reshape(8, 16), False))
    store = CheckpointStore(tmp_path / "work", key="job")
    store.start()
    store.save_block(0, block, [torch.zeros(1)], [])
    store.restore_block(0, fresh)
    assert isinstance(fresh[0], Packed24Linear)
    assert torch.equal(fresh[0].weight_scale, block[0].weight_scale)
    x = torch.randn(3, 16)
    assert torch.equal(fresh(x), block(x))
