"""Pruning quality on a Mixture-of-Experts: SmolLM2-135M upcycled into 8 experts with top-2 routing
(bench/upcycle.py: experts = the MLP plus 1% seeded noise, router = spherical k-means centroids of
the layer's inputs on python-docs), not run in CI.

Each configuration is a shipped recipe of recipes/ (Wanda, SparseGPT, D²Prune at 50%, 60% and 2:4)
run exactly as written on the upcycled model, with `experts.calibration` = `routed` (each expert's
statistics from the tokens routed to it) or `all` (every calibration token through every expert for
the statistics), on the fixed protocol (first 32 × 512 C4 calibration tokens; seed k uses the k-th
disjoint block of them; perplexity on the first 32 windows of WikiText-2 test). Every run is its own
process. After each run the script reads the pruned banks back: the smallest and largest share of
zeros over all expert matrices, the router's zeros, and the fewest calibration tokens an expert got.

    python bench/moe.py --seeds 3 --fresh                      # the table of bench/results/moe.md
    python bench/moe.py --seeds 3 --missing --until 19:40      # continue it at the same commit, done by 19:40
    python bench/moe.py --recipes d2prune-unstructured-50 --modes routed --seeds 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from protocol import (  # noqa: E402
    calibration_source,
    evaluation_source,
    lm_source,
    pick,
    results_dir,
    seq_len,
    start,
)
from quality import (  # noqa: E402
    add_until_flag,
    aggregate,
    load_results,
    missing,
    paired_ratio,
    recipe_from_file,
    run_workers,
)
from upcycle import upcycled_moe  # noqa: E402

RECIPES = [f"{method}-{pattern}" for pattern in ("unstructured-50", "unstructured-60", "2of4")
           for method in ("wanda", "sparsegpt", "d2prune")]
MODES = ("routed", "all")


def key(cfg: dict[str, Any]) -> str:
    extra = "".join(f"|{name}={cfg[name]}" for name in ("split", "expert_lmbda") if name in cfg)  # bench/moe_allocation.py
    return f"{cfg['recipe']}|{cfg['mode']}|{cfg['samples']}|{cfg['windows']}|seed={cfg['seed']}{extra}"


def expert_zeros(model: torch.nn.Module) -> dict[str, float]:
    """The smallest and largest share of zeros over every expert matrix of every 3-D bank, and the
    largest share of zeros of a router (a 2-D `gate` weight with one row per expert)."""
    shares, router = [], 0.0
    for name, param in model.named_parameters():
        if param.dim() == 3:
            shares += (param == 0).flatten(1).float().mean(1).tolist()
        elif name.endswith("mlp.gate.weight"):
            router = max(router, float((param == 0).float().mean()))
    return {"expert_zeros_min": round(min(shares), 5), "expert_zeros_max": round(max(shares), 5), "router_zeros": router}


def fewest_tokens(layers: dict[str, Any]) -> int:
    """The fewest calibration tokens any expert layer (or slice of one) was observed on."""
    counts = []
    for name, entry in layers.items():
        if "experts." in name:
            counts += [s["calibration_tokens"] for s in entry.get("slices", {}).values() if "calibration_tokens" in s]
            if "calibration_tokens" in entry:
                counts.append(entry["calibration_tokens"])
    return min(counts) if counts else -1


def dense_ppl(source: str, windows: int) -> float:
    from d2compiler.evaluation.data import evaluation_windows, load_text, tokenize
    from d2compiler.evaluation.evaluate import perplexity
    from d2compiler.execution.runner import ModelRunner
    from d2compiler.loading.models import load_model

    loaded = load_model(source, "float32", "cpu")
    ids = tokenize(loaded.tokenizer, load_text(evaluation_source("test"), "evaluation"))
    return perplexity(ModelRunner(loaded.model, torch.device("cpu")), evaluation_windows(ids, seq_len(), windows), quiet=True)


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process and return its record."""
    from d2compiler.driver.pipeline import compress, peak_rss_mb
    from d2compiler.loading.models import load_model
    from d2compiler.recipe.schema import validate_recipe

    torch.manual_seed(0)
    folder = str(upcycled_moe())
    started = time.perf_counter()
    if cfg["recipe"] in ("dense", "dense-smollm2"):
        ppl = dense_ppl(folder if cfg["recipe"] == "dense" else lm_source(), cfg["windows"])
        extra: dict[str, Any] = {"sparsity": 0.0, "wall_s": 0.0}
    else:
        data = recipe_from_file({**cfg, "recipe": f"recipes/{cfg['recipe']}.toml"}, folder, calibration_source(),
                                evaluation_source(cfg.get("split", "test")), seq_len())
        data["experts"] = {"calibration": cfg["mode"]}
        for spec in data["passes"]:  # bench/moe_allocation.py: the spread across each layer's experts
            if spec["type"] == "sparsity_allocation" and "expert_lmbda" in cfg:
                spec["expert_lmbda"] = cfg["expert_lmbda"]
        loaded = load_model(folder, "float32", "cpu")
        summary = compress(validate_recipe(data), loaded=loaded, quiet=True)
        ppl = summary.pruned_ppl
        extra = {"sparsity": round(summary.sparsity, 4), "wall_s": round(summary.prune_s, 2),
                 **expert_zeros(loaded.model), "fewest_expert_tokens": fewest_tokens(summary.layers)}
    return {**cfg, "model": pick("SmolLM2-135M upcycled: 8 experts, top-2", "tiny random Llama upcycled (smoke)"),
            "ppl": ppl, **extra, "total_s": round(time.perf_counter() - started, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
            "key": key(cfg), "measured": time.strftime("%Y-%m-%d")}


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    spread = f" ± {row['ppl_std']:.2f}" if len(row["ppls"]) > 1 else ""
    return f"{row['ppl_mean']:.2f}{spread}"


def markdown(records: list[dict[str, Any]]) -> str:
    rows = {(r["recipe"], r["mode"]): r for r in aggregate(records)}
    commits = sorted({c for r in rows.values() for c in r["commits"]})
    lines = ["# Pruning a Mixture-of-Experts: SmolLM2-135M upcycled into 8 experts, top-2", "",
             "Generated by `python bench/moe.py` (see its docstring for the model and the protocol). Perplexity on the first "
             "32 × 512 tokens of WikiText-2 test, mean ± sample std over the calibration seeds (disjoint C4 blocks; per seed "
             f"in the JSON). Commits of the rows: {', '.join(commits)}.", ""]
    dense = [f"{name}: {rows[(name, '-')]['ppl_mean']:.3f}" for name in ("dense-smollm2", "dense") if (name, "-") in rows]
    if dense:
        lines += ["Dense perplexity (`dense-smollm2`: the model it was built from; `dense`: the upcycled MoE): "
                  + "; ".join(dense) + ".", ""]
    lines += ["| pattern | method | routed | all | all / routed (paired) | vs SparseGPT, routed | vs SparseGPT, all | "
              "expert zeros (min–max) | router zeros (max) | fewest tokens (routed) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for pattern in ("unstructured-50", "unstructured-60", "2of4"):
        for method in ("wanda", "sparsegpt", "d2prune"):
            recipe = f"{method}-{pattern}"
            routed, every = rows.get((recipe, "routed")), rows.get((recipe, "all"))
            if routed is None and every is None:
                continue
            base_r, base_a = rows.get((f"sparsegpt-{pattern}", "routed")), rows.get((f"sparsegpt-{pattern}", "all"))
            runs = [run for row in (routed, every) if row for run in row["runs"]]  # every seed of both modes
            tokens = [r["fewest_expert_tokens"] for r in runs if r["mode"] == "routed"]
            zeros = f"{min(r['expert_zeros_min'] for r in runs):.4f}–{max(r['expert_zeros_max'] for r in runs):.4f}"
            lines.append(f"| {pattern} | {method} | {_cell(routed)} | {_cell(every)} | {paired_ratio(every, routed, count=True)} | "
                         f"{'' if method == 'sparsegpt' else paired_ratio(routed, base_r, count=True)} | {'' if method == 'sparsegpt' else paired_ratio(every, base_a, count=True)} | "
                         f"{zeros} | {max(r['router_zeros'] for r in runs):.3f} | {min(tokens) if tokens else ''} |")
    pruned = [r for r in records if r["recipe"] not in ("dense", "dense-smollm2")]
    full = len(RECIPES) * len(MODES) * 3
    lines += ["", "Ratios are per seed, paired on the same calibration windows (mean ± std, number of shared seeds). "
              "Pruning times (`wall_s`) are in the JSON only: they are comparable only between runs that had the machine "
              "to themselves. The shipped D²Prune recipes allocate the sparsity across blocks (`sparsity_allocation`, "
              "error profile), so their expert zeros span a range; the experts of one block share its sparsity. "
              "The last three columns cover every seed: expert zeros and router zeros over both modes, the fewest "
              "tokens over the routed runs (with `all` every expert sees every calibration token).", "",
              f"Measured: {len(pruned)} of the {full} pruned runs of the full table (`python bench/moe.py --seeds 3 --fresh`: "
              f"{len(RECIPES)} recipes × {len(MODES)} calibration modes × 3 seeds)"
              + (" — a partial table." if len(pruned) < full else "."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma list of recipe names in recipes/")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of experts.calibration values")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fresh", action="store_true", help="drop the earlier records of bench/results/moe.json first")
    parser.add_argument("--missing", action="store_true", help="skip the configurations moe.json already has a record of "
                        "at this commit (to continue an interrupted table)")
    parser.add_argument("--render", action="store_true", help="only regenerate moe.md from moe.json")
    parser.add_argument("--smoke", action="store_true", help="the same code path on a tiny random model")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    add_until_flag(parser)
    args = parser.parse_args(argv)
    start(args.smoke)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    out = results_dir() / "moe.json"
    if args.render:
        out.with_suffix(".md").write_text(markdown(load_results(out)))
        return 0
    common = {"samples": pick(32, 4), "windows": pick(32, 2)}
    configs = [{"recipe": name, "mode": "-", "seed": 0, **common} for name in ("dense-smollm2", "dense")]
    configs += [{"recipe": recipe, "mode": mode, "seed": seed, **common} for seed in range(args.seeds)
                for recipe in args.recipes.split(",") for mode in args.modes.split(",")]
    if args.fresh and out.exists():
        out.unlink()
    if args.missing:
        configs = missing(configs, out, key)
    print(f"building or finding the upcycled MoE: {upcycled_moe()}; {len(configs)} configurations", flush=True)
    return run_workers(__file__, configs, out, key, markdown,
                       lambda r: f"{r['recipe']:>28} {r['mode']:>6} seed={r['seed']} ppl={r['ppl']:.3f} "
                                 f"experts {r.get('expert_zeros_min', 0):.4f}-{r.get('expert_zeros_max', 0):.4f} "
                                 f"wall={r['wall_s']:.1f}s rss={r['peak_rss_mb']:.0f}MB", until=args.until)


if __name__ == "__main__":
    sys.exit(main())
