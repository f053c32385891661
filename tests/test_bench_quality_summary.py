"""The README table of `bench/quality.py`: each D²Prune recipe is compared with the baselines of its
own variant: 2:4 with the ALPS-class 2:4 recipe (which has no allocation), and 2:4 + int4 only with
the int4 recipes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402

PPLS = {  # recipe stem -> perplexity of seeds 0 and 1
    "sparsegpt-2of4": (100.0, 110.0), "admm-refit-2of4": (80.0, 88.0), "d2prune-admm-2of4": (72.0, 77.0),
    "sparsegpt-2of4-w4": (150.0, 160.0), "admm-refit-2of4-w4": (120.0, 128.0), "d2prune-admm-2of4-w4": (96.0, 96.0),
}


def _records() -> list[dict[str, Any]]:
    return [{"key": f"recipes/{stem}.toml|2:4|seed={seed}", "recipe": f"recipes/{stem}.toml", "method": "x",
             "pattern": "2:4", "sparsity": 0.507, "seed": seed, "ppl": ppl, "wall_s": 100.0 * (1 + seed),
             "peak_rss_mb": 1.0, "calibration": "c4", "evaluation": "test", "options": {}}
            for stem, ppls in PPLS.items() for seed, ppl in enumerate(ppls)]


def _row(lines: list[str], name: str) -> list[str]:
    return next(line for line in lines if line.startswith(f"| {name} |")).strip("|").split(" | ")


def test_summary_compares_each_variant_with_its_own_baselines() -> None:
    lines = quality.summary_table(quality.aggregate(_records()))
    header = [c.strip() for c in lines[2].strip("|").split(" | ")]
    plain, int4 = _row(lines, "2:4"), _row(lines, "2:4 + int4")
    column = dict(zip(header, range(len(header))))
    alps = column["best D²Prune / ALPS-class"]
    assert plain[column["best D²Prune"]] == "d2prune-admm-2of4" and int4[column["best D²Prune"]] == "d2prune-admm-2of4-w4"
    assert plain[alps] == f"{(72 / 80 + 77 / 88) / 2:.3f} ± {quality.mean_std([72 / 80, 77 / 88])[1]:.3f}"
    assert int4[alps] == f"{(96 / 120 + 96 / 128) / 2:.3f} ± {quality.mean_std([96 / 120, 96 / 128])[1]:.3f}"
    assert int4[column["SparseGPT"]].startswith("155.00")


def test_ratio_lines_never_pair_int4_with_plain_2of4() -> None:
    rows = [line.strip("|").split(" | ") for line in quality.ratio_lines(quality.aggregate(_records())) if line.startswith("| d2prune")]
    pairs = {(r[0].strip(), r[1]) for r in rows}
    assert pairs == {("d2prune-admm-2of4", "sparsegpt-2of4"), ("d2prune-admm-2of4", "admm-refit-2of4"),
                     ("d2prune-admm-2of4-w4", "sparsegpt-2of4-w4"), ("d2prune-admm-2of4-w4", "admm-refit-2of4-w4")}
