"""Architecture breadth: D²Prune (calibrate -> attention_kl_update -> dual_taylor_mask) on a tiny random
model of every supported family, with roles found from the graph, the output reloaded with
`from_pretrained`, finite outputs and exact sparsity."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from d2compiler.cli import main

from .conftest import VISION_MODELS

LLAMA = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
         "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}
VIT = {"attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v", "attention.o_proj": "o",
       "mlp.fc1": "up", "mlp.fc2": "down"}
EXPECTED = {
    "llama": LLAMA, "qwen3": LLAMA, "mistral": LLAMA,
    "opt": {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.out_proj": "o",
            "fc1": "up", "fc2": "down"},
    # GPT-2: one fused Conv1D holds q, k and v; each is a row slice of its (out, in) matrix.
    "gpt2": {"attn.c_attn[q]": "q", "attn.c_attn[k]": "k", "attn.c_attn[v]": "v", "attn.c_proj": "o",
             "mlp.c_fc": "up", "mlp.c_proj": "down"},
    "bert": {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
             "attention.output.dense": "o", "intermediate.dense": "up", "output.dense": "down"},
    "vit": VIT, "deit": VIT,
}
BLOCKS = {"llama": "model.layers", "qwen3": "model.layers", "mistral": "model.layers", "opt": "model.decoder.layers",
          "gpt2": "transformer.h", "bert": "encoder.layer", "vit": "vit.layers", "deit": "deit.layers"}

D2PRUNE = """
[[passes]]
type = "calibrate"
[[passes]]
type = "attention_kl_update"
strategy = "kl"
candidates = "all"
[[passes]]
type = "dual_taylor_mask"
sparsity = 0.6
block_size = 32
"""


def recipe(tmp_path, folder, arch: str, passes: str = D2PRUNE, evaluate: bool = True, output: str = "") -> str:
    """A recipe file for a tiny model: text or image calibration as the model takes, optional
    evaluation, and `output` lines added to the [output] table."""
    vision = arch in VISION_MODELS
    data = ('source = "builtin:digits"\nsamples = 64\nbatch_size = 16' if vision
            else 'source = "builtin:python-docs"\nsamples = 4\nseq_len = 64')
    evaluation = 'source = "builtin:digits"' if vision else 'source = "builtin:python-docs"\nseq_len = 64\nmax_windows = 4'
    evaluation = f"[data.evaluation]\n{evaluation}\n" if evaluate else ""
    path = tmp_path / "recipe.toml"
    path.write_text(f'version = 1\n[model]\nsource = "{folder}"\ndevice = "cpu"\n[data.calibration]\n{data}\n'
                    f'{evaluation}{passes}\n[output]\npath = "{tmp_path / "out"}"\n{output}')
    return str(path)


def reload(folder):
    config = transformers.AutoConfig.from_pretrained(folder)
    return getattr(transformers, config.architectures[0]).from_pretrained(folder).eval()


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_d2prune_on_every_architecture(arch, tiny_models, tmp_path, capsys):
    assert main(["--quiet", "run", recipe(tmp_path, tiny_models[arch], arch)]) == 0
    record = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    prefix = BLOCKS[arch]
    expected = {f"{prefix}.{i}.{local}": role for i in range(2) for local, role in EXPECTED[arch].items()}

    # Roles: every linear of every block, as found from the graph (slices merge into their module).
    layers = record["layers"]
    for name, role in expected.items():
        module, _, part = name.partition("[")
        entry = layers[module]
        assert (entry["slices"][part.rstrip("]")]["role"] if part else entry["role"]) == role, name
    assert set(layers) == {name.partition("[")[0] for name in expected}

    # Exact sparsity (per row, so per slice too), and the KL selection ran on every block.
    for name, entry in layers.items():
        assert entry["sparsity"] == pytest.approx(0.6, abs=0.02), name
    assert set(record["attention_choices"]) == {"0", "1"}

    # The output reloads with from_pretrained, its pruned weights are zero and its outputs finite.
    model = reload(tmp_path / "out")
    for name in layers:
        weight = model.get_submodule(name).weight
        assert float((weight == 0).float().mean()) == pytest.approx(0.6, abs=0.02), name
    dense_input = (torch.rand(2, 1, 8, 8) - 0.5) / 0.5 if arch in VISION_MODELS else torch.randint(3, 500, (2, 12))
    with torch.no_grad():
        output = model(dense_input)
    value = output.logits if hasattr(output, "logits") else output.last_hidden_state
    assert torch.isfinite(value).all()

    metric = {"vit": "accuracy", "deit": "accuracy", "bert": "embedding_cosine"}.get(arch, "perplexity")
    results = record["results"]
    assert results["metric"] == metric and results["pruned"] is not None and results["evaluation"]["count"] > 0
    if metric == "embedding_cosine":
        assert results["dense"] == 1.0 and -1.0 <= results["pruned"] < 1.0


def test_gpt2_slices_are_row_views_of_one_weight(tiny_models):
    from d2compiler.execution.block_io import capture_block_inputs
    from d2compiler.graph.blocks import find_blocks
    from d2compiler.graph.structure import bind_linears, trace_block
    from d2compiler.loading.models import load_model

    model = load_model(str(tiny_models["gpt2"]), "float32", "cpu").model
    path, blocks = find_blocks(model)
    sample = capture_block_inputs(model, blocks, [torch.randint(0, 100, (1, 12))], torch.device("cpu"))[0]
    structure = trace_block(blocks[0], sample.args, sample.kwargs, label="gpt2")
    assert structure.slices == {"attn.c_attn": {"q": (0, 64), "k": (64, 128), "v": (128, 192)}}
    layers = {la.local_name: la for la in bind_linears(blocks[0], f"{path}.0", structure)}
    weight = blocks[0].attn.c_attn.weight  # Conv1D: (in, out)
    for role, (start, stop) in structure.slices["attn.c_attn"].items():
        layer = layers[f"attn.c_attn[{role}]"]
        assert layer.shape == (64, 64) and layer.owner == "attn.c_attn"
        assert torch.equal(layer.weight_matrix(), weight.data.t()[start:stop])
    layers["attn.c_attn[k]"].set_weight_matrix(torch.zeros(64, 64))
    assert torch.count_nonzero(weight[:, 64:128]) == 0 and torch.count_nonzero(weight[:, :64]) == 64 * 64


@pytest.mark.parametrize("arch", ["gpt2", "bert", "vit"])
def test_inspect_shows_roles(arch, tiny_models, capsys):
    assert main(["inspect", str(tiny_models[arch])]) == 0
    out = capsys.readouterr().out
    for local, role in EXPECTED[arch].items():
        line = next(line for line in out.splitlines() if line.strip().startswith(local + " "))
        assert f" {role} " in line
    if arch == "gpt2":
        assert "64..128 of the fused weight" in out


def test_gpt2_two_of_four_packs_the_fused_weight(tiny_models, tmp_path):
    passes = ('[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nmask_structure = "2:4"\n'
              '[[passes]]\ntype = "quantize_rtn"\nbits = 8\ngroup_size = 32\n[[passes]]\ntype = "pack_2_4"\n')
    path = recipe(tmp_path, tiny_models["gpt2"], "gpt2", passes, evaluate=False, output='format = "d2c-packed"\n')
    assert main(["--quiet", "run", path]) == 0
    record = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    entry = record["layers"]["transformer.h.0.attn.c_attn"]
    assert entry["packed"] == "2:4" and set(entry["slices"]) == {"q", "k", "v"} and entry["quant"]["bits"] == 8
    from d2compiler.loading.models import load

    model = load(tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 500, (1, 12))).logits).all()


class DataDependentBlock(torch.nn.Module):
    """A block torch.export cannot trace: Python control flow on a tensor's value."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = h * 2
        return self.b(h)


def test_trace_failure_names_block_operation_and_override():
    from d2compiler.errors import TraceError
    from d2compiler.graph.structure import structure_from_roles, trace_block

    with pytest.raises(TraceError) as err:
        trace_block(DataDependentBlock(), (torch.randn(1, 4, 8),), {}, label="model.layers.0 (DataDependentBlock)")
    message = str(err.value)
    assert message.startswith("model.layers.0 (DataDependentBlock): torch.export cannot trace this block")
    assert "test_arch.py" in message and "if h.sum() > 0:" in message
    assert '[model.roles]\n"a" = "other"\n"b" = "other"' in message
    # The override it suggests needs no tracing.
    assert structure_from_roles(DataDependentBlock(), {"a": "up", "b": "down"}).roles == {"a": "up", "b": "down"}


@pytest.mark.parametrize("arch", ["gpt2", "vit"])
def test_plan_on_other_architectures(arch, tiny_models, tmp_path, capsys):
    assert main(["--quiet", "plan", recipe(tmp_path, tiny_models[arch], arch)]) == 0
    out = capsys.readouterr().out
    assert "attn.c_attn[q] (q)" in out if arch == "gpt2" else "attention.q_proj (q)" in out


def test_passes_name_no_model_family():
    """Structure comes from the graph: no pass or core module branches on a model family."""
    import re
    from pathlib import Path

    import d2compiler
    import passes

    # `model_type`, or a family name as a string literal (what a branch on the family would compare with)
    pattern = re.compile(r"model_type|[\"'](llama|mistral|qwen\d?|opt|gpt-?2|bert|vit|deit)[\"']", re.IGNORECASE)
    for package in (passes, d2compiler):
        for path in Path(package.__file__).parent.rglob("*.py"):
            code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
            hits = [m.group(0) for m in pattern.finditer(code)]
            assert not hits, f"{path}: {hits}"


class FusedBlock(torch.nn.Module):
    """Fused q/k/v cut three ways: `chunk`, explicit slices (Phi-3 style), or a fused k/v only."""

    def __init__(self, cut: str, d=32, heads=4):
        super().__init__()
        self.cut, self.heads = cut, heads
        self.norm = torch.nn.LayerNorm(d)
        if cut == "kv":
            self.q, self.kv = torch.nn.Linear(d, d), torch.nn.Linear(d, 2 * d)
        else:
            self.qkv = torch.nn.Linear(d, 3 * d)
        self.o, self.up, self.down = torch.nn.Linear(d, d), torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def split(self, x):
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x):
        h, d = self.norm(x), x.shape[-1]
        if self.cut == "chunk":
            q, k, v = self.qkv(h).chunk(3, dim=-1)
        elif self.cut == "slice":
            qkv = self.qkv(h)
            q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        else:
            q, (k, v) = self.q(h), self.kv(h).split(d, dim=-1)
        att = torch.nn.functional.scaled_dot_product_attention(self.split(q), self.split(k), self.split(v), is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(x.shape))
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


@pytest.mark.parametrize("cut", ["chunk", "slice", "kv"])
def test_fused_projection_cut_any_way(cut):
    from d2compiler.graph.structure import trace_block

    structure = trace_block(FusedBlock(cut), (torch.randn(1, 6, 32),), {}, label=cut)
    if cut == "kv":
        assert structure.slices == {"kv": {"k": (0, 32), "v": (32, 64)}} and structure.roles["q"] == "q"
    else:
        assert structure.slices == {"qkv": {"q": (0, 32), "k": (32, 64), "v": (64, 96)}}
    assert structure.roles["o"] == "o" and structure.roles["down"] == "down"


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", list(EXPECTED))
def test_baselines_two_of_four_on_every_architecture(arch, method, tiny_models, tmp_path):
    from d2compiler.graph.packing import violations_2_4

    passes = f'[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "{method}"\nmask_structure = "2:4"\n'
    assert main(["--quiet", "run", recipe(tmp_path, tiny_models[arch], arch, passes, evaluate=False)]) == 0
    record = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert len(record["layers"]) == 2 * len({local.partition("[")[0] for local in EXPECTED[arch]})
    model = reload(tmp_path / "out")
    for name in record["layers"]:
        weight = model.get_submodule(name).weight
        matrix = weight.t() if type(model.get_submodule(name)).__name__ == "Conv1D" else weight
        assert violations_2_4(matrix) == 0 and float((matrix == 0).float().mean()) == pytest.approx(0.5, abs=1e-6)
