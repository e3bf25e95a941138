#!/bin/bash
# Repeated heart-disease benchmark runs of tvae and ddpm, federated at epsilon 3 (seeds
# 0-2, secret noise) with the quantile grid summed under masks and its noise split
# H ways (honest-sites; docs/privacy.md "Distributed noise"); one summary line per run
# and setting (grid_share_summary.py, at the default grid share 0.5) appended to
# SUMMARY; the kept site files (real rows) deleted after each run.
#
#   bash benchmarks/deep-spread/masked_grid_runs.sh H RUNS TAG SUMMARY
#   python benchmarks/deep-spread/grid_share_table.py SUMMARY
set -euo pipefail
export OMP_NUM_THREADS=1
H=$1; N=$2; TAG=$3; SUMMARY=$4
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
for i in $(seq 1 "$N"); do
  OUT=$(mktemp -d)/${TAG}_h${H}_r$i
  "$ROOT/.venv/bin/fedsynth" benchmark --generators tvae,ddpm --epsilons 3 \
    --honest-sites "$H" --only tvae/federated/eps3/masks-h$H,ddpm/federated/eps3/masks-h$H \
    --seeds 3 --no-ray-check --no-anonymeter --keep-work --out "$OUT" > "$OUT.log" 2>&1
  "$ROOT/.venv/bin/python" "$HERE/grid_share_summary.py" 0.5 "$OUT" >> "$SUMMARY"
  rm -rf "$OUT/work"
done
