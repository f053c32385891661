"""Deployment: quantization that keeps masks, pass orders, 2:4 packing, the packed checkpoint."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

import d2compiler
from d2compiler.cli import main
from d2compiler.errors import RecipeError
from d2compiler.graph.packing import Packed24Linear, pack_two_of_four, unpack_two_of_four, violations_2_4
from d2compiler.recipe.schema import validate_recipe
from passes.quant import QuantSpec, fake_quantize, layer_params

from .conftest import write_recipe

CAL = '[[passes]]\ntype = "calibrate"\n'
PASSES = {
    "wanda": '[[passes]]\ntype = "wanda"\nsparsity = 0.5\n',
    "sparsegpt": '[[passes]]\ntype = "sparsegpt"\nsparsity = 0.6\n',
    "quantize_rtn": '[[passes]]\ntype = "quantize_rtn"\nbits = 4\ngroup_size = 16\n',
    "gptq": '[[passes]]\ntype = "gptq"\nbits = 8\ngroup_size = 0\n',
    "magnitude": '[[passes]]\ntype = "magnitude"\nsparsity = 0.5\n',
    "dual_taylor_mask": '[[passes]]\ntype = "dual_taylor_mask"\nsparsity = 0.6\n',
}
TRIPLES = [("wanda", "sparsegpt", "quantize_rtn"), ("magnitude", "dual_taylor_mask", "gptq")]


def test_quantization_grid_keeps_zeros_exact():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    w[torch.rand_like(w) < 0.5] = 0.0
    for spec in (QuantSpec(4, 16, False), QuantSpec(4, 0, True), QuantSpec(8, 8, False)):
        scale, zero = layer_params(w, spec)
        q, deq = fake_quantize(w, scale, zero, spec)
        assert torch.all(deq[w == 0] == 0)
        assert q.min() >= 0 and q.max() <= spec.levels and torch.equal(q, q.round())
        assert (deq - w).abs().max() <= scale.max() / 2 + 1e-6


def _run(tmp_path, model, passes, name, **kw):
    out = tmp_path / name
    recipe = write_recipe(tmp_path / f"{name}.toml", str(model), CAL + passes, output=out, **kw)
    assert main(["--quiet", "run", str(recipe)]) == 0
    return out


@pytest.mark.parametrize("order", [o for t in TRIPLES for o in itertools.permutations(t)], ids="-".join)
def test_every_pass_order_keeps_masks(order, tmp_path, tiny_models, capsys):
    """Every order runs (and never revives a pruned weight, which the executor checks after each
    pass) unless it would move quantized weights, which is refused before anything runs."""
    passes = "".join(PASSES[p] for p in order)
    updater = "sparsegpt" if "sparsegpt" in order else "dual_taylor_mask"
    quantizer = next(p for p in order if p in ("quantize_rtn", "gptq"))
    updates_after_quant = order.index(updater) > order.index(quantizer)
    if updates_after_quant:
        recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), CAL + passes, output=tmp_path / "o")
        assert main(["run", str(recipe)]) == 2
        assert "would move the quantized weights off their integer grid" in capsys.readouterr().err
        return
    out = _run(tmp_path, tiny_models["llama"], passes, "o")
    record = json.loads((out / "sparsity.json").read_text())
    model = d2compiler.load(out)
    for name, layer in record["layers"].items():
        module = model.get_submodule(name)
        weight = module.weight
        assert int((weight == 0).sum()) >= round(0.6 * weight.numel())  # the stricter mask survives
        width = layer["quant"]["group_size"] or weight.shape[1]
        q = weight / module.weight_scale.repeat_interleave(width, dim=1)
        assert torch.allclose(q, q.round(), atol=1e-3)  # still on the quantization grid
        assert layer["quant"]["method"] == quantizer


def test_gptq_beats_rtn_and_keeps_sparsity(tmp_path, tiny_models):
    pruned = '[[passes]]\ntype = "sparsegpt"\nmask_structure = "2:4"\n'
    errors = {}
    for method in ("quantize_rtn", "gptq"):
        quant = f'[[passes]]\ntype = "{method}"\nbits = 4\ngroup_size = 16\n'
        out = _run(tmp_path, tiny_models["llama"], pruned + quant, method)
        layers = json.loads((out / "sparsity.json").read_text())["layers"]
        errors[method] = sum(m["quant_error"] for m in layers.values())
        model = d2compiler.load(out)
        for name in layers:
            assert violations_2_4(model.get_submodule(name).weight) == 0
    assert errors["gptq"] < errors["quantize_rtn"]


def test_pack_unpack_roundtrip_and_size():
    torch.manual_seed(0)
    w = torch.randn(16, 64, dtype=torch.float16)
    keep = torch.zeros(16, 16, 4, dtype=torch.bool)
    keep[..., :2] = True
    w = torch.where(keep[:, :, torch.randperm(4)].reshape(16, 64), w, torch.zeros_like(w))
    w[0, :4] = 0  # a group with fewer than 2 nonzeros
    values, meta = pack_two_of_four(w)
    assert torch.equal(unpack_two_of_four(values, meta), w)
    ratio = (values.numel() * values.element_size() + meta.numel()) / (w.numel() * w.element_size())
    assert ratio == pytest.approx(0.5625)
    layer = Packed24Linear.from_weight(w.float(), None)
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w.float()))


def test_pack_refuses_what_is_not_2_4(tmp_path, tiny_models, capsys):
    passes = '[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n[[passes]]\ntype = "pack_2_4"\n'
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), CAL + passes, output=tmp_path / "o")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "pack_2_4: not exactly 2:4 (model.layers.0." in err and "groups of 4 with more than 2 nonzeros" in err
    assert not (tmp_path / "o").exists()


def test_pack_must_be_last_and_packed_format_needs_it():
    base = {"version": 1, "passes": [{"type": "calibrate"}, {"type": "pack_2_4"}, {"type": "sparsegpt", "mask_structure": "2:4"}]}
    with pytest.raises(RecipeError, match="'pack_2_4' must be the last pass"):
        validate_recipe(base)
    with pytest.raises(RecipeError, match="output.format: 'd2c-packed' stores packed 2:4 layers"):
        validate_recipe({"version": 1, "passes": [{"type": "calibrate"}, {"type": "sparsegpt", "sparsity": 0.5}],
                         "output": {"path": "x", "format": "d2c-packed"}})


@pytest.mark.parametrize("quantize", ["", PASSES["quantize_rtn"]])
def test_packed_checkpoint_is_bit_exact_and_smaller(quantize, tmp_path, tiny_models, tokenizer):
    passes = '[[passes]]\ntype = "sparsegpt"\nmask_structure = "2:4"\n' + quantize + '[[passes]]\ntype = "pack_2_4"\n'
    dense = _run(tmp_path, tiny_models["llama"], passes, "dense")
    packed_recipe = write_recipe(tmp_path / "p.toml", str(tiny_models["llama"]), CAL + passes, output=tmp_path / "packed")
    packed_recipe.write_text(packed_recipe.read_text() + 'format = "d2c-packed"\n')
    assert main(["--quiet", "run", str(packed_recipe)]) == 0
    packed = tmp_path / "packed"
    a, b = d2compiler.load(dense), d2compiler.load(packed)
    assert any(isinstance(m, Packed24Linear) for m in b.modules())
    ids = tokenizer("def f(x): return x + 1", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    stored = load_file(str(packed / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj"
    dense_bytes = load_file(str(dense / "model.safetensors"))[f"{name}.weight"].numel() * 4
    packed_bytes = sum(t.numel() * t.element_size() for k, t in stored.items() if k.startswith(name + "."))
    assert packed_bytes / dense_bytes < (0.5625 + 0.01 if not quantize else 0.2)
    assert json.loads((packed / "sparsity.json").read_text())["layers"][name]["packed"] == "2:4"


@pytest.mark.parametrize("quantize", ["", '[[passes]]\ntype = "gptq"\nbits = 4\ngroup_size = 32\n'])
def test_onnx_export_matches_torch(quantize, tmp_path, tiny_models, tokenizer):
    import onnx
    import onnxruntime as ort

    passes = '[[passes]]\ntype = "sparsegpt"\nmask_structure = "2:4"\n' + quantize
    out = _run(tmp_path, tiny_models["llama"], passes, "pruned")
    assert main(["--quiet", "export", str(out), "--format", "onnx", "--to", str(tmp_path / "onnx")]) == 0
    path = tmp_path / "onnx" / "model.onnx"
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    props = {p.key: p.value for p in proto.metadata_props}
    sparsity = json.loads(props["d2c.sparsity"])
    assert props["d2c.pattern"] == "2:4" and len(props["d2c.recipe_sha256"]) == 64
    initializers = {module: init for init, module in json.loads(props["d2c.initializers"]).items()}
    assert len(initializers) == 14
    up = sparsity[initializers["model.layers.0.mlp.up_proj"]]
    assert up >= 0.5 if quantize else up == pytest.approx(0.5)  # quantization may round more weights to zero
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == (14 if quantize else 0)  # 7 linears x 2 blocks
    ids = tokenizer("class A:\n    def f(self): return [1, 2, 3]", return_tensors="pt").input_ids
    with torch.no_grad():
        want = d2compiler.load(out)(ids).logits.numpy()
    exact = ort.SessionOptions()  # ORT fuses DQ+MatMul into MatMulNBits; level 0 keeps fp32 activations
    exact.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    got = ort.InferenceSession(str(path), exact, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids.numpy()})[0]
    assert abs(got - want).max() < 1e-4
    default = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids.numpy()})[0]
    assert abs(default - want).max() < (1e-4 if not quantize else 2e-2)  # default: int8 activations in MatMulNBits


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse-initializers"])
def test_onnx_external_data_path_checks_and_matches_torch(sparse, tmp_path, tiny_models, tokenizer):
    """The path a model past 2 GB takes (weights in model.onnx.data), forced on the tiny model: the
    checker passes by path, and ONNX Runtime matches torch with fp32 activations."""
    import onnx
    import onnxruntime as ort

    passes = '[[passes]]\ntype = "sparsegpt"\nmask_structure = "2:4"\n[[passes]]\ntype = "gptq"\nbits = 4\ngroup_size = 32\n'
    out = _run(tmp_path, tiny_models["llama"], passes if not sparse else PASSES["sparsegpt"], "pruned")
    flags = ["--sparse-initializers"] if sparse else []
    assert main(["--quiet", "export", str(out), "--format", "onnx", "--to", str(tmp_path / "onnx"), "--external-data", "always", *flags]) == 0
    path = tmp_path / "onnx" / "model.onnx"
    data = tmp_path / "onnx" / "model.onnx.data"
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    outside = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert any(name.endswith("_q" if not sparse else "embed_tokens.weight") for name in outside)
    assert len(proto.graph.sparse_initializer) == (14 if sparse else 0)
    assert all(len(t.raw_data) <= 1024 for t in proto.graph.initializer if t.name not in outside)  # only small ones inline
    assert data.stat().st_size > 100_000
    ids = tokenizer("for i in range(10): print(i)", return_tensors="pt").input_ids
    with torch.no_grad():
        want = d2compiler.load(out)(ids).logits.numpy()
    exact = ort.SessionOptions()
    exact.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    got = ort.InferenceSession(str(path), exact, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids.numpy()})[0]
    assert abs(got - want).max() < 1e-4


def test_onnx_sparse_initializer_variant(tmp_path, tiny_models):
    import onnx
    import onnxruntime as ort

    out = _run(tmp_path, tiny_models["llama"], PASSES["sparsegpt"], "pruned")
    assert main(["--quiet", "export", str(out), "--format", "onnx", "--to", str(tmp_path / "sparse"), "--sparse-initializers"]) == 0
    proto = onnx.load(str(tmp_path / "sparse" / "model.onnx"))
    assert len(proto.graph.sparse_initializer) == 14
    ort.InferenceSession(str(tmp_path / "sparse" / "model.onnx"), providers=["CPUExecutionProvider"])


def test_group_size_checked_before_any_block_runs(tmp_path, tiny_models, capsys):
    passes = '[[passes]]\ntype = "quantize_rtn"\nbits = 4\ngroup_size = 48\n'
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), CAL + passes, output=tmp_path / "o")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "quantize_rtn: group_size=48 does not divide in_features of mlp.down_proj (128)" in err
    assert "blocks:" not in err  # refused before the block loop started


def test_export_converts_between_formats_with_fp16(tmp_path, tiny_models, tokenizer):
    passes = '[[passes]]\ntype = "sparsegpt"\nmask_structure = "2:4"\n' + PASSES["quantize_rtn"]
    out = _run(tmp_path, tiny_models["llama"], passes, "pruned")
    for fmt in ("d2c-packed", "hf"):
        assert main(["--quiet", "export", str(out), "--format", fmt, "--to", str(tmp_path / fmt), "--dtype", "float16"]) == 0
    assert main(["--quiet", "export", str(tmp_path / "d2c-packed"), "--format", "d2c-packed", "--to", str(tmp_path / "again")]) == 0
    ids = tokenizer("x = [i for i in range(3)]", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = [d2compiler.load(tmp_path / name).float()(ids).logits for name in ("hf", "d2c-packed", "again")]
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[1], logits[2])
    sizes = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("hf", "d2c-packed")}
    assert sizes["d2c-packed"] < sizes["hf"]
