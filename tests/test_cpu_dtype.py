"""`model.dtype = "auto"` on the CPU (issue 26, group 8): a bfloat16 checkpoint is pruned in float32
(bf16 matmuls are several times slower on CPUs) and written in bfloat16; the weights evaluated,
hashed, checkpointed and written are the same bf16 values, in memory and streamed; `d2c plan` says so."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from d2compiler.cli import main

from .conftest import write_recipe

SPARSEGPT = '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n'


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory, tiny_models):
    import transformers as tf

    folder = tmp_path_factory.mktemp("bf16") / "llama"
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).to(torch.bfloat16)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_models["llama"] / name).read_bytes())
    return folder


def run(tmp_path, model, streaming: bool):
    out = tmp_path / f"out-{streaming}"
    recipe = write_recipe(tmp_path / f"r-{streaming}.toml", str(model), SPARSEGPT, samples=4, seq_len=32, output=out)
    recipe.write_text(recipe.read_text().replace('device = "cpu"\n', f'device = "cpu"\ndtype = "auto"\nstreaming = {str(streaming).lower()}\n', 1))
    assert main(["--quiet", "run", str(recipe)]) == 0
    return out, recipe


def test_auto_on_the_cpu_computes_in_float32_and_stores_bfloat16(bf16_llama, tmp_path, capsys):
    records = []
    for streaming in (False, True):
        out, recipe = run(tmp_path, bf16_llama, streaming)
        record = json.loads((out / "sparsity.json").read_text())
        assert record["results"]["compute_dtype"] == "float32" and record["results"]["storage_dtype"] == "bfloat16"
        dtypes = set()
        for file in out.glob("*.safetensors"):
            with safe_open(str(file), "pt") as f:
                dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {"BF16"}, dtypes
        records.append(record)
    assert records[0]["weights_sha256"] == records[1]["weights_sha256"]  # the same bf16 values either way
    assert main(["plan", str(recipe)]) == 0
    assert "dtype: computed in float32, stored in the checkpoint's bfloat16 (model.dtype = auto on the CPU" in capsys.readouterr().out


def test_an_explicit_bfloat16_still_computes_in_bfloat16(bf16_llama, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.toml", str(bf16_llama), SPARSEGPT, samples=4, seq_len=32, output=out)
    recipe.write_text(recipe.read_text().replace('device = "cpu"\n', 'device = "cpu"\ndtype = "bfloat16"\n', 1))
    assert main(["--quiet", "run", str(recipe)]) == 0
    results = json.loads((out / "sparsity.json").read_text())["results"]
    assert results["compute_dtype"] == "bfloat16" and results["storage_dtype"] == "bfloat16"
