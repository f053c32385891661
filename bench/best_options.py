"""Print the D²Prune options with the lowest WikiText-2 *valid* perplexity in bench/results/tuning.json
(lambda1 from d2-sparsegpt, no_update from d2prune-fixed, rho from d2prune-kl) as JSON."""

import json
import sys
from pathlib import Path

records = json.loads((Path(__file__).resolve().parent / "results" / "tuning.json").read_text())


def best(method: str, key: str):
    rows = [r for r in records if r["method"] == method and key in r["options"]]
    return min(rows, key=lambda r: r["ppl"])["options"][key] if rows else None


options = {"lambda1": best("d2-sparsegpt", "lambda1"), "no_update": best("d2prune-fixed", "no_update"), "rho": best("d2prune-kl", "rho")}
json.dump({k: v for k, v in options.items() if v is not None}, sys.stdout)
