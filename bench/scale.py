"""Scale benchmark: memory bounded by a block, not by the model (issue: real scale on one machine).

Writes once (under the d2compiler cache, `$D2C_CACHE/bench`, never in git) synthetic Llamas with
random weights in bf16 safetensors shards: hidden 2048, intermediate 5632, 16 heads, 4 KV heads
(GQA), vocabulary 32000, with 24 and 12 layers (about 1.2B and 0.6B parameters). Each is pruned with
SparseGPT 50% in a streaming run (`model.streaming = true`: parameters on the meta device, one block
read from the memory-mapped shards at a time, the output written shard by shard) on a few short
calibration windows, each run in its own process. The same is done for the real SmolLM2-135M.

Recorded per model: size on disk, its float32 size, one block's float32 size, peak RSS of the run's
process, wall time per phase, and the ratio peak RSS / fp32 model size. The target (issue) is a
ratio below 0.35 for the 24-layer model, and a peak that follows the block size, not the layer count
(12 vs 24 layers). Results: bench/results/scale.{json,md}.

    python bench/scale.py [--smoke] [--models llama-24,llama-12,smollm2] [--samples 8] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import protocol  # noqa: E402

SHAPES = {"llama-24": dict(layers=24, hidden=2048, intermediate=5632, heads=16, kv_heads=4, vocab=32000),
          "llama-12": dict(layers=12, hidden=2048, intermediate=5632, heads=16, kv_heads=4, vocab=32000)}
SMOKE_SHAPES = {"llama-24": dict(layers=8, hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=512),
                "llama-12": dict(layers=4, hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=512)}


def synthetic_folder(name: str) -> Path:
    """The synthetic model `name`, written once (bf16 shards of at most 1 GB) and reused."""
    import torch
    import transformers

    from d2compiler.evaluation.synthetic import save_random_model, tiny_tokenizer
    from d2compiler.loading.models import cache_dir

    shape = protocol.pick(SHAPES, SMOKE_SHAPES)[name]
    root = protocol.work_dir("scale") if protocol.smoke() else cache_dir() / "bench"
    folder = root / f"synthetic-{name}-h{shape['hidden']}"
    if (folder / "config.json").is_file():
        return folder
    config = transformers.LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                                      num_key_value_heads=shape["kv_heads"], max_position_embeddings=4096, tie_word_embeddings=False)
    tokenizer = tiny_tokenizer()
    tmp = folder.with_name(folder.name + ".tmp")
    save_random_model(config, tmp, tokenizer, dtype=torch.bfloat16, max_shard_size="1GB")
    tmp.rename(folder)
    return folder


def sizes(folder: Path) -> dict[str, float]:
    """Disk size, fp32 model size and one block's fp32 size, from the safetensors headers."""
    from d2compiler.execution.streaming import WeightSource

    source = WeightSource(folder)
    numel = {key: 1 for key in source.keys()}
    for key in numel:
        for dim in source.shape(key):
            numel[key] *= dim
    block = sum(n for k, n in numel.items() if ".layers.0." in k)
    disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"disk_mb": disk / 2**20, "fp32_mb": 4 * sum(numel.values()) / 2**20, "block_fp32_mb": 4 * block / 2**20,
            "parameters": sum(numel.values())}


def job_recipe(source: str, out: str, samples: int, seq_len: int) -> Any:
    from d2compiler.recipe.schema import validate_recipe

    return validate_recipe({
        "version": 1, "model": {"source": source, "dtype": "float32", "device": "cpu", "streaming": True},
        "data": {"calibration": {"source": protocol.calibration_source(), "samples": samples, "seq_len": seq_len}},
        "passes": [{"type": "calibrate"}, {"type": "sparsegpt", "sparsity": 0.5}],
        "output": {"path": out, "resume": False},
    })


def plan_job(recipe: Any, nprocs: tuple[int, ...] = ()) -> None:
    """`d2c plan`'s estimate of the run of `recipe`, in its own process (with the time projected for
    each of `nprocs` processes); prints `RESULT {...}`."""
    from d2compiler.driver.plan import make_plan, plan_summary

    plan = make_plan(recipe)
    projections = {n: plan.project(n, 100.0) for n in nprocs}
    print("RESULT " + json.dumps({**plan_summary(plan), "projections": projections, "experts": plan.experts}), flush=True)


def add_job_flags(parser: argparse.ArgumentParser, count: int) -> None:
    """The hidden flags by which a benchmark's child process runs one plan or one run (`--plan-job` /
    `--job` with `count` arguments)."""
    parser.add_argument("--job", nargs=count, help=argparse.SUPPRESS)
    parser.add_argument("--plan-job", nargs=count, help=argparse.SUPPRESS)


def child_job(args: argparse.Namespace, build: Callable[..., Any], nprocs: tuple[int, ...] = ()) -> bool:
    """In a child started with `--plan-job` / `--job` ARGS: run the plan (with the projections for
    `nprocs` processes) or the run of the recipe `build(*ARGS)`, and return True; False in the parent."""
    if not (args.job or args.plan_job):
        return False
    recipe = build(*(args.job or args.plan_job))
    job(recipe) if args.job else plan_job(recipe, nprocs)
    return True


def job(recipe: Any) -> None:
    """One streaming run of `recipe` in this process; prints `RESULT {...}`."""
    start = time.perf_counter()
    from d2compiler.driver.pipeline import compress
    from d2compiler.execution.memory import peak_rss_mb

    summary = compress(recipe, quiet=True, overwrite=True)  # the output folder is the benchmark's own
    phases = protocol.phase_seconds(summary.record)
    print("RESULT " + json.dumps({"peak_rss_mb": peak_rss_mb(), "wall_s": time.perf_counter() - start, "prune_s": summary.prune_s,
                                  "phases_s": phases, "sparsity": summary.sparsity,
                                  "block_peak_rss_mb": [b["memory"].get("peak_rss_mb") for b in summary.record["blocks"]],
                                  "blocks": [{"times_s": b["times_s"], "memory": b["memory"]} for b in summary.record["blocks"]]}),
          flush=True)


def run(name: str, samples: int, seq_len: int, out: Path) -> dict[str, Any]:
    if name == "smollm2":
        from d2compiler.loading.models import builtin_smollm2_folder

        folder = Path(protocol.lm_source()) if protocol.smoke() else builtin_smollm2_folder()
    else:
        folder = synthetic_folder(name)
    args = [str(folder), str(out / name), str(samples), str(seq_len)]
    plan, _ = protocol.run_job([sys.executable, __file__, "--plan-job", *args])
    result = protocol.run_job([sys.executable, __file__, "--job", *args])[0] | sizes(folder)
    result["rss_over_fp32"] = result["peak_rss_mb"] / result["fp32_mb"]
    result["plan_peak_mb"] = plan["estimate_mb"]["peak (sum)"]
    result["plan_disk_mb"] = plan["estimate_disk_mb"]
    return {"model": name, **result}


def markdown(record: dict[str, Any]) -> str:
    rows = record["runs"]
    lines = ["# Scale: streaming SparseGPT 50%, peak memory vs model size", "", protocol.provenance_line(record["provenance"]), "",
             f"Calibration: {record['calibration']}. Each run in its own process on this CPU; fp32 working dtype; the "
             "synthetic models are random bf16 Llamas (hidden 2048, intermediate 5632, GQA 16/4 heads, vocabulary 32000).", "",
             "| model | parameters | disk (MiB) | fp32 size (MiB) | one block fp32 (MiB) | peak RSS (MiB) | `d2c plan` estimate (MiB) | "
             "peak RSS / fp32 size | wall (s) | observe / sparsegpt / propagate (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["phases_s"]
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.0f}M | {r['disk_mb']:.0f} | {r['fp32_mb']:.0f} | {r['block_fp32_mb']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['plan_peak_mb']:.0f} | {r['rss_over_fp32']:.3f} | {r['wall_s']:.1f} | "
                     f"{p.get('observe', 0):.1f} / {p.get('sparsegpt', 0):.1f} / {p.get('propagate', 0):.1f} |")
    by = {r["model"]: r for r in rows}
    if "llama-24" in by and "llama-12" in by:
        a, b = by["llama-12"], by["llama-24"]
        lines += ["", f"Doubling the layers (12 -> 24) multiplies the fp32 size by {b['fp32_mb'] / a['fp32_mb']:.2f} and the "
                  f"peak RSS by {b['peak_rss_mb'] / a['peak_rss_mb']:.3f}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llama-24,llama-12,smollm2")
    parser.add_argument("--samples", type=int, default=None, help="calibration windows (8; smoke: 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per window (128; smoke: 32)")
    add_job_flags(parser, 4)
    protocol.add_smoke_flag(parser)
    args = parser.parse_args()
    protocol.start(args.smoke)
    if child_job(args, lambda source, out, samples, seq_len: job_recipe(source, out, int(samples), int(seq_len))):
        return 0
    samples, seq_len = args.samples or protocol.pick(8, 2), args.seq_len or protocol.pick(128, 32)
    out = protocol.work_dir("scale-runs")
    runs = []
    for name in args.models.split(","):
        runs.append(run(name, samples, seq_len, out))
        print(json.dumps(runs[-1]), flush=True)
    record = {"calibration": f"{protocol.pick('c4', 'python-docs')} first {samples} x {seq_len} tokens", "runs": runs,
              "provenance": protocol.provenance()}
    protocol.publish("scale", record, markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
