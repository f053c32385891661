"""Print the D²Prune options with the lowest WikiText-2 *valid* perplexity in the results folder's
tuning.json, as JSON. Unstructured (default): lambda1 from d2-sparsegpt, no_update from d2prune-fixed
and rho from d2prune-kl, all searched at 60%. `--pattern 2:4`: the options of the best d2prune-kl
record searched at 2:4 (rho, candidates, selection), with no_update from the unstructured search.
`--smoke` reads the smoke run's tuning.json (an empty object when there is none).

tuning.json accumulates searches made at many commits; a search's rows are compared only with the
rows of the same search made at the commit of its newest row (an older commit's perplexities came
from other code), and that commit is printed to stderr."""

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


def commit_of(row: dict) -> str | None:
    return (row.get("provenance") or {}).get("commit")


def best_record(method: str, pattern: str, key: str | None = None):
    """The lowest-perplexity row of one search, among the rows made at the commit of its newest row."""
    rows = [r for r in records if r["method"] == method and r["pattern"] == pattern and (key is None or key in r["options"])]
    if not rows:
        return None
    newest = commit_of(rows[-1])  # rows are appended as they are measured
    overall = min(rows, key=lambda r: r["ppl"])
    rows = [r for r in rows if commit_of(r) == newest]
    chosen = min(rows, key=lambda r: r["ppl"])
    search = f"{method} {pattern}{f' {key}' if key else ''}"
    print(f"{search}: the best of {len(rows)} rows at {str(newest)[:12]}", file=sys.stderr)
    if overall is not chosen:
        print(f"{search}: note: {overall['options']} (ppl {overall['ppl']:.2f} at {str(commit_of(overall))[:12]}) was not "
              "re-measured at that commit; rerun bench/tune_d2prune.sh to compare them at one commit", file=sys.stderr)
    return chosen


def best(method: str, key: str):
    row = best_record(method, "unstructured", key)
    return row["options"][key] if row else None


options = {"lambda1": best("d2-sparsegpt", "lambda1"), "no_update": best("d2prune-fixed", "no_update"), "rho": best("d2prune-kl", "rho")}
if args.pattern == "2:4":
    row = best_record("d2prune-kl", "2:4")
    if row is not None:
        options.update(row["options"])
json.dump({k: v for k, v in options.items() if v is not None}, sys.stdout)
