"""`admm`, the ALPS-class baseline: exact supports (unstructured counts, N:M), a lower layer
reconstruction error than SparseGPT + refit on the same Hessian, the no-update variant, and a run
composed with `sparsity_allocation` that keeps the global count exact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from d2compiler.cli import main
from passes.admm_solver import admm_prune
from passes.obs import damped_hessian, obs_prune

from .conftest import write_recipe
from .test_obs import synthetic


def layer_error(new: torch.Tensor, dense: torch.Tensor, h: torch.Tensor) -> float:
    damped, _ = damped_hessian(h, 0.01)
    delta = (new - dense).double()
    return float(((delta @ damped.double()) * delta).sum())


@pytest.mark.parametrize(("sparsity", "n_of_m"), [(0.5, None), (0.7, None), (0.8, None), (0.5, (2, 4))])
def test_admm_support_is_exact_and_beats_sparsegpt_with_refit(sparsity, n_of_m):
    w, h = synthetic(rows=64, cols=128)
    ours = admm_prune(w, h, sparsity=sparsity, n_of_m=n_of_m, damping=0.01, layer="t")
    if n_of_m is None:
        assert int((ours.weight == 0).sum()) == round(sparsity * w.numel())
    else:
        assert torch.all((~ours.keep).reshape(64, -1, 4).sum(-1) == 2)
    assert torch.all(ours.weight[~ours.keep] == 0) and ours.iterations >= 3
    baseline = obs_prune(w, h, sparsity=sparsity, n_of_m=n_of_m, block_size=128, damping=0.01, layer="t", refit_steps=30)
    assert layer_error(ours.weight, w, h) < 0.95 * layer_error(baseline.weight, w, h)


def test_without_the_update_the_support_keeps_the_original_weights():
    w, h = synthetic(rows=32, cols=64)
    updated = admm_prune(w, h, sparsity=0.6, n_of_m=None, damping=0.01, layer="t")
    plain = admm_prune(w, h, sparsity=0.6, n_of_m=None, damping=0.01, layer="t", update=False)
    assert torch.equal(plain.keep, updated.keep)
    assert torch.equal(plain.weight, w.masked_fill(~plain.keep, 0.0))
    assert layer_error(updated.weight, w, h) < layer_error(plain.weight, w, h)


def run_llama(tiny_models, tmp_path, passes: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """`d2c run` of `passes` on the tiny Llama: (sparsity.json, the output's weights)."""
    out = tmp_path / "out"
    assert main(["--quiet", "run", str(write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), passes, output=out))]) == 0
    return json.loads((out / "sparsity.json").read_text()), load_file(out / "model.safetensors")


def test_admm_with_allocation_keeps_the_global_count_and_loads(tiny_models, tmp_path):
    passes = ('[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsity_allocation"\nprofile = "error"\n'
              '[[passes]]\ntype = "admm"\nsparsity = 0.7\n')
    record, weights = run_llama(tiny_models, tmp_path, passes)
    sizes = {name: m["shape"][0] * m["shape"][1] for name, m in record["layers"].items()}
    assert sum(int((weights[f"{name}.weight"] == 0).sum()) for name in sizes) == round(0.7 * sum(sizes.values()))
    for name, metrics in record["layers"].items():
        assert metrics["admm_iterations"] >= 3 and metrics["passes"][-1] == "admm", name
        assert int((weights[f"{name}.weight"] == 0).sum()) == round(metrics["allocated_sparsity"] * sizes[name]), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(model(torch.randint(0, 100, (1, 16))).logits).all()


def test_admm_honours_an_update_plan(tiny_models, tmp_path):
    passes = ('[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "attention_kl_update"\n'
              '[[passes]]\ntype = "admm"\nmask_structure = "2:4"\n')
    record, weights = run_llama(tiny_models, tmp_path, passes)
    assert set(record["attention_choices"]) == {"0", "1"}  # a plan was made per block and applied by admm
    for name, metrics in record["layers"].items():
        assert metrics["passes"][-1] == "admm"
        assert torch.all((weights[f"{name}.weight"] == 0).reshape(metrics["shape"][0], -1, 4).sum(-1) >= 2), name


def test_d2prune_with_the_admm_solver(tiny_models, tmp_path):
    """`dual_taylor_mask` with `solver = "admm"` (D²-ADMM): with λ1 = 0 its projections rank z², the
    same order as the `admm` pass's |z|, so both give the same weights; with λ1 > 0 the dual-Taylor
    activation term changes which weights are kept, and every layer keeps its exact count."""
    admm = ('[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "admm"\nsparsity = 0.6\nmax_iterations = 60\n')
    d2 = ('[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "dual_taylor_mask"\nsparsity = 0.6\nsolver = "admm"\n'
          'max_iterations = 60\nrefit_steps = 30\nlambda1 = {}\n')
    for name in ("admm", "zero", "d2"):
        (tmp_path / name).mkdir()
    _, plain = run_llama(tiny_models, tmp_path / "admm", admm)
    record, same = run_llama(tiny_models, tmp_path / "zero", d2.format(0.0))
    assert all(torch.equal(same[name], tensor) for name, tensor in plain.items())
    assert {m["score"] for m in record["layers"].values()} == {"d2-admm"}
    record, moved = run_llama(tiny_models, tmp_path / "d2", d2.format(1000.0))
    assert any(not torch.equal(moved[name] == 0, plain[name] == 0) for name in plain if name.endswith("proj.weight"))
    for name, metrics in record["layers"].items():
        assert int((moved[f"{name}.weight"] == 0).sum()) == round(0.6 * metrics["shape"][0] * metrics["shape"][1]), name
