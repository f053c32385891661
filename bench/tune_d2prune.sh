#!/usr/bin/env bash
# Hyperparameter search for D²Prune on WikiText-2 *valid* (never test): 60% unstructured (stages 1-3)
# and 2:4 (stage 4), the quality.py protocol (C4, 32 x 512 calibration tokens), 16 validation windows.
# Results: bench/results/tuning.json and tuning.md. bench/run_d2prune.sh reads the best settings.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
Q="$PY bench/quality.py --eval valid --windows 16 --patterns 0.6 --results bench/results/tuning.json"
STAGES=${STAGES:-"1 2 3 4"}
if [[ $STAGES == *1* ]]; then  # the dual-Taylor weight (the activation terms scale as lambda1 / s^2)
  $Q --methods sparsegpt
  for l1 in 1 10 100 300 1000; do $Q --methods d2-sparsegpt --options "{\"lambda1\": $l1}"; done
fi
if [[ $STAGES == *2* ]]; then  # which projection to leave un-updated in every block
  for p in v k q; do $Q --methods d2prune-fixed --options "{\"lambda1\": 100, \"no_update\": [\"$p\"]}"; done
fi
if [[ $STAGES == *3* ]]; then  # the KL weight rho of the per-block choice
  for rho in 0.3 1.0 3.0; do $Q --methods d2prune-kl --options "{\"lambda1\": 100, \"rho\": $rho}"; done
fi
if [[ $STAGES == *4* ]]; then  # 2:4: the per-block choice's rho, candidate set and scoring samples
  Q24="${Q/--patterns 0.6/--patterns 2:4}"
  $Q24 --methods sparsegpt
  for rho in 0.3 1.0 3.0; do $Q24 --methods d2prune-kl --options "{\"lambda1\": 100, \"rho\": $rho}"; done
  $Q24 --methods d2prune-kl --options '{"lambda1": 100, "rho": 1.0, "candidates": "all"}'
  $Q24 --methods d2prune-kl --options '{"lambda1": 100, "rho": 1.0, "selection": "holdout"}'
fi
