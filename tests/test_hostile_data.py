"""Data and weights a hostile user hands in (issue 26, group 9): a huge single-line JSONL costs what
the calibration windows cost, a .safetensors calibration file without `input_ids` is described as
what it is, and integer weights are not cast to float silently."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from d2compiler.cli import main
from d2compiler.evaluation import data

from .conftest import SHARED_DATA, write_recipe

WANDA = '[[passes]]\ntype = "calibrate"\nhessian = false\n[[passes]]\ntype = "wanda"\nsparsity = 0.5\n'


def test_a_huge_single_line_jsonl_is_tokenized_only_as_far_as_the_windows_need(tmp_path, tiny_models, monkeypatch):
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"text": "a few plain words " * 2_000_000}) + "\n")  # 36 MB on one line
    tokenized: list[int] = []
    real = data.tokenize
    monkeypatch.setattr(data, "tokenize", lambda tokenizer, text: tokenized.append(len(text)) or real(tokenizer, text))
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), WANDA, samples=4, seq_len=32)
    recipe.write_text(recipe.read_text().replace('source = "builtin:python-docs"', f'source = "{big}"'))
    assert main(["--quiet", "run", str(recipe)]) == 0
    assert tokenized and max(tokenized) < 10_000, tokenized


def test_sequential_windows_equal_those_of_the_whole_text(tokenizer):
    for source in (SHARED_DATA / "c4/c4_demo_llamafactory.jsonl", SHARED_DATA / "wikitext-2-raw-v1/wiki.test.raw"):
        whole = data.tokenize(tokenizer, data.load_text(str(source), "calibration"))
        for need in (100, 8 * 512):
            assert torch.equal(data.leading_tokens(tokenizer, str(source), "calibration", need)[:, :need], whole[:, :need])


def test_a_safetensors_calibration_file_without_input_ids_says_so(tmp_path, tiny_models, capsys):
    wrong = tmp_path / "wrong.safetensors"
    save_file({"tokens": torch.zeros(2, 32, dtype=torch.int64)}, str(wrong))
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), WANDA, samples=2, seq_len=32)
    recipe.write_text(recipe.read_text().replace('source = "builtin:python-docs"', f'source = "{wrong}"'))
    assert main(["--quiet", "run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "has no `input_ids` tensor of token windows" in err and "it holds: tokens" in err and "images" not in err


def test_integer_weights_are_not_cast_silently(tmp_path, tiny_models, caplog):
    import shutil

    from d2compiler.loading.models import load_model

    folder = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], folder)
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = (tensors[name] * 100).round().to(torch.int32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    load_model(str(folder), "float32", "cpu")
    assert f"1 weight(s) are stored as integers (e.g. {name} (I32))" in caplog.text
