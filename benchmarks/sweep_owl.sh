#!/usr/bin/env bash
# The sweep behind OWLModifier's M and λ (BENCHMARKS.md). Same validation setup as
# sweep_defaults.sh: calibration on four novels, perplexity on Persuasion, never on
# Pride and Prejudice (the README's test text). The method swept is the product,
# OWL + Wanda + DSnoT (defaults), at 70%: first λ at the paper's M = 5, then M at the
# best λ found, then λ again at the best M (0.2 too if 0.16 wins), then M again at the best
# λ, then steps past the best M and λ up to λ's bound, then M again; last, λ for SparseGPT
# as the pruner, alone and with DSnoT; then both pruners' λ again at 80%, with DSnoT after
# each. Every configuration is one `dsnot bench` row (--tag) in runs/sweep_owl.json; rerun
# to resume. Extra arguments go to every `dsnot bench` call.
set -euo pipefail
cd "$(dirname "$0")/.."
dsnot=${DSNOT:-${DSNOT_VENV:-.venv}/bin/dsnot}
python=${PYTHON:-${DSNOT_VENV:-.venv}/bin/python}
out=${SWEEP_JSON:-runs/sweep_owl.json}
sparsity=${SPARSITY:-0.7}
mkdir -p "$(dirname "$out")"
setup=(--calib-text emma --calib-text mansfieldpark --calib-text northangerabbey
       --calib-text sensesensibility --eval-text persuasion --calib-samples "${CALIB_SAMPLES:-32}"
       --json "$out" --resume)
common=(--sparsities "$sparsity" "${setup[@]}" "$@")
"$dsnot" bench --methods wanda+dsnot --tag "uniform" "${common[@]}"
for lam in 0.04 0.08 0.16; do
  "$dsnot" bench --methods owl-wanda+dsnot --owl-m 5 --owl-lambda "$lam" --tag "M5 l$lam" "${common[@]}"
done
# best TAGPREFIX TAGSUFFIX: the tag (its part between the two) of the best OWL row whose
# tag starts and ends so
best() {
  "$python" - "$out" "$sparsity" "$1" "$2" <<'PY'
import json, sys
out, sparsity, prefix, suffix = sys.argv[1:]
rows = [r for r in json.load(open(out))
        if r["method"] == "owl-wanda+dsnot" and r["sparsity"] == sparsity
        and r["params"].get("tag", "").startswith(prefix) and r["params"]["tag"].endswith(suffix)]
tag = min(rows, key=lambda r: r["ppl"]["persuasion"])["params"]["tag"]
print(tag[len(prefix):len(tag) - len(suffix)])
PY
}
lam=$(best "M5 l" "")
echo "best λ at M=5: $lam"
for m in 3 10 20; do
  "$dsnot" bench --methods owl-wanda+dsnot --owl-m "$m" --owl-lambda "$lam" --tag "M$m l$lam" "${common[@]}"
done
# M = 10 was the best of 3, 5, 10, at the edge of the range: M = 20 above it, then 15
# if 10 is still the best; then λ again at the best M.
if [ "$(best M " l$lam")" = 10 ]; then
  "$dsnot" bench --methods owl-wanda+dsnot --owl-m 15 --owl-lambda "$lam" --tag "M15 l$lam" "${common[@]}"
fi
m=$(best M " l$lam")
echo "best M at λ=$lam: $m"
for l in 0.04 0.12 0.16; do
  "$dsnot" bench --methods owl-wanda+dsnot --owl-m "$m" --owl-lambda "$l" --tag "M$m l$l" "${common[@]}"
done
lam=$(best "M$m l" "")
# λ = 0.16 was the best of 0.04 to 0.16 at M = 10, at the edge of the range: 0.2 above it
# (at 80% overall it can push a layer to 100%; the sweep is at 70%). Then M again at the
# best λ, since the two interact (M = 5 with λ = 0.16 was the worst setting).
if [ "$lam" = 0.16 ]; then
  "$dsnot" bench --methods owl-wanda+dsnot --owl-m "$m" --owl-lambda 0.2 --tag "M$m l0.2" "${common[@]}"
  lam=$(best "M$m l" "")
fi
echo "best λ at M=$m: $lam"
for m2 in 5 10 15 20; do
  "$dsnot" bench --methods owl-wanda+dsnot --owl-m "$m2" --owl-lambda "$lam" --tag "M$m2 l$lam" "${common[@]}"
done
m=$(best M " l$lam")
echo "best M at λ=$lam: $m"
# M = 20 with λ = 0.2 was the best, at the edge of both ranges: one step past each
if [ "$m" = 20 ] && [ "$lam" = 0.2 ]; then
  "$dsnot" bench --methods owl-wanda+dsnot --owl-m 30 --owl-lambda 0.2 --tag "M30 l0.2" "${common[@]}"
  "$dsnot" bench --methods owl-wanda+dsnot --owl-m 20 --owl-lambda 0.25 --tag "M20 l0.25" "${common[@]}"
  # λ = 0.25 did a little better (within the rounding spread): 0.3 above it
  if [ "$(best "M20 l" "")" = 0.25 ]; then
    "$dsnot" bench --methods owl-wanda+dsnot --owl-m 20 --owl-lambda 0.3 --tag "M20 l0.3" "${common[@]}"
  fi
  # λ = 0.3 did better again: 0.35 above it, the last step there is. At M = 20 a layer's
  # sparsity leaves (0, 1) above λ = 0.383 at 70% overall and 0.328 at 60%
  # (benchmarks/results/owl_lambda_bound_2026-12-02.json): λ = 0.4 cannot run at 70%, and a
  # default λ must stay below 0.328 to serve 0.6 to 0.8.
  if [ "$(best "M20 l" "")" = 0.3 ]; then
    "$dsnot" bench --methods owl-wanda+dsnot --owl-m 20 --owl-lambda 0.35 --tag "M20 l0.35" "${common[@]}"
  fi
  lam=$(best "M20 l" "")
  echo "best λ at M=20: $lam"
  # then M once more at that λ, on either side of 20
  for m2 in 15 30; do
    "$dsnot" bench --methods owl-wanda+dsnot --owl-m "$m2" --owl-lambda "$lam" --tag "M$m2 l$lam" "${common[@]}"
  done
fi
# SparseGPT as the pruner (the test matrix found OWL worse than uniform for SparseGPT at 70%
# with the Wanda-chosen λ): uniform against OWL at M = 20 and three λ, the pruner alone and
# with DSnoT (best() above reads the Wanda rows only).
"$dsnot" bench --methods sparsegpt,sparsegpt+dsnot --tag "uniform" "${common[@]}"
for l in 0.1 0.2 0.3; do
  "$dsnot" bench --methods owl-sparsegpt,owl-sparsegpt+dsnot --owl-m 20 --owl-lambda "$l" --tag "M20 l$l" "${common[@]}"
done
# Last, λ at 80% too, where the test matrix found λ's effect changes: uniform against OWL at
# M = 20 and the λ values the 70% sweep ended on, with DSnoT after each pruner (the product).
# OWLModifier's λ is the one with the lowest geometric mean, over 70% and 80%, of the
# product's perplexity over uniform's, for both pruners: 0.3.
at80=(--sparsities 0.8 "${setup[@]}" "$@")
"$dsnot" bench --methods wanda+dsnot,sparsegpt+dsnot --tag "uniform" "${at80[@]}"
for l in 0.2 0.3; do
  "$dsnot" bench --methods owl-wanda+dsnot --owl-m 20 --owl-lambda "$l" --tag "M20 l$l" "${at80[@]}"
done
for l in 0.1 0.2 0.3; do
  "$dsnot" bench --methods owl-sparsegpt+dsnot --owl-m 20 --owl-lambda "$l" --tag "M20 l$l" "${at80[@]}"
done
