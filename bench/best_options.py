"""Print the D²Prune options with the lowest WikiText-2 *valid* perplexity in the results folder's
tuning.json, as JSON. Unstructured (default): lambda1 from d2-sparsegpt, no_update from d2prune-fixed
and rho from d2prune-kl, all searched at 60%. `--pattern 2:4`: the options of the best d2prune-kl
record searched at 2:4 (rho, candidates, selection), with no_update from the unstructured search.
`--smoke` reads the smoke run's tuning.json (an empty object when there is none)."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import add_smoke_flag, results_dir, smoke  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--pattern", default="unstructured", choices=["unstructured", "2:4"])
add_smoke_flag(parser)
args = parser.parse_args()
if args.smoke and not smoke():
    raise SystemExit("--smoke: run this inside a smoke run (D2C_BENCH_SMOKE names its folder), e.g. from run_d2prune.sh --smoke")
path = results_dir() / "tuning.json"
records = json.loads(path.read_text()) if path.exists() or not smoke() else []


def best_record(method: str, pattern: str, key: str | None = None):
    rows = [r for r in records if r["method"] == method and r["pattern"] == pattern and (key is None or key in r["options"])]
    return min(rows, key=lambda r: r["ppl"]) if rows else None


def best(method: str, key: str):
    row = best_record(method, "unstructured", key)
    return row["options"][key] if row else None


options = {"lambda1": best("d2-sparsegpt", "lambda1"), "no_update": best("d2prune-fixed", "no_update"), "rho": best("d2prune-kl", "rho")}
if args.pattern == "2:4":
    row = best_record("d2prune-kl", "2:4")
    if row is not None:
        options.update(row["options"])
json.dump({k: v for k, v in options.items() if v is not None}, sys.stdout)
