#!/usr/bin/env bash
# The full quality benchmark (issues: compiler core and D²Prune), one command, on WikiText-2 *test*,
# with the D²Prune settings chosen on WikiText-2 valid by bench/tune_d2prune.sh:
#   1. dense, magnitude, Wanda, SparseGPT, D²-SparseGPT, D²Prune-fixed, D²Prune-KL at 50/60/70% and 2:4
#      (C4 calibration, one run, so wall times are side by side);
#   2. the distribution-shift table: calibrate on builtin:python-docs, evaluate on WikiText-2 test;
#   3. attention fidelity per block (KL and attention-output RMSE vs dense) at 60%, with a PNG plot.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OPTIONS=${OPTIONS:-$($PY bench/best_options.py)}
echo "D2Prune options (chosen on WikiText-2 valid): $OPTIONS"
$PY bench/quality.py --methods dense,magnitude,wanda,sparsegpt,d2-sparsegpt,d2prune-fixed,d2prune-kl \
  --patterns 0.5,0.6,0.7,2:4 --options "$OPTIONS"
$PY bench/quality.py --calibration python-docs --methods wanda,sparsegpt,d2prune-kl --patterns 0.6,0.7 --options "$OPTIONS"
$PY bench/attention_fidelity.py --methods sparsegpt,d2-sparsegpt,d2prune-kl --options "$OPTIONS"
