"""The README table of `bench/quality.py`: each D²Prune recipe is compared with the baselines of its
own variant: 2:4 with the ALPS-class 2:4 recipe (which has no allocation), and 2:4 + int4 only with
the int4 recipes."""

from __future__ import annotations

import math
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


def test_gain_shares_telescope_to_the_total_and_name_what_they_merge() -> None:
    chain = {"sparsegpt-unstructured-70": 400.0, "sparsegpt-alloc-unstructured-70": 200.0,
             "sparsegpt-alloc-refit-unstructured-70": 160.0, "admm-alloc-refit-unstructured-70": 100.0,
             "d2prune-admm-unstructured-70": 80.0}
    records = _records() + [{"key": f"recipes/{stem}.toml|0.7|seed={seed}", "recipe": f"recipes/{stem}.toml", "method": "x",
                             "pattern": "unstructured", "sparsity": 0.7, "seed": seed, "ppl": ppl, "wall_s": 1.0,
                             "peak_rss_mb": 1.0, "calibration": "c4", "evaluation": "test", "options": {}}
                            for stem, ppl in chain.items() for seed in ((0,) if stem == "sparsegpt-alloc-refit-unstructured-70" else (0, 1))]
    lines = quality.gain_shares(quality.aggregate(records))
    seventy, plain = _row(lines, "70%"), _row(lines, "2:4")
    assert seventy[1] == "0.200" and seventy[-1].strip() == "d2prune-admm-unstructured-70"
    steps = seventy[2:6]  # allocation, refit, ALPS-class, D²Prune's own: ratios 0.5, 0.8, 0.625, 0.8 of ln(0.2)
    assert [s.split(" ")[0] for s in steps] == ["0.500", "0.800", "0.625", "0.800"]
    # the SparseGPT + refit row has one seed, the others two: the two cells it takes part in say so
    assert [s.split("(")[1].rstrip(")") for s in steps] == ["43%", "14%; seeds 2→1", "29%; seeds 1→2", "14%"]
    assert plain[2] == "n/a (N:M)" and plain[3] == ""  # 2:4 has no allocation; its refit step is not measured here
    assert plain[4] == f"{84 / 105:.3f} ({math.log(84 / 105) / math.log(74.5 / 105):.0%}; not separated: refit)"
