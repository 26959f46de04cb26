#!/usr/bin/env bash
# The sweep behind OWLModifier's M and λ (BENCHMARKS.md). Same validation setup as
# sweep_defaults.sh: calibration on four novels, perplexity on Persuasion, never on
# Pride and Prejudice (the README's test text). The method swept is the product,
# OWL + Wanda + DSnoT (defaults), at 70%: first λ at the paper's M = 5, then M at the
# best λ found. Every configuration is one `dsnot bench` row (--tag) in
# runs/sweep_owl.json; rerun to resume. Extra arguments go to every `dsnot bench` call.
set -euo pipefail
cd "$(dirname "$0")/.."
dsnot=${DSNOT:-${DSNOT_VENV:-.venv}/bin/dsnot}
python=${PYTHON:-${DSNOT_VENV:-.venv}/bin/python}
out=${SWEEP_JSON:-runs/sweep_owl.json}
sparsity=${SPARSITY:-0.7}
mkdir -p "$(dirname "$out")"
common=(--calib-text emma --calib-text mansfieldpark --calib-text northangerabbey
        --calib-text sensesensibility --eval-text persuasion --calib-samples "${CALIB_SAMPLES:-32}"
        --sparsities "$sparsity" --json "$out" --resume "$@")
"$dsnot" bench --methods wanda+dsnot --tag "uniform" "${common[@]}"
for lam in 0.04 0.08 0.16; do
  "$dsnot" bench --methods owl-wanda+dsnot --owl-m 5 --owl-lambda "$lam" --tag "M5 l$lam" "${common[@]}"
done
best=$("$python" - "$out" "$sparsity" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))
        if r["method"] == "owl-wanda+dsnot" and r["sparsity"] == sys.argv[2]
        and r["params"].get("tag", "").startswith("M5 l")]
print(min(rows, key=lambda r: r["ppl"]["persuasion"])["params"]["tag"][len("M5 l"):])
PY
)
echo "best λ at M=5: $best"
for m in 3 10 20; do
  "$dsnot" bench --methods owl-wanda+dsnot --owl-m "$m" --owl-lambda "$best" --tag "M$m l$best" "${common[@]}"
done
# M = 10 was best of 3, 5, 10, at the edge of the range: M = 20 above it, then 15 if 20
# is not better; then λ again at the best M.
bestm=$("$python" - "$out" "$sparsity" "$best" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))
        if r["method"] == "owl-wanda+dsnot" and r["sparsity"] == sys.argv[2]
        and r["params"].get("tag", "").endswith(" l" + sys.argv[3])]
print(min(rows, key=lambda r: r["ppl"]["persuasion"])["params"]["tag"].split()[0][1:])
PY
)
if [ "$bestm" = 10 ]; then
  "$dsnot" bench --methods owl-wanda+dsnot --owl-m 15 --owl-lambda "$best" --tag "M15 l$best" "${common[@]}"
fi
bestm=$("$python" - "$out" "$sparsity" "$best" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))
        if r["method"] == "owl-wanda+dsnot" and r["sparsity"] == sys.argv[2]
        and r["params"].get("tag", "").endswith(" l" + sys.argv[3])]
print(min(rows, key=lambda r: r["ppl"]["persuasion"])["params"]["tag"].split()[0][1:])
PY
)
echo "best M at λ=$best: $bestm"
for lam in 0.04 0.12; do
  "$dsnot" bench --methods owl-wanda+dsnot --owl-m "$bestm" --owl-lambda "$lam" --tag "M$bestm l$lam" "${common[@]}"
done
