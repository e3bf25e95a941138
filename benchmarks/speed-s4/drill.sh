#!/bin/bash
# Issue 16, fourth pass: the deployment drill (3 heart sites x 2 rounds, TVAE 16/4)
# simulated and deployed, before and after, three times, alternating, in one session;
# every run through timeline.py, which stamps each log line of each process, so the
# same runs give the medians and the timeline. Each tree runs from a frozen copy laid
# out as an installed package (PYTHONPATH=COPY/pkg, cwd = the copy), as speed-s3/drill.sh:
#   COPY/src = `git archive <commit>`; COPY/pkg/fedsynth = src/fedsynth +
#   src/{common,client,server,simulations} + src/pyproject.toml.
# before = main 78de280, after = branch s4-16.
# Usage: drill.sh BEFORE_COPY AFTER_COPY OUT   (PY: the project's venv python)
set -u
BEFORE=$1 AFTER=$2 OUT=$3
export OMP_NUM_THREADS=1
PY=${PY:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
for i in 0 1 2; do
  for tree in before after; do
    COPY=$BEFORE; [ $tree = after ] && COPY=$AFTER
    for kind in simulated deployed; do
      echo "== $tree $kind $i $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
      (cd "$COPY" && $PY "$HERE/timeline.py" $kind "$OUT/$tree-$kind-$i" --python "$PY" \
        --pythonpath "$COPY/pkg" | tail -1)
    done
  done
done
echo "== done $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
