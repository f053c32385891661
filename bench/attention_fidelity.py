"""Attention fidelity of pruned SmolLM2-135M against the dense model (not run in CI).

Each method prunes with the quality.py protocol (C4, first 32 x 512 tokens, 60% unstructured by
default); then dense and pruned models run on held-out text (the first `--windows` windows of 512
tokens of WikiText-2 test) and, for every block, we record:
- the attention KL(dense ‖ pruned), recomputed from the query/key tensors captured at SDPA;
- the RMSE of the attention op's output (before o_proj) against the dense model's.

Writes bench/results/attention_fidelity.{json,md,png}.

    python bench/attention_fidelity.py --methods sparsegpt,d2-sparsegpt,d2prune-kl --options '{"lambda1": 10}'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import (  # noqa: E402
    add_smoke_flag,
    calibration_source,
    evaluation_source,
    lm_source,
    pick,
    provenance,
    provenance_line,
    results_dir,
    seq_len,
    start,
    write_json,
)
from quality import method_passes  # noqa: E402

from d2compiler.driver.pipeline import compress  # noqa: E402
from d2compiler.evaluation.data import evaluation_windows, load_text, tokenize  # noqa: E402
from d2compiler.graph.blocks import find_blocks  # noqa: E402
from d2compiler.loading.models import load_model  # noqa: E402
from d2compiler.recipe.schema import validate_recipe  # noqa: E402
from passes.attention_capture import AttentionCall, AttentionRecorder, attention_kl  # noqa: E402


@torch.no_grad()
def attention_calls(model: torch.nn.Module, windows: list[torch.Tensor]) -> list[list[AttentionCall]]:
    """Per block, the attention calls of every window (query, key and output recorded)."""
    _, blocks = find_blocks(model)
    recorders = [AttentionRecorder("sdpa", keep_output=True) for _ in blocks]
    for rec, block in zip(recorders, blocks):
        rec.attach(block)
    try:
        for ids in windows:
            model(ids, use_cache=False)
    finally:
        for rec in recorders:
            rec.detach()
    return [rec.calls for rec in recorders]


def fidelity(dense: list[list[AttentionCall]], pruned: list[list[AttentionCall]]) -> dict[str, list[float]]:
    kl, rmse = [], []
    for d_calls, p_calls in zip(dense, pruned):
        kl.append(float(sum(attention_kl(d, p) for d, p in zip(d_calls, p_calls))) / len(d_calls))
        sq = sum(float((d.output - p.output).pow(2).mean()) for d, p in zip(d_calls, p_calls)) / len(d_calls)
        rmse.append(sq**0.5)
    return {"kl": kl, "rmse": rmse}


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, res in results.items():
        axes[0].plot(res["kl"], marker="o", ms=3, label=method)
        axes[1].plot(res["rmse"], marker="o", ms=3, label=method)
    axes[0].set(title="attention KL(dense || pruned) per block", xlabel="block", ylabel="nats / query")
    axes[1].set(title="attention-output RMSE vs dense per block", xlabel="block", ylabel="RMSE")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="sparsegpt,d2prune-kl")
    parser.add_argument("--pattern", default="0.6")
    parser.add_argument("--samples", type=int, default=None, help="calibration windows (32; smoke: 4)")
    parser.add_argument("--windows", type=int, default=None, help="held-out windows (4; smoke: 2)")
    parser.add_argument("--options", default="{}", help="JSON options of the D² methods (as in quality.py)")
    add_smoke_flag(parser)
    args = parser.parse_args()
    start(args.smoke)
    samples, windows_n, length, model = args.samples or pick(32, 4), args.windows or pick(4, 2), seq_len(), lm_source()
    options = json.loads(args.options)

    dense_model = load_model(model, "float32", "cpu")
    ids = tokenize(dense_model.tokenizer, load_text(evaluation_source("test"), "evaluation"))
    windows = evaluation_windows(ids, length, windows_n)
    dense_calls = attention_calls(dense_model.model, windows)
    del dense_model

    results: dict[str, dict[str, Any]] = {}
    for method in args.methods.split(","):
        loaded = load_model(model, "float32", "cpu")
        recipe = validate_recipe({
            "version": 1,
            "data": {"calibration": {"source": calibration_source(), "samples": samples, "seq_len": length}},
            "passes": method_passes(method, args.pattern, options if method.startswith("d2") else {}),
        })
        summary = compress(recipe, loaded=loaded, quiet=True)
        res = fidelity(dense_calls, attention_calls(loaded.model, windows))
        res["mean_kl"] = sum(res["kl"]) / len(res["kl"])
        res["mean_rmse"] = sum(res["rmse"]) / len(res["rmse"])
        res["attention_choices"] = summary.record.get("attention_choices")
        results[method] = res
        print(f"{method:>14}: mean KL {res['mean_kl']:.5f}  mean attention RMSE {res['mean_rmse']:.5f}", flush=True)

    out = results_dir()
    protocol = {"model": pick("SmolLM2-135M-Instruct", model), "pattern": args.pattern,
                "calibration": f"{pick('c4', 'python-docs')} first {samples} x {length}",
                "held_out": f"{pick('wikitext-2 test', 'python-docs evaluation part')} first {windows_n} x {length}", "options": options}
    write_json(out / "attention_fidelity.json", {"protocol": protocol, "results": results})
    plot(results, out / "attention_fidelity.png")
    base = results.get("sparsegpt")
    lines = ["# Attention fidelity vs dense (SmolLM2-135M)", "", provenance_line(provenance()), "",
             f"Protocol: {json.dumps(protocol)}", "",
             "| method | mean KL | mean attention RMSE | RMSE vs sparsegpt |", "|---|---|---|---|"]
    for method, res in results.items():
        rel = f"{100 * (res['mean_rmse'] / base['mean_rmse'] - 1):+.1f}%" if base else "-"
        lines.append(f"| {method} | {res['mean_kl']:.5f} | {res['mean_rmse']:.5f} | {rel} |")
    (out / "attention_fidelity.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
