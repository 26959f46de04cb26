#!/usr/bin/env bash
# The sweep behind DSnoTModifier's defaults (BENCHMARKS.md). Validation text:
# Persuasion, held out from calibration (the other four novels that are not Pride
# and Prejudice); Pride and Prejudice, the README's test text, plays no part here.
# Every configuration is one `dsnot bench` row (--tag) in runs/sweep.json; rerun
# to resume after an interruption. Extra arguments go to every `dsnot bench` call.
set -euo pipefail
cd "$(dirname "$0")/.."
dsnot=${DSNOT:-${DSNOT_VENV:-.venv}/bin/dsnot}
out=${SWEEP_JSON:-runs/sweep.json}
mkdir -p "$(dirname "$out")"
common=(--calib-text emma --calib-text mansfieldpark --calib-text northangerabbey
        --calib-text sensesensibility --eval-text persuasion --calib-samples "${CALIB_SAMPLES:-32}"
        --json "$out" --resume "$@")
attn="re:.*self_attn.*"
row() {  # row TAG METHOD SPARSITY [DSnoT options...]
  local tag=$1 method=$2 sparsity=$3; shift 3
  "$dsnot" bench --methods "$method" --sparsities "$sparsity" --tag "$tag" "${common[@]}" "$@"
}
for s in 0.6 2:4; do
  row "baseline" wanda "$s"
  row "gram c50" wanda+dsnot "$s" --objective gram --max-cycles 50
  row "gram c200" wanda+dsnot "$s" --objective gram --max-cycles 200
  row "mean paper" wanda+dsnot "$s" --objective mean
done
row "gram c100" wanda+dsnot 0.6 --objective gram --max-cycles 100
row "gram c1000" wanda+dsnot 0.6 --objective gram --max-cycles 1000
row "gram c50 attn" wanda+dsnot 0.6 --objective gram --max-cycles 50 --dsnot-targets "$attn"
row "mean attn" wanda+dsnot 0.6 --objective mean --dsnot-targets "$attn"
row "mean p0" wanda+dsnot 0.6 --objective mean --var-power 0
row "mean global var" wanda+dsnot 0.6 --objective mean --variance global
row "mean sign on" wanda+dsnot 0.6 --objective mean --sign-check on
row "mean thr0" wanda+dsnot 0.6 --objective mean --threshold 0
row "baseline" sparsegpt 0.6
row "gram c50" sparsegpt+dsnot 0.6 --objective gram --max-cycles 50
row "gram c200" sparsegpt+dsnot 0.6 --objective gram --max-cycles 200
