#!/usr/bin/env bash
# Hyperparameter search for D²Prune on WikiText-2 *valid* (never test): 60% unstructured, the
# quality.py protocol with 16 validation windows. Results: bench/results/tuning.json / tuning.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
Q="$PY bench/quality.py --eval valid --windows 16 --patterns ${PATTERNS:-0.6} --results bench/results/tuning.json"
$Q --methods sparsegpt
for l1 in 1 10 100; do $Q --methods d2-sparsegpt --options "{\"lambda1\": $l1}"; done
# which projection to leave un-updated (fixed, every block), and the KL-chosen plan
if [ "${STAGE2:-1}" = 1 ]; then
  for p in q k v; do $Q --methods d2prune-fixed --options "{\"lambda1\": 1, \"no_update\": [\"$p\"]}"; done
  $Q --methods d2prune-kl --options '{"lambda1": 1, "rho": 1.0}'
fi
