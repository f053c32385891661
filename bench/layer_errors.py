"""Per-layer reconstruction errors of one SmolLM2-135M block: the ALPS-class `admm` pass against
SparseGPT with and without the masked least-squares refit, on the same Hessians (not run in CI).

The block's inputs are the dense model's on the protocol's calibration windows (C4, first 32 x 512
tokens); each of its linears gets its Hessian H = XᵀX/n from them, and each method prunes the
layer alone. The error is the relative output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) on the damped H that
every method solves with. Writes bench/results/layer_errors.{json,md}.

    python bench/layer_errors.py [--block 15] [--patterns 0.5,0.6,0.7,0.8,2:4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import (  # noqa: E402
    add_smoke_flag,
    calibration_source,
    lm_source,
    pick,
    provenance,
    provenance_line,
    publish,
    seq_len,
    start,
)

from d2compiler.evaluation.data import calibration_windows, leading_tokens  # noqa: E402
from d2compiler.graph.blocks import find_blocks  # noqa: E402
from d2compiler.loading.models import load_model  # noqa: E402
from passes.admm_solver import admm_prune  # noqa: E402
from passes.obs import damped_hessian, obs_prune  # noqa: E402

DAMPING = 0.01
METHODS = ("sparsegpt", "sparsegpt + refit", "admm")


@torch.no_grad()
def block_hessians(model: torch.nn.Module, block_index: int, windows: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(weight, H) of every linear of block `block_index`, H over the dense model's calibration tokens."""
    _, blocks = find_blocks(model)
    block = blocks[block_index]
    linears = {name: m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def hook(name: str):
        def record(_module: torch.nn.Module, args: tuple, _out: Any) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] += x.t() @ x
            counts[name] += x.shape[0]
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    stop = blocks[block_index + 1] if block_index + 1 < len(blocks) else None

    class Done(Exception):
        pass

    def halt(*_args: Any, **_kwargs: Any) -> None:
        raise Done

    halt_handle = stop.register_forward_pre_hook(halt) if stop is not None else None
    try:
        for ids in windows:
            try:
                model(ids, use_cache=False)
            except Done:
                pass
    finally:
        for h in handles:
            h.remove()
        if halt_handle is not None:
            halt_handle.remove()
    return {name: (m.weight.detach().float().clone(), (sums[name] / counts[name]).float()) for name, m in linears.items()}


def relative_error(new: torch.Tensor, dense: torch.Tensor, h: torch.Tensor) -> float:
    damped, _ = damped_hessian(h, DAMPING)
    delta, base = (new - dense).double(), dense.double()
    return float(((delta @ damped.double()) * delta).sum() / ((base @ damped.double()) * base).sum())


def prune(method: str, weight: torch.Tensor, h: torch.Tensor, pattern: str, name: str) -> tuple[torch.Tensor, float]:
    sparsity, n_of_m = (0.5, (2, 4)) if pattern == "2:4" else (float(pattern), None)
    begin = time.perf_counter()
    if method == "admm":
        out = admm_prune(weight, h, sparsity=sparsity, n_of_m=n_of_m, damping=DAMPING, layer=name).weight
    else:
        refit = 30 if method.endswith("refit") else 0
        out = obs_prune(weight, h, sparsity=sparsity, n_of_m=n_of_m, block_size=128, damping=DAMPING, layer=name,
                        refit_steps=refit).weight
    return out, time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--block", type=int, default=None, help="the block (default: the middle one)")
    parser.add_argument("--patterns", default="0.5,0.6,0.7,0.8,2:4")
    add_smoke_flag(parser)
    args = parser.parse_args()
    start(args.smoke)
    loaded = load_model(lm_source(), "float32", "cpu")
    samples, length = pick(32, 2), seq_len()
    ids = leading_tokens(loaded.tokenizer, calibration_source(), "calibration", samples * length, field="text")
    windows = calibration_windows(ids, samples, length)
    _, blocks = find_blocks(loaded.model)
    index = len(blocks) // 2 if args.block is None else args.block
    layers = block_hessians(loaded.model, index, windows)
    patterns = args.patterns.split(",")
    rows = []
    for name, (weight, h) in layers.items():
        for pattern in patterns:
            row: dict[str, Any] = {"layer": name, "pattern": pattern}
            for method in METHODS:
                pruned, seconds = prune(method, weight, h, pattern, name)
                row[method], row[f"{method} s"] = relative_error(pruned, weight, h), round(seconds, 3)
            rows.append(row)
            print(row, flush=True)
    record = {"model": lm_source(), "block": index, "calibration": f"{calibration_source()}: first {samples} x {length} tokens",
              "damping": DAMPING, "rows": rows}
    lines = [f"# Layer reconstruction errors: one block of {lm_source()}", "",
             f"Block {index}'s linears, each pruned alone on its Hessian from {record['calibration']} (dense inputs). "
             "Relative error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) on the damped H; `admm / +refit` is the ALPS-class pass's error "
             "over SparseGPT + refit's (below 1: admm is better). Times are one layer's solve on this CPU.", "",
             provenance_line(provenance()), "",
             "| layer | pattern | sparsegpt | sparsegpt + refit | admm | admm / +refit | s (sgpt / +refit / admm) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["admm"] / r["sparsegpt + refit"] if r["sparsegpt + refit"] else float("nan")
        lines.append(f"| {r['layer']} | {r['pattern']} | {r['sparsegpt']:.4f} | {r['sparsegpt + refit']:.4f} | {r['admm']:.4f} | "
                     f"{ratio:.3f} | {r['sparsegpt s']:.2f} / {r['sparsegpt + refit s']:.2f} / {r['admm s']:.2f} |")
    wins = sum(r["admm"] < r["sparsegpt + refit"] for r in rows)
    lines += ["", f"admm has the lower error in {wins} of {len(rows)} (layer, pattern) cases."]
    publish("layer_errors", record, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
