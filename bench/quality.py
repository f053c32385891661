"""Quality benchmark on SmolLM2-135M with one fixed protocol (not run in CI).

Protocol (printed with every run and stored in each record):
- calibration: the first `--samples` (32) windows of 512 tokens of ../shared/data/c4 (documents
  joined with "\\n\\n"), or `builtin:python-docs` for the distribution-shift table;
- evaluation: perplexity on the first `--windows` (32) windows of 512 tokens of WikiText-2 test
  (`--eval valid` uses WikiText-2 validation, for tuning);
- every configuration runs in its own subprocess, so wall time and peak RSS are its own.

Results accumulate in bench/results/quality.json keyed by configuration and seed (a rerun replaces
its own records), and bench/results/quality.md is regenerated from all records: mean ± std over the
seeds of each configuration, and the ratios of the best D²Prune recipe to uniform SparseGPT.

    python bench/quality.py --methods sparsegpt,wanda --patterns 0.6,2:4     # methods by name
    python bench/quality.py --suite --fresh                                  # the README table

`--seeds K` repeats every configuration on K disjoint calibration sets: seed k uses the windows
k·samples .. (k+1)·samples−1 of the C4 text (`data.calibration.offset`). `--suite` runs the
recipes of `SUITE` (files in recipes/, each with its number of seeds) exactly as written, except the
calibration offset of each seed; `--fresh` first drops every earlier record of the results file, so
the table comes from this one run (`--suite --missing` continues an interrupted one at the same
commit; `--until 19:40` stops between configurations in time to be done by then).
`--options '{"allocation": "owl"}'` puts a `sparsity_allocation` pass before the pruning pass of a
method (with `owl_m`, `owl_lmbda`, `survey_samples`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from protocol import SMOLLM2 as SMOLLM2_SOURCE  # noqa: E402
from protocol import (  # noqa: E402
    add_smoke_flag,
    calibration_source,
    evaluation_source,
    lm_source,
    pick,
    provenance,
    results_dir,
    seq_len,
    smoke,
    stamp,
    start,
)

C4_REL = "../shared/data/c4/c4_demo_llamafactory.jsonl"  # as the recipes in recipes/ name it (from the repository root)


def method_passes(method: str, pattern: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipe passes of a benchmark method at one sparsity pattern ("0.6" or "2:4")."""
    passes = _method_passes(method, pattern, options)
    if options.get("dense_target") is not None:  # right after calibrate (its strength α)
        passes.insert(1, {"type": "dense_target", "strength": options["dense_target"]})
    if options.get("allocation"):
        allocation = {"type": "sparsity_allocation", "profile": options["allocation"],
                      **{k: v for k, v in options.items() if k in ("owl_m", "owl_lmbda", "survey_samples")}}
        passes.insert(len(passes) - 1, allocation)  # just before the pruning pass
    if options.get("gptq_group") is not None:  # then GPTQ int4 (symmetric) with this group size: the deployment combination
        passes.append({"type": "gptq", "bits": 4, "group_size": options["gptq_group"]})
    return passes


UPDATE_OPTIONS = ("rho", "candidates", "selection", "kl_samples", "scoring", "objective")  # attention_kl_update's, from --options


def _method_passes(method: str, pattern: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    mask = {"mask_structure": pattern} if ":" in pattern else {"sparsity": float(pattern)}
    if options.get("true_sequential"):
        mask["true_sequential"] = True
        if options.get("sequential_stages"):
            mask["sequential_stages"] = options["sequential_stages"]
    simple = {"magnitude", "wanda", "sparsegpt", "admm"}  # admm: the ALPS-class baseline
    if options.get("refit_steps") and method not in ("magnitude", "wanda"):  # every OBS pass
        mask["refit_steps"] = options["refit_steps"]
    if method in simple:
        return [{"type": "calibrate"}, {"type": method, **mask}]
    d2 = {k: v for k, v in options.items() if k in ("lambda1", "lambda2", "s", "stats", "solver")}
    if method == "d2-sparsegpt":
        return [{"type": "calibrate"}, {"type": "dual_taylor_mask", **mask, **d2}]
    if method in ("d2prune-fixed", "d2prune-kl"):
        update = {"type": "attention_kl_update", "strategy": "fixed" if method == "d2prune-fixed" else "kl"}
        if method == "d2prune-fixed":
            update["no_update"] = options.get("no_update", ["v"])
        else:
            update.update({k: v for k, v in options.items() if k in UPDATE_OPTIONS})
        return [{"type": "calibrate"}, update, {"type": "dual_taylor_mask", **mask, **d2}]
    if method == "sparsegpt-kl":  # SparseGPT with the attention-aware update plan (no dual-Taylor score)
        update = {"type": "attention_kl_update", "strategy": "kl", **{k: v for k, v in options.items() if k in UPDATE_OPTIONS}}
        return [{"type": "calibrate"}, update, {"type": "sparsegpt", **mask}]
    raise SystemExit(f"unknown method {method!r}")


SUITE = [  # (recipe, seeds): the README's quality table (`--suite`); seeds are disjoint C4 calibration sets
    ("recipes/wanda-unstructured-50.toml", 1), ("recipes/wanda-unstructured-60.toml", 1),
    ("recipes/wanda-unstructured-70.toml", 1), ("recipes/wanda-2of4.toml", 1),
    ("recipes/sparsegpt-unstructured-50.toml", 3), ("recipes/d2prune-unstructured-50.toml", 3),
    ("recipes/sparsegpt-unstructured-60.toml", 3), ("recipes/sparsegpt-owl-unstructured-60.toml", 1),
    ("recipes/sparsegpt-alloc-unstructured-60.toml", 3), ("recipes/d2prune-unstructured-60.toml", 3),
    ("recipes/sparsegpt-unstructured-70.toml", 3), ("recipes/sparsegpt-owl-unstructured-70.toml", 1),
    ("recipes/sparsegpt-alloc-unstructured-70.toml", 3), ("recipes/d2prune-unstructured-70.toml", 3),
    ("recipes/sparsegpt-2of4.toml", 3), ("recipes/d2prune-2of4.toml", 3),
    # SparseGPT with the refit D²Prune's 2:4 and 70% recipes use (and at 70% the same allocation): one seed each
    ("recipes/sparsegpt-refit-2of4.toml", 1), ("recipes/sparsegpt-alloc-refit-unstructured-70.toml", 1),
    # the ALPS-class baseline with the same allocation and refit, and the D²Prune recipe that competes with it
    ("recipes/admm-alloc-refit-unstructured-60.toml", 3), ("recipes/d2prune-admm-unstructured-60.toml", 3),
    ("recipes/admm-alloc-refit-unstructured-70.toml", 3), ("recipes/d2prune-admm-unstructured-70.toml", 3),
    ("recipes/sparsegpt-unstructured-80.toml", 3), ("recipes/admm-alloc-refit-unstructured-80.toml", 3),
    ("recipes/d2prune-admm-unstructured-80.toml", 3),
    ("recipes/admm-refit-2of4.toml", 3), ("recipes/d2prune-admm-2of4.toml", 3),
    # the deployment combination: 2:4 then GPTQ int4 (group 64: 128 does not divide SmolLM2's 576 inputs)
    ("recipes/sparsegpt-2of4-w4.toml", 3), ("recipes/admm-refit-2of4-w4.toml", 3), ("recipes/d2prune-admm-2of4-w4.toml", 3),
]


def config_key(cfg: dict[str, Any]) -> str:
    opts = ",".join(f"{k}={v}" for k, v in sorted(cfg.get("options", {}).items()))
    label = cfg.get("recipe") or cfg["method"]
    return (f"{label}|{cfg['pattern']}|{cfg['calibration']}|{cfg['evaluation']}|{cfg['samples']}|{cfg['windows']}|{opts}"
            f"|seed={cfg.get('seed', 0)}")


def recipe_method(path: str) -> tuple[str, str]:
    """(the pruning pass's type, its pattern: "0.7" or "2:4") of a recipe file."""
    import tomllib

    passes = tomllib.loads((ROOT / path).read_text())["passes"]
    pruning = [p for p in passes if "sparsity" in p or "mask_structure" in p][-1]
    return pruning["type"], pruning.get("mask_structure") or str(pruning["sparsity"])


def recipe_from_file(cfg: dict[str, Any], model: str, cal_source: str, eval_source: str, length: int) -> dict[str, Any]:
    """The recipe file of `cfg` as written, with the calibration offset of its seed and no output
    folder. In a full run the file must use the benchmark protocol (checked); a smoke run swaps in
    the tiny model and data."""
    import tomllib

    data = tomllib.loads((ROOT / cfg["recipe"]).read_text())
    cal, ev = data["data"]["calibration"], data["data"]["evaluation"]
    protocol = {"model": (data["model"]["source"], SMOLLM2_SOURCE), "calibration": (cal["source"], str(C4_REL)),
                "samples": (cal["samples"], cfg["samples"]), "seq_len": (cal["seq_len"], length),
                "windows": (ev.get("max_windows"), cfg["windows"])}
    if not smoke():
        wrong = [f"{k} = {have!r} (protocol: {want!r})" for k, (have, want) in protocol.items() if have != want]
        if wrong:
            raise SystemExit(f"{cfg['recipe']}: not the benchmark protocol: {'; '.join(wrong)}")
    data["model"]["source"] = model
    cal.update({"source": cal_source, "samples": cfg["samples"], "seq_len": length,
                "offset": cfg.get("seed", 0) * cfg["samples"]})
    ev.update({"source": eval_source, "seq_len": length, "max_windows": cfg["windows"], "compare_dense": False})
    data.pop("output", None)
    return data


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
        if cfg.get("recipe"):
            data = recipe_from_file(cfg, model, cal_source, eval_source, length)
        else:
            data = {
                "version": 1,
                "model": {"source": model},
                "data": {
                    "calibration": {"source": cal_source, "samples": cfg["samples"], "seq_len": length,
                                    "offset": cfg.get("seed", 0) * cfg["samples"]},
                    "evaluation": {"source": eval_source, "seq_len": length, "max_windows": cfg["windows"], "compare_dense": False},
                },
                "passes": method_passes(cfg["method"], cfg["pattern"], cfg.get("options", {})),
            }
        recipe = validate_recipe(data)
        summary = compress(recipe, loaded=loaded, quiet=True)
        ppl, wall, sparsity = summary.pruned_ppl, summary.prune_s, summary.sparsity
        for field in ("attention_choices", "sparsity_allocation"):
            if summary.record.get(field):
                extra[field] = summary.record[field]
        if cfg.get("recipe"):
            extra["passes"] = [p.model_dump(exclude_defaults=True) for p in recipe.passes]
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
        "recipe": cfg.get("recipe"),
        "seed": cfg.get("seed", 0),
        "key": config_key(cfg),
        "measured": time.strftime("%Y-%m-%d"),
        **extra,
    }


def load_results(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else []


def missing(configs: list[dict[str, Any]], out: Path, key: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """The `configs` that `out` has no record of from this commit with a clean tree (`--missing`: an
    interrupted table continues at the commit it started from, and only there)."""
    here = provenance()
    done = {r["key"] for r in load_results(out)
            if not here["dirty"] and r.get("provenance", {}).get("commit") == here["commit"] and not r["provenance"].get("dirty")}
    return [cfg for cfg in configs if key(cfg) not in done]


def label(record: dict[str, Any]) -> str:
    """A row's name: its recipe file, else its method."""
    return Path(record["recipe"]).stem if record.get("recipe") else record["method"]


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration over its seeds: ppl mean and sample std, per-seed values, mean wall,
    the largest peak RSS, the dates and commits of its records, and the records themselves (`runs`)."""
    rows: dict[str, dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: r.get("seed", 0)):
        key = r["key"].rsplit("|seed=", 1)[0]
        row = rows.setdefault(key, {**r, "ppls": {}, "walls": [], "commits": set(), "dates": set(), "runs": []})
        row["runs"].append(r)
        row["ppls"][r.get("seed", 0)] = r["ppl"]
        row["walls"].append(r["wall_s"])
        row["peak_rss_mb"] = max(row["peak_rss_mb"], r["peak_rss_mb"])
        row["dates"].add(r.get("measured", "earlier run"))
        row["commits"].add(r.get("provenance", {}).get("commit", "")[:7] or "commit not recorded")
    for row in rows.values():
        row["ppl_mean"], row["ppl_std"] = mean_std(list(row["ppls"].values()))
        row["wall_mean"] = sum(row["walls"]) / len(row["walls"])
    return list(rows.values())


# recipe stems; "-w4": followed by GPTQ int4 (the deployment combination), compared only with "-w4" recipes
UNIFORM_SPARSEGPT = re.compile(r"sparsegpt-(unstructured-\d+|2of4)(-w4)?$")  # the plain baseline recipes
ALLOCATED_SPARSEGPT = re.compile(r"sparsegpt-alloc-unstructured-\d+$")  # SparseGPT with the allocation D²Prune uses
REFIT_SPARSEGPT = re.compile(r"sparsegpt-(alloc-)?refit-(unstructured-\d+|2of4)(-w4)?$")  # ... and with D²Prune's refit
ALPS_CLASS = re.compile(r"admm-(alloc-)?refit-(unstructured-\d+|2of4)(-w4)?$")  # the ALPS-class baseline, same allocation and refit


def variant(record: dict[str, Any]) -> tuple[str, float, bool]:
    """What a ratio compares within: the pattern, the sparsity (2 decimals) and whether int4 follows."""
    return record["pattern"], round(record["sparsity"], 2), label(record).endswith("-w4")


def ratio_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per pattern: each recipe's mean ppl over plain uniform SparseGPT's (`sparsegpt-*` recipes), and
    D²Prune's over SparseGPT with the same allocation, with the same allocation and refit, and over the ALPS-class
    `admm` with the same allocation and refit; the ratio per seed (paired on the same
    calibration set), mean ± std, and the ratio of mean pruning times."""
    def baselines(pattern: re.Pattern) -> dict[tuple[str, float, bool], dict[str, Any]]:
        return {variant(r): r for r in rows if r.get("recipe") and pattern.match(label(r))}

    uniform, allocated, refit, alps = (baselines(p) for p in (UNIFORM_SPARSEGPT, ALLOCATED_SPARSEGPT, REFIT_SPARSEGPT, ALPS_CLASS))
    lines = []
    for r in rows:
        key = variant(r)
        d2 = label(r).startswith("d2prune")
        refs = [uniform.get(key)] + ([allocated.get(key), refit.get(key), alps.get(key)] if d2 else [])
        for ref in refs:
            if ref is None or r is ref or not r.get("recipe"):
                continue
            paired = [r["ppls"][k] / ref["ppls"][k] for k in r["ppls"] if k in ref["ppls"]]
            mean, std = mean_std(paired) if paired else (float("nan"), 0.0)
            wall = r["wall_mean"] / ref["wall_mean"] if ref["wall_mean"] else float("nan")
            lines.append(f"| {label(r)} | {label(ref)} | {r['ppl_mean'] / ref['ppl_mean']:.3f} | {mean:.3f} ± {std:.3f} | "
                         f"{len(paired)} | {wall:.2f} |")
    if not lines:
        return []
    return ["### Ratios", "",
            "Perplexity of a recipe over its baseline's: the ratio of the mean perplexities (each over its own seeds), and the "
            "ratio per seed, paired on the same C4 calibration windows (mean ± sample std over the shared seeds). `wall`: the "
            "ratio of mean pruning times.", "",
            "| recipe | baseline | ratio of means | per-seed ratio | shared seeds | wall |", "|---|---|---|---|---|---|",
            *lines, ""]


SUMMARY_COLUMNS = [  # (column, recipe stem patterns with {p} for the pattern's suffix; the first present is shown)
    ("Wanda", ("wanda-{p}",)), ("SparseGPT", ("sparsegpt-{p}",)), ("SparseGPT + OWL", ("sparsegpt-owl-{p}",)),
    ("SparseGPT + error allocation", ("sparsegpt-alloc-{p}",)),
    ("SparseGPT (+ allocation) + refit", ("sparsegpt-alloc-refit-{p}", "sparsegpt-refit-{p}")),
    ("ALPS-class admm (+ allocation) + refit", ("admm-alloc-refit-{p}", "admm-refit-{p}")),
    ("D²Prune (shipped OBS recipe)", ("d2prune-{p}",)), ("D²Prune (ADMM + dense target)", ("d2prune-admm-{p}",)),
]
SUMMARY_PATTERNS = (("unstructured-50", "50%"), ("unstructured-60", "60%"), ("unstructured-70", "70%"),
                    ("unstructured-80", "80%"), ("2of4", "2:4"), ("2of4-w4", "2:4 + int4"))
D2PRUNE_COLUMNS = ("D²Prune (shipped OBS recipe)", "D²Prune (ADMM + dense target)")
RATIO_COLUMNS = (("SparseGPT", "SparseGPT"), ("SparseGPT + allocation", "SparseGPT + error allocation"),
                 ("SparseGPT (+ allocation) + refit", "SparseGPT (+ allocation) + refit"),
                 ("ALPS-class", "ALPS-class admm (+ allocation) + refit"))


def paired_ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, *, count: bool = False) -> str:
    """a's perplexity over b's per seed, paired on the same calibration set: mean (± sample std), and
    with `count` the number of shared seeds in parentheses; "" when they share none."""
    if a is None or b is None:
        return ""
    ratios = [a["ppls"][k] / b["ppls"][k] for k in a["ppls"] if k in b["ppls"]]
    if not ratios:
        return ""
    mean, std = mean_std(ratios)
    return f"{mean:.3f}" + (f" ± {std:.3f}" if len(ratios) > 1 else "") + (f" ({len(ratios)})" if count else "")


def _pattern_columns(by_label: dict[str, dict[str, Any]], suffix: str) -> dict[str, dict[str, Any] | None]:
    """The row of each summary column for one pattern suffix (None where the suite has no such recipe)."""
    return {column: next((by_label[x] for x in (st.format(p=suffix) for st in stems) if x in by_label), None)
            for column, stems in SUMMARY_COLUMNS}


def _best_d2prune(found: dict[str, dict[str, Any] | None]) -> dict[str, Any] | None:
    """The D²Prune column with the lower mean perplexity, or None."""
    return min((found[c] for c in D2PRUNE_COLUMNS if found[c] is not None), key=lambda r: r["ppl_mean"], default=None)


GAIN_STEPS = (("allocation", "SparseGPT + error allocation"), ("refit", "SparseGPT (+ allocation) + refit"),
              ("ALPS-class ADMM support", "ALPS-class admm (+ allocation) + refit"), ("D²Prune's own", None))


def gain_shares(rows: list[dict[str, Any]]) -> list[str]:
    """Per pattern, the best D²Prune recipe's gain over plain SparseGPT split into the steps of the measured
    chain SparseGPT → + error allocation → + refit → ALPS-class ADMM (same allocation and refit) → best
    D²Prune: each step's ratio of mean perplexities and its share of ln(best D²Prune / SparseGPT). The
    ratios of means telescope to the total; a cell whose two rows have different seed counts names them.
    A column a pattern lacks is skipped and its gain is counted in the next measured step, whose cell
    names the steps it does not separate; N:M patterns have no allocation."""
    by_label = {label(r): r for r in rows if r.get("recipe")}
    lines = []
    for suffix, name in SUMMARY_PATTERNS:
        found = _pattern_columns(by_label, suffix)
        base, d2 = found["SparseGPT"], _best_d2prune(found)
        if base is None or d2 is None:
            continue
        total = math.log(d2["ppl_mean"] / base["ppl_mean"])
        previous, skipped, cells = base, [], []
        for step, column in GAIN_STEPS:
            row = d2 if column is None else found[column]
            if step == "allocation" and suffix.startswith("2of4"):
                cells.append("n/a (N:M)")
                continue
            if row is None:
                skipped.append(step)
                cells.append("")
                continue
            ratio = row["ppl_mean"] / previous["ppl_mean"]
            share = math.log(ratio) / total if total else float("nan")
            covers = f"; not separated: {', '.join(skipped)}" if skipped else ""
            seeds = (len(previous["ppls"]), len(row["ppls"]))
            mixed = f"; seeds {seeds[0]}→{seeds[1]}" if seeds[0] != seeds[1] else ""
            cells.append(f"{ratio:.3f} ({share:.0%}{covers}{mixed})")
            previous, skipped = row, []
        lines.append(f"| {name} | {d2['ppl_mean'] / base['ppl_mean']:.3f} | " + " | ".join(cells) + f" | {label(d2)} |")
    if not lines:
        return []
    return ["### Where the gain over SparseGPT comes from", "",
            "Each step's ratio of mean perplexities along SparseGPT → + error allocation → + refit → ALPS-class `admm` "
            "(same allocation and refit) → the best D²Prune recipe, and its share of the whole gain (of ln(best D²Prune / "
            "SparseGPT)); the step ratios multiply to the total. A step the suite has no recipe for is counted in the next "
            "measured one (\"not separated: ...\"; N:M patterns fix every layer's sparsity, so they have no "
            "allocation). Each ratio divides one row's mean over its seeds by the previous row's; a cell whose two rows have "
            "different numbers of seeds says so (\"seeds 3→1\").", "",
            "| pattern | best D²Prune / SparseGPT | " + " | ".join(step for step, _ in GAIN_STEPS) + " | best D²Prune |",
            "|---" * (len(GAIN_STEPS) + 3) + "|", *lines, ""]


def summary_table(rows: list[dict[str, Any]]) -> list[str]:
    """The README table: per pattern, the mean test perplexity (± std over seeds) of each suite recipe,
    and the best D²Prune recipe's (the lower mean of the two D²Prune columns) seed-paired ratios to
    uniform SparseGPT, to SparseGPT with the same allocation, with the same allocation and refit, and
    to the ALPS-class baseline with the same allocation and refit."""
    by_label = {label(r): r for r in rows if r.get("recipe")}
    if not by_label:
        return []
    lines = ["### Summary (the README table)", "",
             "| pattern | " + " | ".join(c for c, _ in SUMMARY_COLUMNS) + " | best D²Prune | "
             + " | ".join(f"best D²Prune / {name}" for name, _ in RATIO_COLUMNS) + " | best D²Prune wall / SparseGPT wall |",
             "|---" * (len(SUMMARY_COLUMNS) + len(RATIO_COLUMNS) + 3) + "|"]
    for suffix, name in SUMMARY_PATTERNS:
        found = _pattern_columns(by_label, suffix)
        if not any(found.values()):
            continue
        cells = ["" if r is None else f"{r['ppl_mean']:.2f}" + (f" ± {r['ppl_std']:.2f}" if len(r["ppls"]) > 1 else "")
                 for r in found.values()]
        d2 = _best_d2prune(found)
        base = found["SparseGPT"]
        wall = f"{d2['wall_mean'] / base['wall_mean']:.2f}×" if d2 and base and base["wall_mean"] else ""
        ratios = [paired_ratio(d2, found[column]) for _name, column in RATIO_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {label(d2) if d2 else ''} | " + " | ".join(ratios) + f" | {wall} |")
    return [*lines, ""]


def markdown(records: list[dict[str, Any]]) -> str:
    lines = [
        "# Quality benchmark: SmolLM2-135M-Instruct",
        "",
        "Generated by `python bench/quality.py` (the README table: `python bench/quality.py --suite --fresh`). Calibration "
        "windows are consecutive 512-token windows of the documents joined with \"\\n\\n\"; seed k uses the k-th "
        "disjoint block of them (`data.calibration.offset = k × samples`). Perplexity follows the SparseGPT/Wanda "
        "protocol on the first windows of WikiText-2. `ppl` is the mean over the seeds ± the sample standard deviation. "
        "`wall_s` is the mean pruning time (survey, block capture, statistics, masks, updates, re-forward), `peak_rss_mb` "
        "the largest peak resident memory of a row's processes. Wall times compare only within one run (this machine is noisy). "
        "`measured` names the dates and the commits of the rows (each record's `provenance` in the JSON also has the command).",
        "",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in aggregate(records):
        groups.setdefault((r["calibration"], r["evaluation"]), []).append(r)
    order = {"dense": 0, "magnitude": 1, "wanda": 2, "sparsegpt": 3, "d2-sparsegpt": 4, "d2prune-fixed": 5, "d2prune-kl": 6}
    for (cal, ev), rows in sorted(groups.items()):
        rows.sort(key=lambda r: (r["pattern"] != "dense", r["pattern"], round(r["sparsity"], 2), order.get(r["method"], 9), label(r)))
        lines += [f"## calibration: {cal}; evaluation: {ev}", "",
                  "| recipe / method | pattern | sparsity | options | ppl | per seed | wall_s | peak_rss_mb | measured |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            opts = ", ".join(f"{k}={v}" for k, v in sorted(r.get("options", {}).items())) or "-"
            seeds = " / ".join(f"{v:.2f}" for v in r["ppls"].values())
            spread = f" ± {r['ppl_std']:.2f}" if len(r["ppls"]) > 1 else ""
            lines.append(f"| {label(r)} | {r['pattern']} | {r['sparsity']:.3f} | {opts} | {r['ppl_mean']:.3f}{spread} | {seeds} | "
                         f"{r['wall_mean']:.1f} | {r['peak_rss_mb']:.0f} | {', '.join(sorted(r['dates']))} "
                         f"({', '.join(sorted(r['commits']))}) |")
        lines += ["", *summary_table(rows), *gain_shares(rows), *ratio_lines(rows)]
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
    parser.add_argument("--seeds", type=int, default=1, help="disjoint calibration sets per configuration (seed k: offset k x samples)")
    parser.add_argument("--first-seed", type=int, default=0, help="with --seeds (methods or --recipes): run seeds first-seed .. first-seed + seeds - 1 (e.g. to add seeds to a search)")
    parser.add_argument("--suite", action="store_true", help="run the recipes of SUITE (the README table) instead of --methods")
    parser.add_argument("--recipes", default=None, help="comma list of recipe files to run instead of --methods (with --seeds)")
    parser.add_argument("--fresh", action="store_true", help="drop every earlier record of the results file first")
    parser.add_argument("--missing", action="store_true", help="skip the configurations the results file already has a record "
                        "of from this commit (clean tree): continues an interrupted run, e.g. `--suite --missing` after `--suite --fresh`")
    parser.add_argument("--render", action="store_true", help="only regenerate the .md from the results file's records")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    add_smoke_flag(parser)
    add_until_flag(parser)
    args = parser.parse_args(argv)
    start(args.smoke)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    args.samples = args.samples or pick(32, 4)
    args.windows = args.windows or pick(32, 2)
    out = results_dir() / Path(args.results or "quality.json").name
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.render:
        out.with_suffix(".md").write_text(markdown(load_results(out)))
        return 0
    options = json.loads(args.options)
    common = {"calibration": args.calibration, "evaluation": args.eval, "samples": args.samples, "windows": args.windows}
    configs = []
    if args.suite or args.recipes:
        runs = SUITE if args.suite else [(path, args.seeds) for path in args.recipes.split(",")]
        configs.append({"method": "dense", "pattern": "-", **common, "options": {}})
        for path, seeds in runs:
            method, pattern = recipe_method(path)
            first = 0 if args.suite else args.first_seed
            configs += [{"method": method, "pattern": pattern, "recipe": path, "seed": k, **common, "options": {}}
                        for k in range(first, first + seeds)]
    else:
        for method in args.methods.split(","):
            for pattern in (["-"] if method == "dense" else args.patterns.split(",")):
                seeds = range(1) if method == "dense" else range(args.first_seed, args.first_seed + args.seeds)
                configs += [{"method": method, "pattern": pattern, **common, "seed": k, "options": {} if method == "dense" else options}
                            for k in seeds]
    if args.fresh and out.exists():
        out.unlink()
    if args.missing:
        configs = missing(configs, out, config_key)
    print(f"protocol: {lm_source()}; calibration {args.calibration} first {args.samples} x {seq_len()}; "
          f"evaluation WikiText-2 {args.eval} first {args.windows} x {seq_len()}; {len(configs)} configurations", flush=True)
    return run_workers(__file__, configs, out, config_key, markdown,
                       lambda r: f"{label(r):>32} seed={r['seed']} {r['pattern']:>12} sparsity={r['sparsity']:.3f} ppl={r['ppl']:.3f} "
                                 f"wall={r['wall_s']:.1f}s rss={r['peak_rss_mb']:.0f}MB", until=args.until)


def parse_until(text: str, now: datetime.datetime | None = None) -> float:
    """`--until`'s value as a POSIX time: `HH:MM` (its next occurrence, today or tomorrow, local time) or
    an ISO date and time (`2026-12-07T19:40`). Raises `argparse.ArgumentTypeError` (a usage error) otherwise."""
    now = now or datetime.datetime.now()
    try:
        if re.fullmatch(r"\d{1,2}:\d{2}", text):
            clock = datetime.time.fromisoformat(text.zfill(5))
            moment = datetime.datetime.combine(now.date(), clock)
            if moment <= now:
                moment += datetime.timedelta(days=1)
        else:
            moment = datetime.datetime.fromisoformat(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected HH:MM or an ISO date and time such as 2026-12-07T19:40, got {text!r}") from err
    return moment.timestamp()


def add_until_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--until", type=parse_until, default=None, metavar="HH:MM",
                        help="finish by this time (HH:MM, or an ISO date and time): a configuration starts only if the "
                        "longest one of this run so far would still end before it; the rest are left for `--missing` "
                        "(at the same commit). A configuration is never cut off, so the results file stays whole.")


def run_workers(script: str, configs: list[dict[str, Any]], out: Path, key: Callable[[dict[str, Any]], str],
                render: Callable[[list[dict[str, Any]]], str], describe: Callable[[dict[str, Any]], str],
                until: float | None = None) -> int:
    """Run each configuration as `script --worker CFG` in its own process; after each, replace its
    record (by `key`) in the results file `out`, regenerate `out`'s .md with `render` and print
    `describe(record)`. A failed configuration is reported and skipped; returns 1 if any failed.
    With `until` (a POSIX time) a configuration starts only if the longest one so far (none yet: 0 s)
    would end before it; the ones left are named in one printed line."""
    failed, longest = 0, 0.0
    for done, cfg in enumerate(configs):
        if until is not None and time.time() + longest > until:
            left = len(configs) - done
            print(f"--until {time.strftime('%Y-%m-%d %H:%M', time.localtime(until))}: stopped before {left} of "
                  f"{len(configs)} configurations (the longest so far took {longest:.0f} s); continue them with "
                  "--missing at this commit", flush=True)
            break
        began = time.time()
        proc = subprocess.run([sys.executable, script, "--worker", json.dumps(cfg)], capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"FAILED {key(cfg)}\n{proc.stderr[-3000:]}", flush=True)
            failed += 1
            continue
        record = stamp(json.loads(lines[-1][len("RESULT "):]))
        records = [r for r in load_results(out) if r["key"] != record["key"]] + [record]
        out.write_text(json.dumps(records, indent=1) + "\n")
        out.with_suffix(".md").write_text(render(records))
        print(describe(record), flush=True)
        longest = max(longest, time.time() - began)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
