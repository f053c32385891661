"""`dense_target`: the re-aimed weight is the least-squares map of the perturbed input to the dense
output; on a model the first block is left as it is, later blocks move, `strength = 0` changes
nothing (the dense stream's forward writes nothing), and it refuses to come after a pruning pass."""

from __future__ import annotations

import torch

from d2compiler.cli import main
from passes.dense_target import retarget_shift

from .conftest import write_recipe
from .test_admm import run_llama


def test_the_retargeted_weight_maps_the_perturbed_input_to_the_dense_output():
    gen = torch.Generator().manual_seed(0)
    tokens, width = 2048, 32
    x_dense = torch.randn(tokens, width, generator=gen, dtype=torch.float64) @ (torch.eye(width, dtype=torch.float64)
                                                                                + 0.3 * torch.randn(width, width, generator=gen, dtype=torch.float64))
    distortion = torch.eye(width, dtype=torch.float64) + 0.3 * torch.randn(width, width, generator=gen, dtype=torch.float64)
    x = x_dense @ distortion + 0.05 * torch.randn(tokens, width, generator=gen, dtype=torch.float64)  # the pruned model's input
    w = torch.randn(16, width, generator=gen, dtype=torch.float64)
    hessian, cross = x.t() @ x / tokens, (x_dense - x).t() @ x / tokens
    shift = retarget_shift(w, hessian, cross, 1e-9, "t")
    exact = torch.linalg.lstsq(x, x_dense @ w.t()).solution.t()  # argmin ‖X W′ᵀ − X_d Wᵀ‖
    assert torch.allclose(w + shift, exact, atol=1e-4)
    assert ((x @ (w + shift).t() - x_dense @ w.t()).norm() < 0.5 * (x @ w.t() - x_dense @ w.t()).norm())
    assert torch.equal(retarget_shift(w, hessian, torch.zeros_like(cross), 0.01, "t"), torch.zeros_like(w))  # no perturbation: no change


def test_dense_target_moves_later_blocks_and_strength_zero_changes_nothing(tiny_models, tmp_path):
    passes = ('[[passes]]\ntype = "calibrate"\n{}[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n')
    target = '[[passes]]\ntype = "dense_target"\nstrength = {}\n'
    for name in ("plain", "zero", "full"):
        (tmp_path / name).mkdir()
    _, plain = run_llama(tiny_models, tmp_path / "plain", passes.format(""))
    _, zero = run_llama(tiny_models, tmp_path / "zero", passes.format(target.format(0.0)))
    assert all(torch.equal(zero[name], tensor) for name, tensor in plain.items())
    record, full = run_llama(tiny_models, tmp_path / "full", passes.format(target.format(1.0)))
    for name, metrics in record["layers"].items():
        assert metrics["passes"] == ["dense_target", "sparsegpt"], name
        moved = metrics["weight_shift"] > 0 and metrics["input_drift"] > 0
        assert moved == (".layers.1." in name), (name, metrics)  # block 0 sees the dense model's own input
        assert int((full[f"{name}.weight"] == 0).sum()) == round(0.5 * metrics["shape"][0] * metrics["shape"][1]), name


def test_dense_target_after_a_pruning_pass_is_refused(tiny_models, tmp_path, capsys):
    passes = ('[[passes]]\ntype = "calibrate"\n[[passes]]\ntype = "sparsegpt"\nsparsity = 0.5\n'
              '[[passes]]\ntype = "dense_target"\n')
    assert main(["--quiet", "run", str(write_recipe(tmp_path / "r.toml", str(tiny_models["llama"]), passes,
                                                    output=tmp_path / "out"))]) == 2
    err = capsys.readouterr().err
    assert "dense_target: must come before 'sparsegpt'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
