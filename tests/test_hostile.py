"""Hostile input, as issue 12 lists it: resume never gives wrong weights, an output never destroys
what d2compiler does not own, and every bad input or environment gives one located line and exit
status 2 (never a traceback)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from d2compiler.cli import main
from d2compiler.execution.checkpoint import block_file, hidden_file, work_dir_for
from d2compiler.execution.executor import BlockExecutor
from d2compiler.export.output_dir import output_lock

from .conftest import write_recipe

SPARSEGPT = '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n'
BLOCKS = 4


@pytest.fixture(scope="module")
def llama4(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama with four blocks."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=BLOCKS,
                            num_attention_heads=4, num_key_value_heads=2)
    folder = tmp_path_factory.mktemp("hostile") / "llama"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def recipe_for(tmp: Path, model: Path, output: Path, *, batch_size: int = 1, name: str = "r.toml") -> Path:
    return write_recipe(tmp / name, str(model), SPARSEGPT, samples=8, seq_len=32, output=output,
                        extra=f"batch_size = {batch_size}")


def sha(output: Path) -> str:
    return json.loads((output / "sparsity.json").read_text())["weights_sha256"]


def run(args: list[str], capsys) -> tuple[int, str]:
    code = main(["--quiet", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def interrupted(recipe: Path, output: Path, monkeypatch, capsys, stop_at: int = 3) -> None:
    """Run until block `stop_at` starts, then die as a kill would (checkpoints of earlier blocks stay)."""
    original = BlockExecutor._run_block

    def dying(self, index, *args, **kwargs):
        if index == stop_at:
            raise KeyboardInterrupt
        return original(self, index, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(BlockExecutor, "_run_block", dying)
        assert run(["run", str(recipe)], capsys)[0] == 130
    state = json.loads((work_dir_for(output) / "state.json").read_text())
    assert state["blocks_done"] == stop_at


@pytest.fixture(scope="module")
def reference(tmp_path_factory, llama4) -> dict[int, str]:
    """weights_sha256 of uninterrupted runs, by calibration batch size."""
    tmp = tmp_path_factory.mktemp("reference")
    out = {}
    for batch in (1, 4):
        output = tmp / f"out-{batch}"
        assert main(["--quiet", "run", str(recipe_for(tmp, llama4, output, batch_size=batch)), "--output", str(output)]) == 0
        out[batch] = sha(output)
    assert out[1] != out[4]
    return out


# --- resume can never give wrong weights -------------------------------------------------------------


def test_changed_batch_size_discards_checkpoints(tmp_path, llama4, reference, monkeypatch, capsys, caplog):
    output = tmp_path / "out"
    interrupted(recipe_for(tmp_path, llama4, output, batch_size=1), output, monkeypatch, capsys)
    assert run(["run", str(recipe_for(tmp_path, llama4, output, batch_size=4))], capsys)[0] == 0
    assert "checkpoints of a different recipe" in caplog.text
    assert sha(output) == reference[4]


def test_edited_weight_of_a_later_block_discards_checkpoints(tmp_path, llama4, monkeypatch, capsys):
    model = tmp_path / "model"
    shutil.copytree(llama4, model)
    output = tmp_path / "out"
    recipe = recipe_for(tmp_path, model, output)
    interrupted(recipe, output, monkeypatch, capsys)
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] += 1.0
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert run(["run", str(recipe)], capsys)[0] == 0
    fresh = tmp_path / "fresh"
    assert run(["run", str(recipe), "--output", str(fresh)], capsys)[0] == 0
    assert sha(output) == sha(fresh)


def _overwrite_values(path: Path) -> None:
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, path)


def _truncate_list(path: Path) -> None:
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if int(k[1:]) < len(tensors) // 2}, path)


def _truncate_file(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "block file values overwritten": (block_file(1), _overwrite_values),
    "block file truncated": (block_file(1), _truncate_file),
    "block file missing": (block_file(0), Path.unlink),
    "hidden states overwritten": (hidden_file(2), _overwrite_values),
    "hidden list truncated (4 of 8)": (hidden_file(2), _truncate_list),
    "hidden file missing": (hidden_file(2), Path.unlink),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_is_detected_and_the_run_stays_correct(case, tmp_path, llama4, reference, monkeypatch,
                                                                   capsys, caplog):
    output = tmp_path / "out"
    recipe = recipe_for(tmp_path, llama4, output)
    interrupted(recipe, output, monkeypatch, capsys)
    name, damage = DAMAGE[case]
    damage(work_dir_for(output) / name)
    assert run(["run", str(recipe)], capsys)[0] == 0
    assert "missing" in caplog.text or "sha256 mismatch" in caplog.text
    assert sha(output) == reference[1]


# --- outputs never destroy what d2compiler does not own ----------------------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["equal", "inside", "containing"])
def test_output_never_touches_the_model_source(where, tmp_path, llama4, capsys):
    root = tmp_path / "models"
    model = root / "llama"
    shutil.copytree(llama4, model)
    before = _tree(root)
    output = {"equal": model, "inside": model / "pruned", "containing": root}[where]
    recipe = recipe_for(tmp_path, model, output)
    code, err = run(["run", str(recipe), "--model", str(model), "--output", str(output), "--overwrite"], capsys)
    assert code == 2 and "which this run reads" in err
    assert _tree(root) == before


def test_output_never_touches_the_data_files(tmp_path, llama4, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "cal.txt").write_text("hello world\n" * 2000)
    recipe = write_recipe(tmp_path / "r.toml", str(llama4), SPARSEGPT, samples=2, seq_len=16, output=data)
    recipe.write_text(recipe.read_text().replace('source = "builtin:python-docs"', f'source = "{data / "cal.txt"}"'))
    code, err = run(["run", str(recipe), "--overwrite"], capsys)
    assert code == 2 and "which this run reads" in err and (data / "cal.txt").exists()


def test_recipe_cannot_turn_on_overwrite(tmp_path, llama4, capsys):
    recipe = recipe_for(tmp_path, llama4, tmp_path / "out")
    recipe.write_text(recipe.read_text() + "overwrite = true\n")
    code, err = run(["validate", str(recipe)], capsys)
    assert code == 2 and "output.overwrite: not a recipe setting" in err


def test_working_directory_is_never_an_output(tmp_path, llama4, monkeypatch, capsys):
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    recipe = recipe_for(tmp_path, llama4, tmp_path / "unused")
    code, err = run(["run", str(recipe), "--output", ".", "--overwrite"], capsys)
    assert code == 2 and "working directory" in err
    assert list(cwd.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["r.toml", "work"]


def test_tilde_and_unicode_output_paths(tmp_path, llama4, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    recipe = recipe_for(tmp_path, llama4, tmp_path / "unused")
    assert run(["run", str(recipe), "--output", "~/pruned 🦙 ü"], capsys)[0] == 0
    assert (tmp_path / "home" / "pruned 🦙 ü" / "sparsity.json").is_file()
    assert not (tmp_path / "~").exists()
    emoji_model = tmp_path / "mödel 🦙"
    shutil.copytree(llama4, emoji_model)
    assert run(["run", str(recipe), "--model", str(emoji_model), "--output", "relative 🦙"], capsys)[0] == 0
    assert (tmp_path / "relative 🦙" / "sparsity.json").is_file()


@pytest.mark.parametrize("name_bytes", [300, 250])
def test_an_output_name_too_long_is_one_line(name_bytes, tmp_path, llama4, capsys):
    """300 bytes: longer than the file system allows; 250: allowed, but not with the `.NAME.tmp-*`
    sibling a run writes. Refused before any compute, nothing written."""
    from d2compiler.export.output_dir import SIBLING_EXTRA, check_output_path, name_max

    recipe = recipe_for(tmp_path, llama4, tmp_path / "unused")
    before = sorted(tmp_path.iterdir())
    code, err = run(["run", str(recipe), "--output", str(tmp_path / ("ü" * (name_bytes // 2)))], capsys)
    assert code == 2 and f"the output name is {name_bytes} bytes; at most {name_max(tmp_path) - SIBLING_EXTRA}" in err
    assert len(err.strip().splitlines()) == 1 and sorted(tmp_path.iterdir()) == before
    check_output_path(tmp_path / ("a" * (name_max(tmp_path) - SIBLING_EXTRA)), False)  # the longest that fits


def test_leftovers_of_a_killed_final_write_are_cleaned(tmp_path, llama4, capsys):
    output = tmp_path / "out"
    (tmp_path / ".out.tmp-dead").mkdir()
    (tmp_path / ".out.tmp-dead" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".out.old-dead").mkdir()
    assert run(["run", str(recipe_for(tmp_path, llama4, output))], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.toml"]


def test_concurrent_run_on_the_same_output_is_refused(tmp_path, llama4, capsys):
    output = tmp_path / "out"
    recipe = recipe_for(tmp_path, llama4, output)
    assert run(["run", str(recipe)], capsys)[0] == 0
    before = _tree(output)
    with output_lock(output):  # another process's run in progress
        code, err = run(["run", str(recipe), "--overwrite"], capsys)
    assert code == 2 and "another d2c process is writing this output" in err
    assert _tree(output) == before


def test_concurrent_processes(tmp_path, llama4):
    """Two real processes started together on one output: one writes it, the other refuses."""
    output = tmp_path / "out"
    recipe = recipe_for(tmp_path, llama4, output)
    cmd = [sys.executable, "-m", "d2compiler.cli", "--quiet", "run", str(recipe)]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=600), p.stderr.read()) for p in procs)
    assert results[0][0] == 0
    assert results[1][0] == 2 and ("another d2c process" in results[1][1] or "already exists" in results[1][1])
    assert "Traceback" not in results[1][1]
    assert main(["--quiet", "eval", str(output), "--max-windows", "1", "--seq-len", "16"]) == 0


def test_too_little_free_space_is_refused_before_compute(tmp_path, llama4, monkeypatch, capsys):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**9, 10**9 - 1000, 1000))
    output = tmp_path / "out"
    code, err = run(["run", str(recipe_for(tmp_path, llama4, output))], capsys)
    assert code == 2 and "MiB free on that file system" in err and "need about" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]


def test_disk_full_while_writing(tmp_path, llama4, monkeypatch, capsys):
    import transformers

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    output = tmp_path / "out"
    code, err = run(["run", str(recipe_for(tmp_path, llama4, output))], capsys)
    assert code == 2 and f"{output}: writing the output failed: No space left on device" in err
    assert not output.exists() and not list(tmp_path.glob(".out.tmp-*"))


# --- bad models: one located line ----------------------------------------------------------------------


def _broken_copy(llama4: Path, tmp_path: Path, damage) -> Path:
    model = tmp_path / "model"
    shutil.copytree(llama4, model)
    damage(model)
    return model


def _write_weights(model: Path, change) -> None:
    tensors = load_file(model / "model.safetensors")
    change(tensors)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def _set_config(model: Path, **values) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **values}))


MODELS = {
    "corrupt safetensors": (lambda m: (m / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"),
                            "model.safetensors: not a valid safetensors file"),
    "truncated safetensors": (lambda m: _truncate_file(m / "model.safetensors"), "model.safetensors: not a valid safetensors file"),
    "empty safetensors": (lambda m: (m / "model.safetensors").write_bytes(b""), "model.safetensors: not a valid safetensors file"),
    "random bytes": (lambda m: (m / "model.safetensors").write_bytes(os.urandom(4096)), "model.safetensors: not a valid safetensors file"),
    "tensor of the wrong shape": (lambda m: _write_weights(m, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)})),
                                  "tensor model.layers.0.mlp.up_proj.weight has the wrong shape"),
    "config says more layers than the weights": (lambda m: _set_config(m, num_hidden_layers=6),
                                                 "weights missing from the checkpoint"),
    "weights the model does not have": (lambda m: _write_weights(m, lambda t: t.update({"model.extra.weight": torch.zeros(2)})),
                                        "in the checkpoint but not in the model"),
    "architectures names a non-model class": (lambda m: _set_config(m, architectures=["AutoTokenizer"]),
                                              "names no transformers model class"),
    "architectures names a function": (lambda m: _set_config(m, architectures=["pipeline"]), "names no transformers model class"),
    "config failing its class's own checks": (lambda m: _set_config(m, hidden_size=-5),
                                              "unsupported model: The hidden size (-5) is not a multiple"),
    "config of a negative size": (lambda m: _set_config(m, intermediate_size=-4), "cannot build the model: "),
    "config value of the wrong type": (lambda m: _set_config(m, hidden_size="big"), "unsupported model: Field 'hidden_size'"),
    "unknown model type": (lambda m: _set_config(m, model_type="no-such-model"), "unsupported model: The checkpoint"),
    "pickle-only checkpoint (.bin)": (lambda m: ((m / "model.safetensors").unlink(), (m / "pytorch_model.bin").write_bytes(b"x")),
                                      "only pickle checkpoints (pytorch_model.bin); d2compiler never unpickles"),
}


@pytest.mark.parametrize("case", list(MODELS))
def test_bad_model(case, tmp_path, llama4, capsys):
    damage, expected = MODELS[case]
    model = _broken_copy(llama4, tmp_path, damage)
    output = tmp_path / "out"
    code, err = run(["run", str(recipe_for(tmp_path, llama4, output)), "--model", str(model)], capsys)
    assert code == 2 and expected in err, err
    assert err.count("\n") == 1 and not output.exists() and not work_dir_for(output).exists()


@pytest.mark.parametrize("streaming", [False, True])
def test_truncated_gguf(streaming, tmp_path, llama4, capsys):
    """A GGUF file whose header ends early (a cut download) is one line, in memory and when the
    streaming run converts it."""
    gguf = tmp_path / "cut.gguf"
    gguf.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 5))  # version 3, no tensors, 5 metadata keys that are not there
    output = tmp_path / "out"
    code, err = run(["run", str(recipe_for(tmp_path, llama4, output)), "--model", str(gguf),
                     "--set", f"model.streaming={str(streaming).lower()}"], capsys)
    assert code == 2 and f"{gguf}: " in err and "GGUF file" in err, err
    assert err.count("\n") == 1 and not output.exists()


# --- bad recipes and flags ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["json", "toml"])
def test_deeply_nested_recipe(kind, tmp_path, capsys):
    depth = 900
    if kind == "json":
        text = '{"version": 1, "model": {"roles": ' + "[" * depth + "]" * depth + "}}"
    else:
        text = "version = 1\n[model]\nroles = " + "[" * depth + "]" * depth + "\n"
    path = tmp_path / f"r.{kind}"
    path.write_text(text)
    code, err = run(["validate", str(path)], capsys)
    assert code == 2 and "nested" in err


def test_huge_string_is_not_echoed(tmp_path, capsys):
    path = tmp_path / "r.toml"
    path.write_text(f'version = 1\n[model]\ndtype = "{"x" * 50_000_000}"\n[[passes]]\ntype = "magnitude"\nsparsity = 0.5\n')
    code, err = run(["validate", str(path)], capsys)
    assert code == 2 and "model.dtype" in err and "(50000002 characters)" in err and len(err) < 1000


@pytest.mark.parametrize("args", [
    ["eval", "M", "--max-windows", "0"], ["eval", "M", "--seq-len", "0"], ["eval", "M", "--task", "piqa", "--limit", "0"],
    ["eval", "M", "--task", "piqa", "--limit", "-1"], ["inspect", "M", "--tokens", "0"], ["eval", "M", "--seq-len", "x"],
])
def test_bad_flag_values_are_refused_by_argparse(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "must be at least" in err or "expected an integer" in err


def _piqa(tmp_path: Path, rows: list, labels: str) -> Path:
    path = tmp_path / "valid.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "valid-labels.lst").write_text(labels)
    return path


GOOD = {"goal": "g", "sol1": "a", "sol2": "b"}
TASKS = {
    "empty file": ([], "", "no items"),
    "label out of range": ([GOOD], "2\n", ":1: label 2 is out of range for 2 choices"),
    "null solution": ([{**GOOD, "sol2": None}], "0\n", ":1: a piqa item needs a question and at least two text choices"),
    "not a number label": ([GOOD], "x\n", ":1: not a piqa item"),
}


@pytest.mark.parametrize("case", list(TASKS))
def test_bad_zero_shot_files(case, tmp_path, tiny_models, capsys):
    rows, labels, expected = TASKS[case]
    data = _piqa(tmp_path, rows, labels)
    code, err = run(["eval", str(tiny_models["llama"]), "--task", "piqa", "--data", str(data)], capsys)
    assert code == 2 and expected in err, err


def test_global_flags_after_the_subcommand(tmp_path, capsys):
    path = tmp_path / "r.toml"
    path.write_text('version = 1\n[[passes]]\ntype = "magnitude"\nsparsity = 0.5\n')
    assert main(["validate", str(path), "--quiet"]) == 0
    assert main(["validate", str(path), "-q", "-v"]) == 0
    assert main(["--quiet", "validate", str(path)]) == 0


def test_schema_into_a_closed_pipe():
    cmd = f"{sys.executable} -m d2compiler.cli schema | head -c 1"
    for _ in range(5):  # the failure was intermittent
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120)
        assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr and proc.stdout == "{"


def test_internal_errors_say_they_are_bugs(tmp_path, monkeypatch, capsys):
    from d2compiler.recipe import passmanager

    monkeypatch.setattr(passmanager.PassManager, "__init__", lambda *_a: 1 / 0)
    path = tmp_path / "r.toml"
    path.write_text('version = 1\n[[passes]]\ntype = "magnitude"\nsparsity = 0.5\n')
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("internal error: this is a bug in d2compiler") and "ZeroDivisionError" in err
