#!/bin/bash
# Repeated TCGA-BRCA benchmark runs of tvae federated at epsilon 3 (seeds 0-2, secret
# noise); for each run, the Cox C-index of every seed with the penalty fixed at 0.01 and
# chosen by cross-validation (tcga_cox_cv.py), appended to SUMMARY as one JSON line; the
# kept work folder (real rows) is deleted after each run. Issue 14, seventh pass.
#
#   bash benchmarks/deep-spread/tcga_runs.sh RUNS TAG SUMMARY
set -euo pipefail
export OMP_NUM_THREADS=1
N=$1; TAG=$2; SUMMARY=$3
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
for i in $(seq 1 "$N"); do
  OUT=$(mktemp -d)/${TAG}_r$i
  "$ROOT/.venv/bin/fedsynth" benchmark --dataset tcga_brca --generators tvae --epsilons 3 \
    --only tvae/federated/eps3 --seeds 3 --no-ray-check --no-anonymeter --keep-work \
    --out "$OUT" > "$OUT.log" 2>&1
  "$ROOT/.venv/bin/python" "$HERE/tcga_cox_cv.py" "$OUT/work" --jsonl "$SUMMARY" \
    --tag "${TAG}_r$i" 2>/dev/null | tail -1
  rm -rf "$OUT/work"
done
