"""Streaming stays in its model folder (issue 26, groups 2 and 3): streaming and in-memory loading
share one check of every shard an index names (inside the folder, present; a tensor read from the
shard that holds it), and an output never replaces a file the source is read from, wherever the
source's links point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from d2compiler.cli import main
from d2compiler.weight_index import INDEX

from .conftest import write_recipe

WANDA = '[[passes]]\ntype = "calibrate"\nhessian = false\n[[passes]]\ntype = "wanda"\nsparsity = 0.5\n'


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_models) -> Path:
    """The tiny Llama saved in several shards with an index."""
    import transformers as tf

    folder = tmp_path_factory.mktemp("sharded") / "llama"
    tf.AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).save_pretrained(folder, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_models["llama"] / name).exists():
            shutil.copy(tiny_models["llama"] / name, folder / name)
    assert len(json.loads((folder / INDEX).read_text())["weight_map"]) > 0 and len(list(folder.glob("*.safetensors"))) > 2
    return folder


def copy_with_index(sharded: Path, dest: Path, edit) -> Path:
    """A copy of the sharded model whose index's weight map is edited by `edit(weight_map)`."""
    shutil.copytree(sharded, dest)
    index = json.loads((dest / INDEX).read_text())
    edit(index["weight_map"])
    (dest / INDEX).write_text(json.dumps(index))
    return dest


def run(tmp: Path, model: Path, *, streaming: bool, output: Path | None = None, overwrite: bool = False) -> int:
    output = output or tmp / f"out-{streaming}"
    recipe = write_recipe(tmp / f"r-{streaming}.toml", str(model), WANDA, samples=2, seq_len=32, output=output)
    text = recipe.read_text().replace('device = "cpu"\n', f'device = "cpu"\nstreaming = {str(streaming).lower()}\n', 1)
    recipe.write_text(text)
    return main(["--quiet", "run", str(recipe), *(["--overwrite"] if overwrite else [])])


def the_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def first_tensor(weight_map: dict[str, str]) -> str:
    return sorted(weight_map)[0]


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("where", ["../outside.safetensors", "/tmp/outside.safetensors"])
def test_a_shard_outside_the_folder_is_refused(where, streaming, sharded, tmp_path, capsys):
    def point_outside(weight_map):
        weight_map[first_tensor(weight_map)] = where

    model = copy_with_index(sharded, tmp_path / "m", point_outside)
    shutil.copy(next(model.glob("*.safetensors")), tmp_path / "outside.safetensors")  # it exists: still refused
    assert run(tmp_path, model, streaming=streaming) == 2
    assert "outside the model folder" in the_error(capsys)


def test_eval_streaming_refuses_a_shard_outside_the_folder(sharded, tmp_path, capsys):
    model = copy_with_index(sharded, tmp_path / "m", lambda wm: wm.update({first_tensor(wm): "../x.safetensors"}))
    assert main(["--quiet", "eval", str(model), "--streaming", "--max-windows", "1", "--seq-len", "16"]) == 2
    assert "outside the model folder" in the_error(capsys)


@pytest.mark.parametrize("streaming", [True, False])
def test_a_missing_shard_is_named(streaming, sharded, tmp_path, capsys):
    model = copy_with_index(sharded, tmp_path / "m", lambda wm: None)
    shard = sorted(model.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert run(tmp_path, model, streaming=streaming) == 2
    line = the_error(capsys)
    assert f"shard {shard.name}" in line and "does not exist" in line


def test_a_tensor_in_another_shard_than_the_index_says_loads_the_same(sharded, tmp_path, caplog):
    """In memory and streamed, the run reads each tensor from the shard that holds it."""
    def swap(weight_map):  # a tensor of a shard that holds several is said to be in another listed shard
        shards = sorted(set(weight_map.values()))
        a = next(s for s in shards if list(weight_map.values()).count(s) > 1)
        key = next(k for k, v in weight_map.items() if v == a)
        weight_map[key] = next(s for s in shards if s != a)

    model = copy_with_index(sharded, tmp_path / "m", swap)
    hashes = []
    for streaming in (True, False):
        out = tmp_path / f"out-{streaming}"
        assert run(tmp_path, model, streaming=streaming, output=out) == 0
        hashes.append(json.loads((out / "sparsity.json").read_text())["weights_sha256"])
    reference = tmp_path / "reference"
    assert run(tmp_path, sharded, streaming=True, output=reference) == 0
    assert hashes == [json.loads((reference / "sparsity.json").read_text())["weights_sha256"]] * 2
    assert "not in the shard the index names" in caplog.text


@pytest.mark.parametrize("streaming", [True, False])
def test_an_output_never_replaces_a_file_the_source_reads_through_a_link(streaming, sharded, tmp_path, capsys):
    """A shard that is a link into an earlier output: running into that output with --overwrite is
    refused and the earlier output is untouched."""
    earlier = tmp_path / "earlier"
    assert run(tmp_path, sharded, streaming=streaming, output=earlier) == 0
    capsys.readouterr()
    model = tmp_path / "linked"
    shutil.copytree(sharded, model)
    shard = sorted(model.glob("model-*.safetensors"))[0]
    target = earlier / "model.safetensors"
    if not target.exists():
        target = sorted(earlier.glob("*.safetensors"))[0]
    shutil.copy(shard, target.with_name("borrowed.safetensors"))
    shard.unlink()
    shard.symlink_to(target.with_name("borrowed.safetensors"))
    before = {p.name: p.read_bytes() for p in earlier.iterdir() if p.is_file()}
    assert run(tmp_path, model, streaming=streaming, output=earlier, overwrite=True) == 2
    assert "which this run reads" in the_error(capsys)
    assert {p.name: p.read_bytes() for p in earlier.iterdir() if p.is_file()} == before
