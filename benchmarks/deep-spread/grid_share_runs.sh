#!/bin/bash
# Repeated heart-disease benchmark runs of tvae and ddpm, federated at epsilon 3 (seeds
# 0-2, secret noise), at one quantile-grid share; one summary line per run and setting
# (grid_share_summary.py) appended to SUMMARY; the kept site files (real rows) deleted
# after each run. The share is the study default, so this script SETS
# common/quantile_grid.py's DEFAULT_GRID_SHARE in this working tree (a benchmark-only
# edit: `git checkout common/quantile_grid.py` restores it).
#
#   bash benchmarks/deep-spread/grid_share_runs.sh SHARE RUNS TAG SUMMARY
#   python benchmarks/deep-spread/grid_share_table.py SUMMARY
set -euo pipefail
export OMP_NUM_THREADS=1
SH=$1; N=$2; TAG=$3; SUMMARY=$4
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
sed -i "s/^DEFAULT_GRID_SHARE = .*/DEFAULT_GRID_SHARE = $SH/" "$ROOT/common/quantile_grid.py"
for i in $(seq 1 "$N"); do
  OUT=$(mktemp -d)/${TAG}_sh${SH}_r$i
  "$ROOT/.venv/bin/fedsynth" benchmark --generators tvae,ddpm --epsilons 3 \
    --only tvae/federated/eps3,ddpm/federated/eps3 --seeds 3 --no-ray-check \
    --no-anonymeter --keep-work --out "$OUT" > "$OUT.log" 2>&1
  "$ROOT/.venv/bin/python" "$HERE/grid_share_summary.py" "$SH" "$OUT" >> "$SUMMARY"
  rm -rf "$OUT/work"
done
