"""CUDA checks (marked `cuda`; skipped where no GPU is present, run by `bench/gpu_check.py`, which
fails loudly instead of skipping). Each compares a CUDA run with the CPU run on identical weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from d2compiler.cli import main

from .conftest import write_recipe

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

EVAL = '[data.evaluation]\nsource = "builtin:python-docs"\nseq_len = 64\nmax_windows = 4\n'
PASSES = {
    "magnitude": '[[passes]]\ntype = "magnitude"\nsparsity = 0.5\n',
    "wanda": '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "wanda"\nsparsity = 0.5\n',
    "sparsegpt": '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.6\n',
    "d2prune-kl": '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "attention_kl_update"\n[[passes]]\n'
                  'type = "dual_taylor_mask"\nsparsity = 0.6\n',
    "2:4 + gptq + pack": '[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nmask_structure = "2:4"\n'
                         '[[passes]]\ntype = "gptq"\nbits = 8\n[[passes]]\ntype = "pack_2_4"\n',
}


def _run(tmp: Path, model: Path, passes: str, device: str, streaming: bool = False) -> dict:
    output = tmp / f"{device}-{streaming}"
    recipe = write_recipe(tmp / f"{device}.toml", str(model), passes, samples=4, seq_len=64, output=output, extra="")
    text = recipe.read_text().replace('device = "cpu"', f'device = "{device}"\nstreaming = {str(streaming).lower()}')
    recipe.write_text(text + EVAL)
    assert main(["--quiet", "run", str(recipe)]) == 0
    return json.loads((output / "sparsity.json").read_text())


@pytest.mark.parametrize("name", list(PASSES))
def test_every_pass_on_cuda_matches_cpu(name, tmp_path, tiny_models):
    cpu, cuda = (_run(tmp_path, tiny_models["llama"], PASSES[name], d) for d in ("cpu", "cuda"))
    assert cuda["results"]["device"].startswith("cuda")
    assert cuda["overall_sparsity"] == pytest.approx(cpu["overall_sparsity"], abs=0.02)
    assert cuda["results"]["pruned_ppl"] == pytest.approx(cpu["results"]["pruned_ppl"], rel=0.01)


def test_streaming_on_cuda_matches_cpu(tmp_path, tiny_models):
    cpu = _run(tmp_path, tiny_models["llama"], PASSES["sparsegpt"], "cpu", streaming=True)
    cuda = _run(tmp_path, tiny_models["llama"], PASSES["sparsegpt"], "cuda", streaming=True)
    assert cuda["results"]["dense_ppl"] == pytest.approx(cpu["results"]["dense_ppl"], rel=1e-3)
    assert cuda["results"]["pruned_ppl"] == pytest.approx(cpu["results"]["pruned_ppl"], rel=0.01)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_2_4_matmul_matches_dense(dtype):
    from d2compiler.graph.packing import Packed24Linear

    torch.manual_seed(0)
    weight = torch.randn(256, 512)
    groups = weight.reshape(256, 128, 4)
    groups.scatter_(-1, groups.abs().argsort(-1)[..., :2], 0.0)
    packed = Packed24Linear.from_weight(weight, torch.randn(256), False).to("cuda", dtype)
    x = torch.randn(64, 512, device="cuda", dtype=dtype)
    assert packed._sparse_weight() is not None, "the CUDA semi-structured path was not taken"
    expected = torch.nn.functional.linear(x.float(), weight.cuda(), packed.bias.float())
    assert torch.allclose(packed(x).float(), expected, rtol=2e-2, atol=2e-1)


def test_block_by_block_evaluation_on_cuda(tiny_models):
    """Evaluation on CUDA places one block at a time and leaves every weight back on the CPU; its
    logits match the CPU's."""
    from d2compiler.execution.runner import ModelRunner
    from d2compiler.loading.models import load_model

    model = load_model(str(tiny_models["llama"]), "float32", "cpu").model
    calls = [{"input_ids": torch.randint(0, 500, (1, 40))} for _ in range(3)]
    logits = {}
    for device in ("cpu", "cuda"):
        got = []
        ModelRunner(model, torch.device(device)).run(calls, lambda i, out, got=got: got.append(out.logits.cpu()), quiet=True)
        logits[device] = got
        assert all(t.device.type == "cpu" for t in (*model.parameters(), *model.buffers()))
    for a, b in zip(logits["cpu"], logits["cuda"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
