"""bf16 vs fp32 pruning on SmolLM2-135M (CPU): does the working dtype change the result?

SparseGPT 50% with the weights held in float32 and in bfloat16 (`model.dtype`; the Hessians, norms
and OBS solves are float32 either way), calibration on the first `--samples` x 512 tokens of C4,
perplexity (evaluated in the same dtype as the pruning) on the first `--windows` x 512 tokens of
WikiText-2 test. A subset of the fixed protocol (8 + 8 windows by default): bf16 matmuls are about
5.6x slower than fp32 on this CPU. Each run in its own process. Results: bench/results/dtypes.{json,md}.

    python bench/dtypes.py [--smoke] [--samples 8] [--windows 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import protocol  # noqa: E402

DTYPES = ("float32", "bfloat16")


def job(dtype: str, samples: int, windows: int) -> dict[str, Any]:
    from d2compiler.driver.pipeline import compress
    from d2compiler.recipe.schema import validate_recipe

    length = protocol.seq_len()
    recipe = validate_recipe({
        "version": 1, "model": {"source": protocol.lm_source(), "dtype": dtype, "device": "cpu"},
        "data": {"calibration": {"source": protocol.calibration_source(), "samples": samples, "seq_len": length},
                 "evaluation": {"source": protocol.evaluation_source("test"), "seq_len": length, "max_windows": windows}},
        "passes": [{"type": "calibrate"}, {"type": "sparsegpt", "sparsity": 0.5}],
    })
    start = time.perf_counter()
    summary = compress(recipe, quiet=True)
    return {"dtype": dtype, "dense_ppl": summary.dense_ppl, "pruned_ppl": summary.pruned_ppl, "prune_s": summary.prune_s,
            "wall_s": time.perf_counter() - start, "peak_rss_mb": summary.peak_rss_mb}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=None, help="calibration windows (8; smoke: 2)")
    parser.add_argument("--windows", type=int, default=None, help="evaluation windows (8; smoke: 2)")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    protocol.add_smoke_flag(parser)
    args = parser.parse_args()
    protocol.start(args.smoke)
    samples, windows = args.samples or protocol.pick(8, 2), args.windows or protocol.pick(8, 2)
    if args.job:
        print("RESULT " + json.dumps(job(args.job, samples, windows)), flush=True)
        return 0
    runs = []
    for dtype in DTYPES:
        runs.append(protocol.run_job([sys.executable, __file__, "--job", dtype, "--samples", str(samples), "--windows", str(windows)])[0])
        print(json.dumps(runs[-1]), flush=True)
    length = protocol.seq_len()
    record = {"model": protocol.pick("SmolLM2-135M-Instruct", "tiny random Llama (smoke)"),
              "calibration": f"{protocol.pick('c4', 'python-docs')} first {samples} x {length}",
              "evaluation": f"{protocol.pick('WikiText-2 test', 'python-docs')} first {windows} x {length}",
              "runs": runs, "provenance": protocol.provenance()}
    protocol.write_json(protocol.results_dir() / "dtypes.json", record)
    fp32, bf16 = runs
    lines = [f"# bf16 vs fp32 pruning ({record['model']}, SparseGPT 50%, CPU)", "", protocol.provenance_line(record["provenance"]), "",
             f"Calibration {record['calibration']}; perplexity on {record['evaluation']}, evaluated in the pruning dtype. "
             "Statistics and OBS solves are float32 in both runs.", "",
             "| dtype | dense ppl | pruned ppl | pruning s | wall s | peak RSS MiB |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['dense_ppl']:.3f} | {r['pruned_ppl']:.3f} | {r['prune_s']:.1f} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} |"
              for r in runs]
    lines += ["", f"bf16 / fp32 pruned perplexity: {bf16['pruned_ppl'] / fp32['pruned_ppl']:.4f}; dense: "
              f"{bf16['dense_ppl'] / fp32['dense_ppl']:.4f}."]
    (protocol.results_dir() / "dtypes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
