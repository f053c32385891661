"""Mixture-of-Experts (issue 27): the routed experts of transformers-5 models (3-D banks) are found
from what the block computes, with no model class named, and pruned expert by expert; routers stay
dense; the output keeps the model's layout and loads with `from_pretrained`."""

from __future__ import annotations

import json

import pytest
import torch

from d2compiler.cli import main

from .conftest import write_recipe

D2PRUNE = ('[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "attention_kl_update"\nstrategy = "kl"\ncandidates = "one-off"\n'
           '[[passes]]\ntype = "dual_taylor_mask"\nsparsity = 0.5\n')


def moe_config(family: str, vocab: int):
    """Tiny configs of the MoE families people prune (4 experts, top-2; DeepSeek-V3 with MLA, a
    shared expert and a first dense block; Qwen2-MoE with a gated shared expert)."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(head_dim=16, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                                 num_experts_per_tok=2, **common)
    if family == "mixtral":
        return tf.MixtralConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, **common)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                                   n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
                                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1, **common)
    if family == "gpt_oss":
        return tf.GptOssConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16, **common)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                 num_experts=4, num_experts_per_tok=2, **common)
    raise ValueError(family)


FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe")


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory, tokenizer):
    import transformers as tf

    root = tmp_path_factory.mktemp("moe")
    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        out[family] = root / family
        tf.AutoModelForCausalLM.from_config(moe_config(family, len(tokenizer))).save_pretrained(out[family])
        tokenizer.save_pretrained(out[family])
    return out


def banks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.dim() == 3}


def run(tmp_path, model, passes, name="out", extra="") -> tuple[int, dict]:
    out = tmp_path / name
    recipe = write_recipe(tmp_path / f"{name}.toml", str(model), passes, samples=4, seq_len=32, output=out)
    recipe.write_text(recipe.read_text().replace('device = "cpu"\n', f'device = "cpu"\n{extra}', 1))
    code = main(["--quiet", "run", str(recipe)])
    return code, json.loads((out / "sparsity.json").read_text()) if code == 0 else {}


@pytest.mark.parametrize("family", FAMILIES)
def test_d2prune_prunes_every_expert_and_the_model_reloads(family, moe_models, tmp_path):
    import transformers as tf

    code, record = run(tmp_path, moe_models[family], D2PRUNE)
    assert code == 0
    dense = tf.AutoModelForCausalLM.from_pretrained(moe_models[family])
    pruned = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # the model's own layout
    for name, bank in banks(pruned).items():
        assert bank.shape == banks(dense)[name].shape
        for e in range(bank.shape[0]):
            assert abs(float((bank[e] == 0).float().mean()) - 0.5) <= 0.01, f"{name}[{e}]"
            assert f"{name}.{e}" in record["layers"] or f"{name.removesuffix('.weight')}.{e}" in record["layers"]
    for name, param in pruned.named_parameters():  # routers and routing scores stay dense
        if param.dim() == 2 and param.shape[0] in (1, 4) and param.shape[1] == 64:
            assert torch.equal(param, dict(dense.named_parameters())[name]), name
    results = record["results"]
    assert results["coverage"]["unexplained_block_share"] < 0.02
    assert abs(results["block_weight_sparsity"] - 0.5) < 0.02
    with torch.no_grad():
        assert torch.isfinite(pruned(torch.randint(0, 500, (1, 16))).logits).all()


@pytest.mark.parametrize("passes", [
    '[[passes]]\ntype = "magnitude"\nsparsity = 0.6\n',
    '[[passes]]\ntype = "calibrate"\nhessian = false\n[[passes]]\ntype = "wanda"\nsparsity = 0.6\n',
    '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.6\nrefit_steps = 3\n',
    '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nmask_structure = "2:4"\n',
    '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "dual_taylor_mask"\nmask_structure = "2:4"\n',
], ids=["magnitude", "wanda", "sparsegpt-refit", "sparsegpt-2of4", "dual_taylor-2of4"])
def test_every_pruning_pass_is_exact_per_expert(passes, moe_models, tmp_path):
    import transformers as tf

    from d2compiler.graph.packing import violations_2_4

    code, record = run(tmp_path, moe_models["qwen3_moe"], passes)
    assert code == 0
    pruned = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, bank in banks(pruned).items():
        for e in range(bank.shape[0]):
            if "2:4" in passes:
                assert violations_2_4(bank[e]) == 0, f"{name}[{e}]"
            else:
                assert abs(float((bank[e] == 0).float().mean()) - 0.6) <= 0.01, f"{name}[{e}]"


def test_an_expert_no_token_reaches_falls_back_to_the_identity(moe_models, tokenizer):
    """Tokens are never routed to expert 3 (a hook on each router): it is pruned by the documented
    rule (identity statistics: by magnitude) and the record says it got no token."""
    import transformers as tf

    from d2compiler.driver.pipeline import compress
    from d2compiler.loading.models import LoadedModel
    from d2compiler.recipe.schema import validate_recipe

    model = tf.AutoModelForCausalLM.from_pretrained(moe_models["qwen3_moe"]).eval()

    def never_three(_module, _inp, out):
        logits, scores, idx = out
        other = idx.flip(-1)
        return logits, scores, torch.where(idx == 3, torch.where(other == 0, 1, 0), idx)

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(never_three)
    recipe = {"version": 1, "model": {"source": "tiny-moe", "device": "cpu", "dtype": "float32"},
              "data": {"calibration": {"source": "builtin:python-docs", "samples": 4, "seq_len": 32}},
              "passes": [{"type": "calibrate"}, {"type": "sparsegpt", "sparsity": 0.5}]}
    summary = compress(validate_recipe(recipe), loaded=LoadedModel(model, tokenizer, "tiny-moe"), quiet=True)
    layers = summary.layers
    name = "model.layers.0.mlp.experts.gate_up_proj"
    for piece in ("gate", "up"):  # the fused bank's two slices of each expert, each with its own record
        assert layers[f"{name}.3"]["slices"][piece]["calibration_tokens"] == 0
        assert layers[f"{name}.3"]["slices"][piece]["statistics"] == "identity: no token reached it"
        assert layers[f"{name}.0"]["slices"][piece]["calibration_tokens"] > 0 and "statistics" not in layers[f"{name}.0"]["slices"][piece]
    assert layers[f"{name}.3"]["role"] == "gate_up"
    bank = model.model.layers[0].mlp.experts.gate_up_proj.detach()
    assert abs(float((bank[3] == 0).float().mean()) - 0.5) <= 0.01
    kept = bank[3] != 0  # by magnitude: every kept weight at least as large as every pruned one, row by row
    dense = tf.AutoModelForCausalLM.from_pretrained(moe_models["qwen3_moe"]).model.layers[0].mlp.experts.gate_up_proj[3]
    for row in range(dense.shape[0]):
        assert dense[row][kept[row]].abs().min() >= dense[row][~kept[row]].abs().max()


def test_banks_are_pruned_and_quantized_in_place(moe_models, tmp_path):
    """SparseGPT 50% then GPTQ int4 (group 32) on every expert of a 3-D bank: each expert keeps its
    exact 50% mask and every group of 32 weights of a row lies on a grid of at most 16 levels; the
    experts' scales are kept stacked beside their bank (`quantization.safetensors`:
    `...experts.gate_up_proj__weight_scale`, [E, 2I, groups]) for the exporters (tests/test_moe_outputs.py)."""
    import transformers as tf
    from safetensors import safe_open

    passes = ('[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n'
              '[[passes]]\ntype = "gptq"\nbits = 4\ngroup_size = 32\n')
    code, record = run(tmp_path, moe_models["qwen3_moe"], passes)
    assert code == 0
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, bank in banks(model).items():
        dense = tf.AutoModelForCausalLM.from_pretrained(moe_models["qwen3_moe"]).get_parameter(name)
        for e in range(bank.shape[0]):
            layer = record["layers"][f"{name}.{e}"]
            pruned = sum(part["pruned"] for part in layer["slices"].values()) if "slices" in layer else layer["pruned"]
            assert layer["quant"]["bits"] == 4 and pruned == dense[e].numel() // 2, (name, e)
            rows = bank[e].reshape(-1, 32) if bank.shape[-1] % 32 == 0 else bank[e].T.reshape(-1, 32)
            assert max(len(torch.unique(group[group != 0])) for group in rows) <= 16, (name, e)
    with safe_open(str(tmp_path / "out" / "quantization.safetensors"), "pt") as f:
        scale = f.get_tensor("model.layers.0.mlp.experts.gate_up_proj__weight_scale")
    assert scale.shape == (4, 64, 2) and bool((scale > 0).all())  # every expert's every row written


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral", "deepseek_v3"])
def test_streaming_equals_in_memory_on_moe(family, moe_models, tmp_path):
    """gpt-oss stores its banks 3-D; Mixtral and DeepSeek-V3 are saved one tensor per expert (Mixtral
    under `block_sparse_moe.experts.{e}.w1`), the layout transformers converts as it loads: streaming
    reads each bank from its pieces (`graph.checkpoint_layout`) and gives the in-memory weights."""
    import transformers as tf

    passes = '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n'
    _, memory = run(tmp_path, moe_models[family], passes, name="memory")
    _, streamed = run(tmp_path, moe_models[family], passes, name="streamed", extra="streaming = true\n")
    assert streamed["weights_sha256"] == memory["weights_sha256"]
    assert streamed["results"]["block_weight_sparsity"] == memory["results"]["block_weight_sparsity"]
    from safetensors import safe_open

    def stored(folder) -> set[str]:  # the tensor names of an output folder, over its shards
        names: set[str] = set()
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), "pt") as f:
                names |= set(f.keys())
        return names

    assert stored(tmp_path / "streamed") == stored(tmp_path / "memory")  # the checkpoint's own layout, as save_pretrained
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").state_dict()
    for name, tensor in tf.AutoModelForCausalLM.from_pretrained(tmp_path / "memory").state_dict().items():
        assert torch.equal(reloaded[name], tensor), name


@pytest.mark.parametrize("calibration", ["routed", "all", "weighted"])
def test_per_expert_hessians_equal_a_plain_loop(calibration, moe_models, record_expert_hessians):
    """calibrate's Hessian of expert e of the first block equals XᵀX/n over exactly the tokens the
    router sent to e (`routed`), over every token (`all`), or Σ w·x xᵀ/n over the routed tokens with
    their routing weights (`weighted`), captured at the experts module's input, for both banks; with
    `all` and `weighted` the block's output is still the routed one."""
    import transformers as tf

    from d2compiler.driver.pipeline import compress
    from d2compiler.loading.models import LoadedModel
    from d2compiler.recipe.schema import validate_recipe

    published = record_expert_hessians
    published.clear()
    model = tf.AutoModelForCausalLM.from_pretrained(moe_models["qwen3_moe"]).eval()
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    experts = model.model.layers[0].mlp.experts

    def record(_module, args):
        if type(args[0]) is torch.Tensor:  # not torch.export's fake tensors
            seen.append((args[0].detach().double(), args[1].detach(), args[2].detach().double()))

    experts.register_forward_pre_hook(record)
    recipe = {"version": 1, "model": {"source": "tiny-moe", "device": "cpu", "dtype": "float32"},
              "data": {"calibration": {"source": "builtin:python-docs", "samples": 3, "seq_len": 32}},
              "experts": {"calibration": calibration},
              "passes": [{"type": "calibrate"}, {"type": "test_record_expert_hessians"}]}
    summary = compress(validate_recipe(recipe), loaded=LoadedModel(model, tf.AutoTokenizer.from_pretrained(moe_models["qwen3_moe"]),
                                                                   "tiny-moe"), quiet=True)
    observed = seen[1:4]  # after the probe forward (of the first sample): the observation, one call per sample
    hidden, routes, scores = (torch.cat([call[i] for call in observed]) for i in range(3))
    for e in range(4):
        chosen = (routes == e).any(-1) if calibration != "all" else torch.ones(len(hidden), dtype=torch.bool)
        x = hidden[chosen]
        w = (scores * (routes == e)).sum(-1)[chosen] if calibration == "weighted" else torch.ones(len(x), dtype=x.dtype)
        for piece in ("gate", "up"):  # the two slices of the fused bank share the expert's input
            assert summary.layers[f"model.layers.0.mlp.experts.gate_up_proj.{e}"]["slices"][piece]["calibration_tokens"] == x.shape[0]
            got = published[f"mlp.experts.gate_up_proj.{e}[{piece}]"]
            assert torch.allclose(got, (x * w[:, None]).T @ x / x.shape[0], rtol=1e-5, atol=1e-7), (e, piece)
        bank = experts.gate_up_proj[e].detach().double()  # the down bank reads act(gate) * up of the same tokens
        gate, up = (x @ bank.T).chunk(2, dim=-1)
        mid = torch.nn.functional.silu(gate) * up
        want = (mid * w[:, None]).T @ mid / mid.shape[0]
        assert torch.allclose(published[f"mlp.experts.down_proj.{e}"], want, rtol=1e-4, atol=1e-6), e
    from d2compiler.graph.experts import expert_statistics

    block, captured = model.model.layers[0], {}
    handle = block.register_forward_pre_hook(lambda _m, args, kwargs: captured.update(args=args, kwargs=kwargs),
                                             with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(0, 500, (1, 16)), use_cache=False)
        handle.remove()
        routed = block(*captured["args"], **captured["kwargs"])
        with expert_statistics(calibration):  # statistics over other tokens or weights; the output stays the routed one
            other = block(*captured["args"], **captured["kwargs"])
    routed, other = (routed[0], other[0]) if isinstance(routed, tuple) else (routed, other)
    assert torch.equal(routed, other)


def test_two_processes_give_one_process_masks_on_moe(moe_models, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    passes = '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n'
    assert run(tmp_path, moe_models["qwen3_moe"], passes, name="one")[0] == 0
    grouped = (tmp_path / "one.toml").read_text().replace('device = "cpu"\n', 'device = "cpu"\n[experts]\ngroup_size = 3\n', 1)
    (tmp_path / "two.toml").write_text(grouped)  # and the experts in groups (issue 28): the processes go group by group
    two = subprocess.run([sys.executable, "-m", "d2compiler", "--quiet", "run", str(tmp_path / "two.toml"), "--output",
                          str(tmp_path / "two"), "--nproc", "2", "--oversubscribe"], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert all(torch.equal(a[k] == 0, b[k] == 0) for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4  # summation order only


def test_onnx_export_of_an_moe_is_one_located_refusal(moe_models, tmp_path, capsys):
    passes = '[[passes]]\ntype = "magnitude"\nsparsity = 0.5\n'
    assert run(tmp_path, moe_models["qwen3_moe"], passes)[0] == 0
    capsys.readouterr()
    assert main(["--quiet", "export", str(tmp_path / "out"), "--format", "onnx", "--to", str(tmp_path / "onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ONNX export does not take Mixture-of-Experts models yet" in err[0]
    assert not (tmp_path / "onnx").exists()


def test_sparsity_allocation_spreads_over_blocks_and_each_blocks_experts_share_it(moe_models, tmp_path):
    """The layer-wise allocation (block-output error profile) works with experts: each block gets its
    own sparsity, every expert of a block gets that block's, and the whole model keeps the target."""
    passes = ('[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsity_allocation"\nprofile = "error"\n'
              '[[passes]]\ntype = "sparsegpt"\nsparsity = 0.6\n')
    code, record = run(tmp_path, moe_models["qwen3_moe"], passes)
    assert code == 0
    per_block: dict[str, set[float]] = {}
    for name, metrics in record["layers"].items():
        if ".experts." in name and "sparsity" in metrics:
            per_block.setdefault(name.split(".mlp.")[0], set()).add(round(metrics["sparsity"], 2))
    assert len(per_block) == 2 and all(len(values) == 1 for values in per_block.values()), per_block
    assert abs(record["overall_sparsity"] - 0.6) < 0.02


@pytest.mark.parametrize(("family", "gate_rows", "up_rows"), [
    ("qwen3_moe", slice(0, 32), slice(32, 64)),  # gate, up = product.chunk(2, dim=-1)
    ("gpt_oss", slice(0, 64, 2), slice(1, 64, 2)),  # interleaved: product[..., ::2], product[..., 1::2]
])
def test_a_fused_gate_up_bank_is_cut_into_gate_and_up_slices(family, gate_rows, up_rows, moe_models, tmp_path):
    """Found from where the forward cuts the product and which piece reaches the activation: `role:gate`
    prunes exactly the gate rows of every expert, and each slice gets its own exact count."""
    import transformers as tf

    passes = '[[passes]]\ntype = "magnitude"\nsparsity = 0.6\ntargets = ["role:gate"]\n'
    code, record = run(tmp_path, moe_models[family], passes, extra="allow_untargeted = true\n")
    assert code == 0
    pruned = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for layer in pruned.model.layers:
        bank = layer.mlp.experts.gate_up_proj.detach()
        for e in range(bank.shape[0]):
            w = bank[e].t() if family == "gpt_oss" else bank[e]  # gpt-oss stores (in, out): x @ W[e]
            assert int((w[gate_rows] == 0).sum()) == round(0.6 * w[gate_rows].numel()), e
            assert int((w[up_rows] == 0).sum()) == 0, e
    entry = record["layers"]["model.layers.0.mlp.experts.gate_up_proj.1"]
    assert entry["role"] == "gate_up" and set(entry["slices"]) == {"gate"} and entry["slices"]["gate"]["role"] == "gate"
