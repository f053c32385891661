"""Block discovery and role discovery from the traced dataflow."""

from __future__ import annotations

import pytest
import torch

from d2compiler.cli import main
from d2compiler.execution.block_io import capture_block_inputs
from d2compiler.graph.blocks import find_blocks
from d2compiler.graph.structure import bind_linears, trace_block
from d2compiler.loading.models import load_model

from .conftest import build_tiny

EXPECTED = {
    "llama": {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
              "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"},
    "opt": {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.out_proj": "o",
            "fc1": "up", "fc2": "down"},
}
EXPECTED["qwen3"] = EXPECTED["mistral"] = EXPECTED["llama"]


def structure_of(folder, attn=None):
    model = load_model(str(folder), "float32", "cpu", attn_implementation=attn).model
    path, blocks = find_blocks(model)
    sample = capture_block_inputs(model, blocks, [torch.randint(0, 100, (1, 12))], torch.device("cpu"))[0]
    return path, blocks, trace_block(blocks[0], sample.args, sample.kwargs, label="t")


@pytest.mark.parametrize("arch", ["llama", "opt", "qwen3", "mistral"])
def test_roles_from_dataflow(arch, tiny_models):
    path, blocks, structure = structure_of(tiny_models[arch])
    assert path in ("model.layers", "model.decoder.layers")
    assert structure.roles == EXPECTED[arch]
    assert len(structure.attention) == 1
    # q, k and v read the same normalised tensor, so they share one statistics accumulator.
    assert sorted(structure.group_of("self_attn.q_proj")) == sorted(
        n for n, r in EXPECTED[arch].items() if r in ("q", "k", "v"))


def test_roles_with_eager_attention(tmp_path, tokenizer):
    folder = build_tiny("opt", tokenizer, tmp_path / "opt-eager")
    _, _, structure = structure_of(folder, attn="eager")
    assert structure.attention[0].kind == "eager"
    assert structure.roles == EXPECTED["opt"]


class OddlyNamedBlock(torch.nn.Module):
    """A pre-norm block whose linears have meaningless names, with eager attention."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.alpha, self.beta, self.gamma = (torch.nn.Linear(d, d) for _ in range(3))
        self.delta = torch.nn.Linear(d, d)
        self.w1, self.w2 = torch.nn.Linear(d, 2 * d), torch.nn.Linear(d, 2 * d)
        self.w3 = torch.nn.Linear(2 * d, d)

    def split(self, x):
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x):
        h = self.norm1(x)
        a, b_, c = self.split(self.gamma(h)), self.split(self.alpha(h)), self.split(self.beta(h))
        probs = torch.softmax(a @ b_.transpose(-1, -2) / 8.0, dim=-1)
        att = (probs @ c).transpose(1, 2).reshape(x.shape)
        x = x + self.delta(att)
        h = self.norm2(x)
        return x + self.w3(self.w2(h) * torch.nn.functional.gelu(self.w1(h)))


def test_roles_do_not_depend_on_names():
    structure = trace_block(OddlyNamedBlock(), (torch.randn(1, 6, 32),), {}, label="odd")
    assert structure.roles == {"gamma": "q", "alpha": "k", "beta": "v", "delta": "o",
                               "w1": "gate", "w2": "up", "w3": "down"}


def test_bind_linears_full_names(tiny_models):
    path, blocks, structure = structure_of(tiny_models["opt"])
    layers = bind_linears(blocks[1], f"{path}.1", structure)
    assert layers[0].name == "model.decoder.layers.1.self_attn.k_proj"
    assert {layer.role for layer in layers} == {"q", "k", "v", "o", "up", "down"}
    assert all(layer.shape == tuple(layer.module.weight.shape) for layer in layers)


def test_inspect_cli(tiny_models, capsys):
    assert main(["inspect", str(tiny_models["llama"])]) == 0
    out = capsys.readouterr().out
    assert "blocks: model.layers x 2 (LlamaDecoderLayer)" in out
    assert "mlp.gate_proj" in out and " gate " in out


def test_inspect_missing_model(capsys, tmp_path):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
