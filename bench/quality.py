"""Quality benchmark on SmolLM2-135M with one fixed protocol (not run in CI).

Protocol (printed with every run and stored in each record):
- calibration: the first `--samples` (32) windows of 512 tokens of ../shared/data/c4 (documents
  joined with "\\n\\n"), or `builtin:python-docs` for the distribution-shift table;
- evaluation: perplexity on the first `--windows` (32) windows of 512 tokens of WikiText-2 test
  (`--eval valid` uses WikiText-2 validation, for tuning);
- every configuration runs in its own subprocess, so wall time and peak RSS are its own.

Results accumulate in bench/results/quality.json keyed by configuration (a rerun replaces its own
records), and bench/results/quality.md is regenerated from all records. Filters select a subset:

    python bench/quality.py --methods sparsegpt,wanda --patterns 0.6,2:4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from protocol import (  # noqa: E402
    add_smoke_flag,
    calibration_source,
    evaluation_source,
    lm_source,
    pick,
    results_dir,
    seq_len,
    stamp,
    start,
)


def method_passes(method: str, pattern: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipe passes of a benchmark method at one sparsity pattern ("0.6" or "2:4")."""
    mask = {"mask_structure": pattern} if ":" in pattern else {"sparsity": float(pattern)}
    simple = {"magnitude", "wanda", "sparsegpt"}
    if method in simple:
        return [{"type": "calibrate"}, {"type": method, **mask}]
    d2 = {k: v for k, v in options.items() if k in ("lambda1", "lambda2", "s", "stats")}
    if method == "d2-sparsegpt":
        return [{"type": "calibrate"}, {"type": "dual_taylor_mask", **mask, **d2}]
    if method in ("d2prune-fixed", "d2prune-kl"):
        update = {"type": "attention_kl_update", "strategy": "fixed" if method == "d2prune-fixed" else "kl"}
        if method == "d2prune-fixed":
            update["no_update"] = options.get("no_update", ["v"])
        else:
            update.update({k: v for k, v in options.items() if k in ("rho", "candidates", "selection", "kl_samples")})
        return [{"type": "calibrate"}, update, {"type": "dual_taylor_mask", **mask, **d2}]
    raise SystemExit(f"unknown method {method!r}")


def config_key(cfg: dict[str, Any]) -> str:
    opts = ",".join(f"{k}={v}" for k, v in sorted(cfg.get("options", {}).items()))
    return f"{cfg['method']}|{cfg['pattern']}|{cfg['calibration']}|{cfg['evaluation']}|{cfg['samples']}|{cfg['windows']}|{opts}"


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process and return its record."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from d2compiler.driver.pipeline import compress, peak_rss_mb
    from d2compiler.evaluation.data import evaluation_windows, load_text, tokenize
    from d2compiler.evaluation.evaluate import perplexity
    from d2compiler.execution.runner import ModelRunner
    from d2compiler.loading.models import load_model
    from d2compiler.recipe.schema import validate_recipe

    torch.manual_seed(0)
    cal_source = calibration_source(cfg["calibration"])
    eval_source = evaluation_source(cfg["evaluation"])
    model, length = lm_source(), seq_len()
    loaded = load_model(model, "float32", "auto")
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if cfg["method"] == "dense":
        ids = tokenize(loaded.tokenizer, load_text(eval_source, "evaluation"))
        windows = evaluation_windows(ids, length, cfg["windows"])
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        ppl, wall, sparsity = perplexity(ModelRunner(loaded.model, device), windows, quiet=True), 0.0, 0.0
    else:
        recipe = validate_recipe({
            "version": 1,
            "model": {"source": model},
            "data": {
                "calibration": {"source": cal_source, "samples": cfg["samples"], "seq_len": length},
                "evaluation": {"source": eval_source, "seq_len": length, "max_windows": cfg["windows"], "compare_dense": False},
            },
            "passes": method_passes(cfg["method"], cfg["pattern"], cfg.get("options", {})),
        })
        summary = compress(recipe, loaded=loaded, quiet=True)
        ppl, wall, sparsity = summary.pruned_ppl, summary.prune_s, summary.sparsity
        choices = summary.record.get("attention_choices")
        if choices:
            extra["attention_choices"] = choices
    return {
        "model": pick("SmolLM2-135M-Instruct", "tiny random Llama (smoke)"),
        "method": cfg["method"],
        "sparsity": round(sparsity, 4) if cfg["method"] != "dense" else 0.0,
        "pattern": "dense" if cfg["method"] == "dense" else ("unstructured" if ":" not in cfg["pattern"] else cfg["pattern"]),
        "ppl": ppl,
        "wall_s": round(wall, 2),
        "total_s": round(time.perf_counter() - start, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "calibration": f"{cfg['calibration']}: first {cfg['samples']} x {length} tokens",
        "evaluation": f"wikitext-2 {cfg['evaluation']}: first {cfg['windows']} x {length} tokens",
        "options": cfg.get("options", {}),
        "key": config_key(cfg),
        "measured": time.strftime("%Y-%m-%d"),
        **extra,
    }


def load_results(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else []


def markdown(records: list[dict[str, Any]]) -> str:
    lines = [
        "# Quality benchmark: SmolLM2-135M-Instruct",
        "",
        "Generated by `python bench/quality.py`. Calibration windows are consecutive 512-token windows of "
        "the documents joined with \"\\n\\n\"; perplexity follows the SparseGPT/Wanda protocol on the first "
        "windows of WikiText-2. `wall_s` is the pruning time (block capture, statistics, masks, updates, "
        "re-forward), `peak_rss_mb` the peak resident memory of the whole run's process. Wall times compare only "
        "within one `measured` run (this machine is noisy). `measured` names the date and the commit of each row "
        "(each record's `provenance` in the JSON also has the command).",
        "",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["calibration"], r["evaluation"]), []).append(r)
    for (cal, ev), rows in sorted(groups.items()):
        lines += [f"## calibration: {cal}; evaluation: {ev}", "",
                  "| method | pattern | sparsity | options | ppl | wall_s | peak_rss_mb | measured |", "|---|---|---|---|---|---|---|---|"]
        order = {"dense": 0, "magnitude": 1, "wanda": 2, "sparsegpt": 3, "d2-sparsegpt": 4, "d2prune-fixed": 5, "d2prune-kl": 6}
        for r in sorted(rows, key=lambda r: (r["pattern"] != "dense", r["pattern"], r["sparsity"], order.get(r["method"], 9), r["key"])):
            opts = ", ".join(f"{k}={v}" for k, v in sorted(r.get("options", {}).items())) or "-"
            commit = r.get("provenance", {}).get("commit", "")[:7] or "commit not recorded"
            lines.append(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.3f} | {opts} | {r['ppl']:.3f} | {r['wall_s']:.1f} | "
                         f"{r['peak_rss_mb']:.0f} | {r.get('measured', 'earlier run')} ({commit}) |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="dense,magnitude,wanda,sparsegpt")
    parser.add_argument("--patterns", default="0.5,0.6,2:4", help="comma list of sparsities and N:M patterns")
    parser.add_argument("--calibration", default="c4", choices=["c4", "python-docs"])
    parser.add_argument("--eval", default="test", choices=["test", "valid"])
    parser.add_argument("--samples", type=int, default=None, help="calibration windows (32; smoke: 4)")
    parser.add_argument("--windows", type=int, default=None, help="evaluation windows (32; smoke: 2)")
    parser.add_argument("--options", default="{}", help="JSON of method options (lambda1, lambda2, s, rho, ...)")
    parser.add_argument("--results", default=None, help="results file name in the results folder (default quality.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    add_smoke_flag(parser)
    args = parser.parse_args(argv)
    start(args.smoke)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    args.samples = args.samples or pick(32, 4)
    args.windows = args.windows or pick(32, 2)
    out = results_dir() / Path(args.results or "quality.json").name
    out.parent.mkdir(parents=True, exist_ok=True)
    options = json.loads(args.options)
    configs = []
    for method in args.methods.split(","):
        for pattern in (["-"] if method == "dense" else args.patterns.split(",")):
            configs.append({"method": method, "pattern": pattern, "calibration": args.calibration, "evaluation": args.eval,
                            "samples": args.samples, "windows": args.windows, "options": {} if method in ("dense", "magnitude", "wanda", "sparsegpt") else options})
    print(f"protocol: {lm_source()}; calibration {args.calibration} first {args.samples} x {seq_len()}; "
          f"evaluation WikiText-2 {args.eval} first {args.windows} x {seq_len()}; {len(configs)} configurations", flush=True)
    failed = 0
    for cfg in configs:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"FAILED {config_key(cfg)}\n{proc.stderr[-3000:]}", flush=True)
            failed += 1
            continue
        record = stamp(json.loads(lines[-1][len("RESULT "):]))
        records = [r for r in load_results(out) if r["key"] != record["key"]] + [record]
        out.write_text(json.dumps(records, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(records))
        print(f"{record['method']:>14} {record['pattern']:>12} sparsity={record['sparsity']:.3f} ppl={record['ppl']:.3f} "
              f"wall={record['wall_s']:.1f}s rss={record['peak_rss_mb']:.0f}MB", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
