"""Mixture-of-Experts whose experts are a `ModuleList` / `ModuleDict` of modules (issue 27, item 2):
found from the module tree and one forward (`graph.expert_lists`), traced with the MoE module
opaque, pruned expert by expert on the tokens routed to each; routers stay dense."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from d2compiler.cli import main

from .conftest import write_recipe


@pytest.fixture(scope="module")
def tiny_switch(tmp_path_factory, tokenizer):
    """A tiny Switch Transformers: encoder-decoder (two stacks), `ModuleDict` experts, the router a
    linear in a child module of the MoE module, decoder inputs not made by the model itself."""
    import transformers as tf

    from d2compiler.evaluation.synthetic import save_random_model

    config = tf.SwitchTransformersConfig(
        vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, expert_capacity=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1)
    folder = tmp_path_factory.mktemp("switch") / "model"
    save_random_model(config, folder, tokenizer, model_class=tf.SwitchTransformersForConditionalGeneration)
    return folder


D2PRUNE = ('[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "attention_kl_update"\nstrategy = "kl"\n'
           '[[passes]]\ntype = "dual_taylor_mask"\nsparsity = 0.5\n')


def test_switch_experts_in_both_stacks_are_pruned_and_the_model_reloads(tiny_switch, tokenizer, tmp_path):
    import transformers as tf

    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.toml", str(tiny_switch), D2PRUNE, samples=4, seq_len=32, output=out)
    recipe.write_text(recipe.read_text().replace('device = "cpu"\n', 'device = "cpu"\nblocks = ["encoder.block", "decoder.block"]\n'))
    assert main(["--quiet", "run", str(recipe)]) == 0
    layers = json.loads((out / "sparsity.json").read_text())["layers"]
    pruned = tf.AutoModelForSeq2SeqLM.from_pretrained(out)
    experts = {n: p for n, p in pruned.named_parameters() if ".experts.expert_" in n}
    assert len(experts) == 2 * 2 * 4 * 2  # stacks x blocks x experts x (wi, wo)
    for name, weight in experts.items():
        assert abs(float((weight == 0).float().mean()) - 0.5) <= 0.01, name
        layer = layers[name.removesuffix(".weight")]
        assert layer["role"] == ("up" if name.endswith("wi.weight") else "down") and layer["calibration_tokens"] >= 0
    routers = [p for n, p in pruned.named_parameters() if "router.classifier" in n]
    assert len(routers) == 4 and all(bool((p != 0).all()) for p in routers)
    assert sum(layers[n]["calibration_tokens"] for n in layers if n.startswith("encoder.block.0.") and n.endswith("wi")) \
        == 4 * 32  # top-1: every calibration token reaches exactly one expert of the first encoder block


class Expert(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(hidden, inner, bias=False), nn.Linear(hidden, inner, bias=False)
        self.w2 = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class ListMoE(nn.Module):
    """An older-transformers-style MoE: a router linear, a `ModuleList` of gated experts looped over
    with a data-dependent skip, top-2 renormalised; a shared expert; expert `never` gets no token."""

    def __init__(self, hidden: int, inner: int, experts: int = 4, never: int = 3):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, inner) for _ in range(experts))
        self.shared = Expert(hidden, inner)
        self.never = never

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        logits[:, self.never] = float("-inf")
        weights, chosen = torch.topk(torch.softmax(logits, -1), 2, -1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = self.shared(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel() == 0:
                continue
            out = out.index_add(0, token, expert(x[token]) * weights[token, slot, None])
        return out.reshape(shape)


def test_a_module_list_of_experts_gets_roles_routed_statistics_and_exact_sparsity(tokenizer):
    import transformers as tf

    from d2compiler.driver.pipeline import compress
    from d2compiler.evaluation.data import calibration_windows, leading_tokens
    from d2compiler.evaluation.synthetic import tiny_llama_config
    from d2compiler.loading.models import LoadedModel
    from d2compiler.recipe.schema import validate_recipe

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tiny_llama_config(len(tokenizer))).eval()
    for layer in model.model.layers:
        layer.mlp = ListMoE(64, 32)
    routed = []  # the rows the dense expert 0 of block 0 gets from the calibration windows
    dense = copy.deepcopy(model)
    dense.model.layers[0].mlp.experts[0].w1.register_forward_pre_hook(lambda _m, args: routed.append(args[0].shape[0]))
    with torch.no_grad():
        for window in calibration_windows(leading_tokens(tokenizer, "builtin:python-docs", "calibration", 128), 4, 32):
            dense(window)
    recipe = {"version": 1, "model": {"source": "tiny-list-moe", "device": "cpu", "dtype": "float32"},
              "data": {"calibration": {"source": "builtin:python-docs", "samples": 4, "seq_len": 32}},
              "passes": [{"type": "calibrate"}, {"type": "sparsegpt", "sparsity": 0.5}, {"type": "gptq", "bits": 4, "group_size": 32}]}
    grouped = copy.deepcopy(model)
    summary = compress(validate_recipe(recipe), loaded=LoadedModel(model, tokenizer, "tiny-list-moe"), quiet=True)
    layers = summary.layers
    in_pairs = compress(validate_recipe({**recipe, "experts": {"group_size": 2}}),  # issue 28: experts in groups of 2
                        loaded=LoadedModel(grouped, tokenizer, "tiny-list-moe"), quiet=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(grouped.state_dict()[name], tensor), name
    assert {b["memory"].get("expert_groups") for b in in_pairs.record["blocks"]} == {2}
    prefix = "model.layers.0.mlp"
    for e in range(4):
        assert [layers[f"{prefix}.experts.{e}.{w}"]["role"] for w in ("w1", "w3", "w2")] == ["gate", "up", "down"]
    assert [layers[f"{prefix}.shared.{w}"]["role"] for w in ("w1", "w3", "w2")] == ["gate", "up", "down"]
    assert f"{prefix}.gate" not in layers and bool((model.model.layers[0].mlp.gate.weight != 0).all())  # the router: dense
    assert layers[f"{prefix}.experts.0.w1"]["calibration_tokens"] == sum(routed) > 0
    assert layers[f"{prefix}.experts.3.w1"]["calibration_tokens"] == 0
    assert layers[f"{prefix}.experts.3.w1"]["statistics"] == "identity: no token reached it"
    for name, param in model.named_parameters():
        if ".experts." in name or ".shared." in name:
            assert layers[name.removesuffix(".weight")]["pruned"] == param.numel() // 2  # the mask (gptq keeps it)
            assert float((param == 0).float().mean()) >= 0.5, name  # (4-bit levels may round a kept weight to 0)
            module = model.get_submodule(name.removesuffix(".weight"))
            assert module.weight_scale.shape == (param.shape[0], param.shape[1] // 32)  # quantized, with its scales


class TwoMLPs(nn.Module):
    """Not a MoE: a `ModuleList` of two gated MLPs that every token goes through."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.mlps = nn.ModuleList(Expert(hidden, inner) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlps[0](x) + self.mlps[1](x)


def test_a_module_list_every_token_goes_through_is_traced_not_probed(tokenizer):
    import transformers as tf

    from d2compiler.evaluation.synthetic import tiny_llama_config
    from d2compiler.execution.block_io import capture_block_inputs
    from d2compiler.execution.executor import BlockExecutor

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tiny_llama_config(len(tokenizer))).eval()
    for layer in model.model.layers:
        layer.mlp = TwoMLPs(64, 32)
    executor = BlockExecutor(model, [], device=torch.device("cpu"), quiet=True)
    sample = capture_block_inputs(model, executor.blocks, [torch.randint(0, len(tokenizer), (1, 16))], torch.device("cpu"))[0]
    structure = executor.structure(0, sample)
    assert structure.expert_lists == {}
    assert structure.roles["mlp.mlps.1.w2"] == "down" and structure.roles["mlp.mlps.1.w1"] in ("gate", "up")  # the graph's
    assert any({"mlp.mlps.0.w1", "mlp.mlps.1.w3"} <= set(group) for group in structure.input_groups)  # one input, traced


def test_inspect_shows_an_expert_list_in_one_line_per_linear(tiny_switch, capsys):
    assert main(["inspect", str(tiny_switch)]) == 0
    out = capsys.readouterr().out
    assert "mlp.experts.*.wi" in out and "x 4 experts (a list of modules)" in out
    assert "router.classifier" in out and "router" in out.split("router.classifier")[1].split("\n")[0]
    assert "expert_1" not in out.split("attention:")[1]


def test_all_tokens_statistics_for_a_module_list_of_experts(tokenizer, caplog):
    """`experts.calibration = "all"` on experts held as modules: every expert (the one the router
    never picks too) sees every calibration token once, while the block's output stays routed."""
    import transformers as tf

    from d2compiler.driver.pipeline import compress
    from d2compiler.evaluation.synthetic import tiny_llama_config
    from d2compiler.loading.models import LoadedModel
    from d2compiler.recipe.schema import validate_recipe

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tiny_llama_config(len(tokenizer))).eval()
    for layer in model.model.layers:
        layer.mlp = ListMoE(64, 32)
    recipe = {"version": 1, "model": {"source": "tiny-list-moe", "device": "cpu", "dtype": "float32"},
              "data": {"calibration": {"source": "builtin:python-docs", "samples": 4, "seq_len": 32}},
              "experts": {"calibration": "all"}, "passes": [{"type": "calibrate"}, {"type": "sparsegpt", "sparsity": 0.5}]}
    summary = compress(validate_recipe(recipe), loaded=LoadedModel(model, tokenizer, "tiny-list-moe"), quiet=True)
    assert "keep routed statistics" not in caplog.text and "stay routed" not in caplog.text
    for block in range(2):
        for e in range(4):
            entry = summary.layers[f"model.layers.{block}.mlp.experts.{e}.w1"]
            assert entry["calibration_tokens"] == 4 * 32 and "statistics" not in entry  # expert 3 too
            assert entry["pruned"] == 32 * 64 // 2


def test_weighted_statistics_for_a_module_list_of_experts(tokenizer, record_expert_hessians, caplog):
    """`experts.calibration = "weighted"` on experts held as modules: the Hessian of each expert's
    input projection is Σ w·x xᵀ / n over the tokens routed to it, w the routing weight the module
    multiplies that expert's output by (found from the gradient; here the renormalised top-2
    softmax), and its `down` projection sees act(gate)·up of the same rows, weighted alike; the shared
    expert keeps plain statistics, and the block's output stays the routed one."""
    import transformers as tf

    from d2compiler.driver.pipeline import compress
    from d2compiler.evaluation.synthetic import tiny_llama_config
    from d2compiler.graph.experts import expert_statistics
    from d2compiler.loading.models import LoadedModel
    from d2compiler.recipe.schema import validate_recipe

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tiny_llama_config(len(tokenizer))).eval()
    for layer in model.model.layers:
        layer.mlp = ListMoE(64, 32)
    moe = model.model.layers[0].mlp
    seen = []
    handle = moe.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().reshape(-1, 64).double()))
    recipe = {"version": 1, "model": {"source": "tiny-list-moe", "device": "cpu", "dtype": "float32"},
              "data": {"calibration": {"source": "builtin:python-docs", "samples": 3, "seq_len": 32}},
              "experts": {"calibration": "weighted"}, "passes": [{"type": "calibrate"}, {"type": "test_record_expert_hessians"}]}
    record_expert_hessians.clear()
    compress(validate_recipe(recipe), loaded=LoadedModel(model, tokenizer, "tiny-list-moe"), quiet=True)
    handle.remove()
    assert "stay routed" not in caplog.text
    x = torch.cat(seen[-3:])  # the observation: one call per calibration sample
    with torch.no_grad():
        logits = moe.gate(x.float()).double()
        logits[:, moe.never] = float("-inf")
        weights, chosen = torch.topk(torch.softmax(logits, -1), 2, -1)
        weights = weights / weights.sum(-1, keepdim=True)
        for e in range(3):  # expert 3 is never chosen
            rows = (chosen == e).any(-1)
            w = (weights * (chosen == e)).sum(-1)[rows]
            xe = x[rows]
            want = (xe * w[:, None]).T @ xe / len(xe)
            assert torch.allclose(record_expert_hessians[f"mlp.experts.{e}.w1"], want, rtol=1e-4, atol=1e-7), e
            expert = moe.experts[e].double()
            mid = torch.nn.functional.silu(expert.w1(xe)) * expert.w3(xe)
            want = (mid * w[:, None]).T @ mid / len(mid)
            assert torch.allclose(record_expert_hessians[f"mlp.experts.{e}.w2"], want, rtol=1e-4, atol=1e-7), e
            moe.experts[e].float()
        assert torch.allclose(record_expert_hessians["mlp.shared.w1"], x.T @ x / len(x), rtol=1e-4, atol=1e-7)
        hidden = torch.randn(1, 16, 64)
        routed = moe(hidden)
        with expert_statistics("weighted"):
            assert torch.equal(moe(hidden), routed)
