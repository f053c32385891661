#!/usr/bin/env bash
# The full quality benchmark (issues: compiler core and D²Prune), one command, on WikiText-2 *test*,
# with the D²Prune settings chosen on WikiText-2 valid by bench/tune_d2prune.sh (unstructured: at
# 60%; 2:4: its own search):
#   1. the README table: `bench/quality.py --suite --fresh`, the shipped recipes (dense, Wanda, SparseGPT
#      with and without a layer-wise allocation, D²Prune) with 1-3 disjoint C4 calibration sets each, one
#      run, so wall times are side by side (METHODS_TABLE=1: the older method-by-method table instead);
#   2. the distribution-shift table: calibrate on builtin:python-docs, evaluate on WikiText-2 test;
#   3. attention fidelity per block (KL and attention-output RMSE vs dense) at 60%, with a PNG plot.
# METHODS=sparsegpt,d2prune-kl STAGES=1 reruns a subset (dense is kept when listed).
# --smoke: every stage on the tiny model with dense, SparseGPT and D²Prune-KL at 60% only (bench/protocol.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SMOKE=""
if [[ "${1:-}" == "--smoke" ]]; then
  SMOKE="--smoke"
  export D2C_BENCH_SMOKE=${D2C_BENCH_SMOKE:-$(mktemp -d -t d2c-bench-smoke-XXXXXX)}
  METHODS=${METHODS:-dense,sparsegpt,d2prune-kl}
fi
OPTIONS=${OPTIONS:-$($PY bench/best_options.py $SMOKE)}
OPTIONS_24=${OPTIONS_24:-$($PY bench/best_options.py --pattern 2:4 $SMOKE)}
METHODS=${METHODS:-dense,magnitude,wanda,sparsegpt,d2-sparsegpt,d2prune-fixed,d2prune-kl}
PATTERNS=$( [[ -n $SMOKE ]] && echo 0.6 || echo 0.5,0.6,0.7 )
STAGES=${STAGES:-"1 2 3"}
echo "D2Prune options (chosen on WikiText-2 valid): unstructured $OPTIONS; 2:4 $OPTIONS_24"
if [[ $STAGES == *1* ]]; then
  if [[ -n $SMOKE || -n ${METHODS_TABLE:-} ]]; then  # the method-by-method table (the smoke run: a few methods at 60%)
    $PY bench/quality.py $SMOKE --methods "$METHODS" --patterns "$PATTERNS" --options "$OPTIONS"
    [[ -n $SMOKE ]] || $PY bench/quality.py --methods "${METHODS/dense,/}" --patterns 2:4 --options "$OPTIONS_24"
  else  # the README table: the shipped recipes, 1-3 calibration seeds each, in one fresh run
    $PY bench/quality.py --suite --fresh
  fi
fi
if [[ $STAGES == *2* ]]; then
  $PY bench/quality.py $SMOKE --calibration python-docs --methods "$( [[ -n $SMOKE ]] && echo sparsegpt || echo wanda,sparsegpt,d2prune-kl )" \
    --patterns "$( [[ -n $SMOKE ]] && echo 0.6 || echo 0.6,0.7 )" --options "$OPTIONS"
fi
if [[ $STAGES == *3* ]]; then
  $PY bench/attention_fidelity.py $SMOKE --methods sparsegpt,d2-sparsegpt,d2prune-kl --options "$OPTIONS"
fi
