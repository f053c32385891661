"""Distributed pruning on this machine, and a projection for a Llama-70B-shaped model.

Measured: SparseGPT 50% on SmolLM2-135M (fp32, CPU), calibration on the first 32 x 512 C4 tokens,
perplexity on the first 32 x 512 WikiText-2 test windows, run by `d2c run --nproc N` with N = 1
(2 threads) and N = 2 (1 thread each: the machine's 2 cores shared). Reported: wall time, the
pruning time per phase (process 0's), the bytes all-reduced and broadcast per block, perplexity,
and how the two outputs compare (identical masks; largest weight difference).

Projected (not measured): `d2compiler.driver.plan.project` on a Llama-70B-shaped model (80 blocks, hidden
8192, intermediate 28672, 64 heads, 8 KV heads) pruned by SparseGPT on 128 x 2048 calibration tokens,
with 1, 8 and 16 GPUs at the device rates and link bandwidths stated in the table.

    python bench/distributed.py [--smoke]

Results: bench/results/distributed.{json,md}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import protocol  # noqa: E402

CORES = 2
LLAMA_70B = {"blocks": 80, "hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8, "head_dim": 128}
GPU_RATES = {"gflops": 50_000.0, "forward_gflops": 600_000.0, "column_us": 30.0}  # fp32 / bf16 tensor-core matmuls; OBS loop per column
GPU_CASES = [(1, 300.0), (8, 300.0), (16, 50.0)]  # (GPUs, GB/s between them: NVLink in a node; 16 = two nodes)


def run(nproc: int, samples: int, windows: int, work: Path) -> dict[str, Any]:
    """One `d2c run --nproc N` of the protocol job; its record and timings."""
    length = protocol.seq_len()
    recipe = work / f"recipe-{nproc}.json"
    output = work / f"out-{nproc}"
    recipe.write_text(json.dumps({
        "version": 1, "model": {"source": protocol.lm_source(), "dtype": "float32", "device": "cpu"},
        "data": {"calibration": {"source": protocol.calibration_source(), "samples": samples, "seq_len": length},
                 "evaluation": {"source": protocol.evaluation_source("test"), "seq_len": length, "max_windows": windows}},
        "passes": [{"type": "calibrate"}, {"type": "sparsegpt", "sparsity": 0.5}],
        "output": {"path": str(output), "resume": False},
    }))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, CORES // nproc))}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "d2compiler", "--quiet", "run", str(recipe), "--nproc", str(nproc), "--overwrite"],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"d2c run --nproc {nproc} failed:\n{done.stderr[-3000:]}")
    record = json.loads((output / "sparsity.json").read_text())
    results = record["results"]
    blocks = len(record["blocks"])
    return {"processes": nproc, "threads_each": max(1, CORES // nproc), "wall_s": wall, "prune_s": results["prune_s"],
            "phases_s": protocol.phase_seconds(record), "dense_ppl": results["dense_ppl"], "pruned_ppl": results["pruned_ppl"],
            "blocks": blocks, "bytes_all_reduced_per_block": results.get("bytes_all_reduced", 0) / blocks,
            "bytes_broadcast_per_block": results.get("bytes_broadcast", 0) / blocks, "output": str(output)}


def compare(a: str, b: str) -> dict[str, Any]:
    """Whether two outputs' decoder masks are identical, and their largest weight difference."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    masks = all(torch.equal(x[k] == 0, y[k] == 0) for k in x if ".layers." in k and k.endswith("proj.weight"))
    return {"masks_identical": masks, "max_abs_weight_diff": max(float((x[k] - y[k]).abs().max()) for k in x)}


def projection() -> list[dict[str, Any]]:
    """Projected SparseGPT time for a Llama-70B-shaped model on 1, 8 and 16 GPUs (see the module docstring)."""
    from d2compiler.driver.plan import block_cost, project

    c = LLAMA_70B
    hidden, inter, kv = c["hidden"], c["intermediate"], c["kv_heads"] * c["head_dim"]
    shapes = [("q", hidden, hidden), ("k", kv, hidden), ("v", kv, hidden), ("o", hidden, hidden),
              ("gate", inter, hidden), ("up", inter, hidden), ("down", hidden, inter)]
    groups = [hidden, hidden, hidden, inter]  # q/k/v share an input, gate/up too
    cost = block_cost(shapes, groups, tokens=128 * 2048, seq=2048, hidden=hidden, heads=c["heads"], rates=GPU_RATES,
                      obs=True, kl_samples=None)
    rows = []
    for gpus, link in GPU_CASES:
        rows.append({"gpus": gpus, "link_gbs": link, **project([cost] * c["blocks"], gpus, link)})
    return rows


def markdown(r: dict[str, Any]) -> str:
    one, two = r["runs"]
    phases = sorted(set(one["phases_s"]) | set(two["phases_s"]), key=lambda k: (k == "total", k))
    lines = [f"# Distributed pruning: {r['model']}, SparseGPT 50%, CPU", "", protocol.provenance_line(r["provenance"]), "",
             f"`d2c run --nproc N` on this machine's {CORES} cores (gloo): calibration {r['calibration']}, perplexity on "
             f"{r['evaluation']}. One run each, side by side.", "",
             "| quantity | N = 1 (2 threads) | N = 2 (1 thread each) |", "|---|---|---|",
             f"| job wall time, s | {one['wall_s']:.1f} | {two['wall_s']:.1f} |",
             f"| pruning time, s | {one['prune_s']:.1f} | {two['prune_s']:.1f} |"]
    lines += [f"| {k}, s (process 0, sum over blocks) | {one['phases_s'].get(k, 0):.2f} | {two['phases_s'].get(k, 0):.2f} |" for k in phases]
    lines += [f"| bytes all-reduced per block | {one['bytes_all_reduced_per_block']:,.0f} | {two['bytes_all_reduced_per_block']:,.0f} |",
              f"| bytes broadcast per block | {one['bytes_broadcast_per_block']:,.0f} | {two['bytes_broadcast_per_block']:,.0f} |",
              f"| dense perplexity | {one['dense_ppl']:.3f} | {two['dense_ppl']:.3f} |",
              f"| pruned perplexity | {one['pruned_ppl']:.3f} | {two['pruned_ppl']:.3f} |", "",
              f"Masks identical: {r['comparison']['masks_identical']}; largest weight difference "
              f"{r['comparison']['max_abs_weight_diff']:.2e}; pruned perplexity ratio N=2/N=1 "
              f"{two['pruned_ppl'] / one['pruned_ppl']:.5f}.", "",
              "## Projection: a Llama-70B-shaped model (not a measurement)", "",
              "`d2compiler.driver.plan.project` with 80 blocks of hidden 8192 / intermediate 28672 (GQA, 8 KV heads), SparseGPT on "
              f"128 x 2048 calibration tokens, assumed device rates {GPU_RATES['gflops'] / 1000:.0f} TFLOP/s fp32 (statistics, "
              f"solves), {GPU_RATES['forward_gflops'] / 1000:.0f} TFLOP/s for the bf16 forwards, {GPU_RATES['column_us']:.0f} µs "
              "per OBS column; the formula is in docs/distributed.md.", "",
              "| GPUs | link GB/s | forwards + statistics, s | layer solves, s | communication, s | total, s |", "|---|---|---|---|---|---|"]
    lines += [f"| {p['gpus']} | {p['link_gbs']:.0f} | {p['data-parallel forwards and statistics']:.0f} | "
              f"{p['layer solves (largest share per block)']:.0f} | {p['communication']:.0f} | {p['total']:.0f} |" for p in r["projection"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    protocol.parse(__doc__)
    samples, windows = protocol.pick(32, 4), protocol.pick(32, 3)
    work = protocol.work_dir("distributed")
    work.mkdir(parents=True, exist_ok=True)
    runs = [run(n, samples, windows, work) for n in (1, 2)]
    record = {"model": protocol.pick("SmolLM2-135M-Instruct", "tiny random Llama (smoke)"),
              "calibration": f"{protocol.pick('c4', 'python-docs')} first {samples} x {protocol.seq_len()}",
              "evaluation": f"{protocol.pick('WikiText-2 test', 'python-docs')} first {windows} x {protocol.seq_len()}",
              "runs": runs, "comparison": compare(runs[0]["output"], runs[1]["output"]), "projection": projection(),
              "provenance": protocol.provenance()}
    protocol.publish("distributed", record, markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
