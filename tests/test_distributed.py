"""Distributed pruning (torch.distributed, gloo on the CPU): `d2c run --nproc 2` starts two processes
through torchrun; they give the one-process run's masks and, within float summation tolerance, its
weights and perplexity; a failure on one process ends the run with that process's message; a killed
two-process run resumes with two processes and refuses another count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from d2compiler.cli import main
from d2compiler.execution.checkpoint import work_dir_for

from .conftest import kill_after_blocks, write_recipe

EVAL = '[data.evaluation]\nsource = "builtin:python-docs"\nseq_len = 32\nmax_windows = 5\n'
METHODS = {
    "wanda": '[[passes]]\ntype = "calibrate"\nhessian = false\n[[passes]]\ntype = "wanda"\nsparsity = 0.5\n',
    "d2prune-kl": '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "attention_kl_update"\nkl_samples = 3\n'
                  '[[passes]]\ntype = "dual_taylor_mask"\nsparsity = 0.6\n',
    # sparsegpt, with the survey, block-output scoring and true-sequential re-observation split over the processes' samples
    "sparsegpt-allocation": '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsity_allocation"\nprofile = "error"\nsurvey_samples = 3\n'
                  '[[passes]]\ntype = "attention_kl_update"\nscoring = "block_output"\nkl_samples = 3\n'
                  '[[passes]]\ntype = "sparsegpt"\nsparsity = 0.6\ntrue_sequential = true\n',
}


def _d2c(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "d2compiler", *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_match_one(method, tmp_path, tiny_models):
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), METHODS[method], samples=5, seq_len=32)
    recipe.write_text(recipe.read_text() + EVAL)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["--quiet", "run", str(recipe), "--output", str(one)]) == 0
    done = _d2c("--quiet", "run", str(recipe), "--output", str(two), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("proj.weight") and ".layers." in name:
            assert torch.equal(a[name] == 0, b[name] == 0), f"{name}: the masks differ"
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    ra, rb = (json.loads((f / "sparsity.json").read_text())["results"] for f in (one, two))
    assert rb["processes"] == 2 and rb["bytes_all_reduced"] > 0
    assert rb["pruned_ppl"] == pytest.approx(ra["pruned_ppl"], rel=0.005)
    assert rb["dense_ppl"] == pytest.approx(ra["dense_ppl"], rel=1e-6)


def test_killed_two_process_run_resumes_with_two(tmp_path, tiny_models):
    """Killed after 2 finished blocks: 3 processes are refused (one process fails; the run ends with its
    message, fast), 2 processes resume to the uninterrupted two-process run's weights."""
    from d2compiler.evaluation.synthetic import save_random_model, tiny_llama_config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = save_random_model(tiny_llama_config(len(tokenizer), layers=6, hidden=128, intermediate=384), tmp_path / "m", tokenizer)
    recipe = write_recipe(tmp_path / "r.toml", str(model), METHODS["sparsegpt-allocation"], samples=6, seq_len=64)  # a resume recomputes the survey
    reference, output = tmp_path / "reference", tmp_path / "resumed"
    done = _d2c("--quiet", "run", str(recipe), "--output", str(reference), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]

    state = work_dir_for(output) / "state.json"
    cmd = [sys.executable, "-m", "d2compiler", "--quiet", "run", str(recipe), "--output", str(output), "--nproc", "2"]
    killed_at = kill_after_blocks(cmd, state, 2, group=True)  # the launcher, torchrun and both processes
    assert 2 <= killed_at < 6 and json.loads(state.read_text())["processes"] == 2

    start = time.monotonic()
    refused = _d2c("--quiet", "run", str(recipe), "--output", str(output), "--nproc", "3", "--oversubscribe")
    assert refused.returncode == 2 and time.monotonic() - start < 60
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: process 0 of 3: ") and "from a run with 2 processes" in last and "--nproc 2" in last

    resumed = _d2c("run", str(recipe), "--output", str(output), "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at block {killed_at} of 6" in resumed.stderr
    records = [json.loads((f / "sparsity.json").read_text()) for f in (reference, output)]
    assert records[0]["weights_sha256"] == records[1]["weights_sha256"]


def test_one_process_refuses_two_process_checkpoints(tmp_path):
    from d2compiler.errors import OutputError
    from d2compiler.execution.checkpoint import CheckpointStore

    folder = tmp_path / "work"
    CheckpointStore(folder, "job", processes=2).start()
    with pytest.raises(OutputError, match="from a run with 2 processes and this run has 1"):
        CheckpointStore(folder, "job").start()


def test_group_shares_and_owners():
    from d2compiler.execution.distributed import Group

    shares = [Group(rank=r, size=3).share(8) for r in range(3)]
    assert [list(s) for s in shares] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    owners = Group(rank=0, size=2).owners([1.0, 5.0, 2.0, 2.0])
    assert owners == [1, 0, 1, 1]  # largest first to the least loaded: 5 -> 0, 2 -> 1, 2 -> 1, 1 -> 1 (4 < 5)
