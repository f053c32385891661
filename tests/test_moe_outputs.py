"""compressed-tensors checkpoints of Mixture-of-Experts models with quantized experts (issue 27): each
3-D bank is written as the per-expert linears of the model's own checkpoint layout, which
transformers loads (decompressing, then merging into its banks) with d2compiler's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import d2compiler
from d2compiler.cli import main

from .conftest import write_recipe
from .test_moe import moe_config

pytest.importorskip("compressed_tensors")

PRUNE_AND_QUANTIZE = ('[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n'
                      '[[passes]]\ntype = "gptq"\nbits = 4\ngroup_size = 16\n')
LOGITS_ATOL = 1e-5  # the decompressed weights are ours exactly (see test_compressed_tensors)


@pytest.fixture(scope="module")
def moe_folders(tmp_path_factory, tokenizer):
    import transformers as tf

    root = tmp_path_factory.mktemp("moe_ct")
    out = {}
    for family in ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"):
        torch.manual_seed(0)
        out[family] = root / family
        tf.AutoModelForCausalLM.from_config(moe_config(family, len(tokenizer))).save_pretrained(out[family])
        tokenizer.save_pretrained(out[family])
    return out


def prune(tmp_path, model, passes=PRUNE_AND_QUANTIZE, name="out", fmt=None):
    out = tmp_path / name
    recipe = write_recipe(tmp_path / f"{name}.toml", str(model), passes, samples=4, seq_len=32, output=out)
    if fmt:
        recipe.write_text(recipe.read_text() + f'format = "{fmt}"\n')
    assert main(["--quiet", "run", str(recipe)]) == 0
    return out


def stored_keys(folder) -> set[str]:
    keys = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            keys |= set(f.keys())
    return keys


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_quantized_experts_export_and_load_in_transformers_with_our_logits(family, moe_folders, tmp_path, tokenizer):
    """SparseGPT 50% + GPTQ int4 (group 16) on every expert and linear, exported: transformers loads the
    checkpoint both decompressed and plainly (its compressed mode) with our logits, every bank equal to
    ours (zeros included), the experts stored as packed per-expert linears under the checkpoint's names
    (Mixtral's `block_sparse_moe.experts.{e}.w1`), and the routers dense and ignored."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out = prune(tmp_path, moe_folders[family])
    ct = tmp_path / "ct"
    assert main(["--quiet", "export", str(out), "--format", "compressed-tensors", "--to", str(ct)]) == 0
    reference = d2compiler.load(out)
    ids = tokenizer("import os\nprint(os.getcwd())", return_tensors="pt").input_ids
    decompressed = AutoModelForCausalLM.from_pretrained(ct, quantization_config=CompressedTensorsConfig(dequantize=True))
    plain = AutoModelForCausalLM.from_pretrained(ct)
    with torch.no_grad():
        want = reference(ids).logits
        for loaded in (decompressed.eval(), plain.eval()):
            assert (loaded(ids).logits - want).abs().max() <= LOGITS_ATOL
    for name, bank in reference.named_parameters():
        if bank.dim() == 3:
            got = decompressed.get_parameter(name)
            assert torch.equal(got, bank) and (got == 0).float().mean() >= 0.5, name
    keys = stored_keys(ct)
    expert = "block_sparse_moe.experts.0.w1" if family == "mixtral" else "mlp.experts.0.gate_proj"
    layer = 1  # DeepSeek-V3's first block is dense (first_k_dense_replace = 1)
    assert {f"model.layers.{layer}.{expert}.{t}" for t in ("weight_packed", "weight_scale", "weight_shape")} <= keys
    assert not any(k.endswith("__weight_scale") or k.endswith("gate_up_proj") for k in keys)
    config = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert [g["targets"] for g in config["config_groups"].values()] == [["Linear"]]
    router = f"model.layers.{layer}.{'block_sparse_moe' if family == 'mixtral' else 'mlp'}.gate"
    assert router in config["ignore"] and "lm_head" in config["ignore"]
    assert f"{router}.weight" in keys  # dense


def test_recipe_writes_moe_compressed_tensors_directly(moe_folders, tmp_path, tokenizer):
    """`format = "compressed-tensors"` in the recipe (the scales never leave the process) gives the
    checkpoint the two-step export gives: the same logits as the plain output of the same recipe."""
    from transformers import AutoModelForCausalLM

    ct = prune(tmp_path, moe_folders["qwen3_moe"], name="ct", fmt="compressed-tensors")
    hf = prune(tmp_path, moe_folders["qwen3_moe"], name="hf")
    ids = tokenizer("def f(x):\n    return x", return_tensors="pt").input_ids
    with torch.no_grad():
        want = d2compiler.load(hf)(ids).logits
        assert (AutoModelForCausalLM.from_pretrained(ct).eval()(ids).logits - want).abs().max() <= LOGITS_ATOL


@pytest.mark.parametrize(("family", "extra", "message"), [
    ("gpt_oss", "", "an expert of a bank used as x @ W[e]"),
    ("qwen3_moe", 'ignore = ["re:.*experts\\\\.down_proj\\\\.1$"]\n', "3 of its 4 experts quantized"),
    ("qwen3_moe", '[[passes]]\ntype = "quantize_rtn"\nbits = 8\ngroup_size = 0\ntargets = ["re:.*self_attn"]\n',
     "use 2 grids"),
])
def test_what_compressed_tensors_cannot_store_is_one_located_line(family, extra, message, moe_folders, tmp_path, capsys):
    """gpt-oss uses its banks as x @ W[e] and keeps them 3-D in its checkpoints; a bank with
    some experts left unquantized, or two grids in one MoE checkpoint, cannot be one fused-MoE scheme."""
    passes = PRUNE_AND_QUANTIZE + extra
    if family == "qwen3_moe" and "rtn" in extra:
        passes = passes.replace('type = "gptq"\n', 'type = "gptq"\ntargets = ["re:.*experts"]\n')
    out = prune(tmp_path, moe_folders[family], passes)
    capsys.readouterr()
    assert main(["export", str(out), "--format", "compressed-tensors", "--to", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize(("family", "quantize"), [("qwen3_moe", False), ("gpt_oss", True)])
def test_two_four_banks_are_packed_and_load_with_our_logits(family, quantize, moe_folders, tmp_path, tokenizer):
    """SparseGPT 2:4 (then GPTQ int4 on gpt-oss, whose banks are used as x @ W[e]) and `pack_2_4` on every
    expert: each expert is recorded packed, the `d2c-packed` output (written by the recipe, and by `d2c
    export` from the plain output) stores each bank as kept values or int4 levels + 2-bit positions with
    no dense copy, and `d2compiler.load` gives the plain output's logits."""
    passes = '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nmask_structure = "2:4"\n'
    if quantize:
        passes += '[[passes]]\ntype = "gptq"\nbits = 4\ngroup_size = 16\n'
    passes += '[[passes]]\ntype = "pack_2_4"\n'
    hf = prune(tmp_path, moe_folders[family], passes, name="hf")
    record = json.loads((hf / "sparsity.json").read_text())
    reference = d2compiler.load(hf)
    bank_names = [name for name, p in reference.named_parameters() if p.dim() == 3]
    assert bank_names and all(record["layers"][f"{name}.{e}"]["packed"] == "2:4"
                              for name in bank_names for e in range(4))
    exported = tmp_path / "exported"
    assert main(["--quiet", "export", str(hf), "--format", "d2c-packed", "--to", str(exported)]) == 0
    ids = tokenizer("for i in range(3):\n    print(i)", return_tensors="pt").input_ids
    for packed in (prune(tmp_path, moe_folders[family], passes, name="packed", fmt="d2c-packed"), exported):
        with safe_open(str(packed / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        for name in bank_names:
            assert name not in keys and f"{name}.meta" in keys
            assert (f"{name}.qvalues" if quantize else f"{name}.values") in keys
        assert (packed / "model.safetensors").stat().st_size < (hf / "model.safetensors").stat().st_size
        loaded = d2compiler.load(packed)
        with torch.no_grad():
            assert (loaded(ids).logits - reference(ids).logits).abs().max() <= LOGITS_ATOL
        for name in bank_names:
            assert torch.equal(loaded.get_parameter(name), reference.get_parameter(name)), name
