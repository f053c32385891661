"""Every hostile input of the reliability issue, through the CLI: exit status 2, a message naming
the field, file or layer, no traceback, and nothing left at the output path or in a work folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from d2compiler.cli import main
from d2compiler.execution.checkpoint import work_dir_for

from .conftest import write_recipe

SPARSEGPT = '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\n{mask}\n'


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def assert_nothing_written(output: Path) -> None:
    assert not output.exists()
    assert not work_dir_for(output).exists()
    leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")]
    assert not leftovers


CASES = {
    "missing model path": ("{missing}", "sparsity = 0.5", "", "no such file or folder"),
    "not a model folder": ("{empty}", "sparsity = 0.5", "", "not a transformers folder"),
    "unsupported model": ("{unsupported}", "sparsity = 0.5", "", "unsupported model"),
    "sparsity above 1": ("{llama}", "sparsity = 1.2", "", "passes[1].sparsity"),
    "sparsity of exactly 1": ("{llama}", "sparsity = 1.0", "", "passes[1].sparsity"),
    "negative sparsity": ("{llama}", "sparsity = -0.1", "", "passes[1].sparsity"),
    "N >= M": ("{llama}", 'mask_structure = "4:4"', "", "passes[1].mask_structure"),
    "targets match nothing": ("{llama}", 'sparsity = 0.5\ntargets = ["re:.*nonexistent.*"]', "",
                              "match no linear in model.layers.*; the blocks hold: mlp.down_proj"),
    "too little calibration text": ("{llama}", "sparsity = 0.5", "samples = 100000",
                                    "builtin:python-docs: too little calibration text"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input(case, tmp_path, tiny_models, capsys):
    model, mask, calibration, expected = CASES[case]
    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    (tmp_path / "empty").mkdir()
    source = model.format(missing=tmp_path / "missing", empty=tmp_path / "empty", unsupported=unsupported,
                          llama=tiny_models["llama"])
    output = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.toml", source, SPARSEGPT.format(mask=mask), output=output)
    if calibration:
        recipe.write_text(recipe.read_text().replace("samples = 4", calibration))
    code, err = run_cli(["run", str(recipe)], capsys)
    assert code == 2
    assert expected in err
    assert_nothing_written(output)


def test_unwritable_output_folder(tmp_path, tiny_models, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), SPARSEGPT.format(mask="sparsity = 0.5"),
                          output=blocker / "out")
    code, err = run_cli(["run", str(recipe)], capsys)
    assert code == 2 and f"cannot write to {blocker}" in err


def test_existing_output_is_not_replaced(tmp_path, tiny_models, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), SPARSEGPT.format(mask="sparsity = 0.5"), output=output)
    code, err = run_cli(["run", str(recipe)], capsys)
    assert code == 2 and "already exists; pass --overwrite" in err
    assert (output / "keep.txt").read_text() == "mine"


def _poisoned_copy(src: Path, dst: Path, name: str) -> Path:
    """A copy of a model folder with one NaN in parameter `name`."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(("poisoned", "expected"), [
    ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight: the model's weights hold NaN"),
    ("model.embed_tokens.weight", r"model.layers.0.self_attn.[qkv]_proj: the 'hessian' statistic has NaN"),
])
def test_nan_stops_the_run_naming_the_layer(poisoned, expected, tmp_path, tiny_models, capsys):
    folder = _poisoned_copy(tiny_models["llama"], tmp_path / "poisoned", poisoned)
    if poisoned == "model.embed_tokens.weight":  # poison every token so the calibration text hits it
        tensors = load_file(folder / "model.safetensors")
        tensors[poisoned][:, 0] = float("nan")
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    output = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.toml", str(folder), SPARSEGPT.format(mask="sparsity = 0.5"), output=output)
    code, err = run_cli(["run", str(recipe)], capsys)
    assert code == 2 and re.search(expected, err)
    assert_nothing_written(output)
    assert torch.isnan(load_file(folder / "model.safetensors")[poisoned]).any()
