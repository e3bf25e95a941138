#!/bin/bash
# Issue 16, third pass: the deployment drill (3 heart sites x 2 rounds, TVAE 16/4) deployed
# and simulated, before and after, in one session, alternating. Each tree runs from a
# frozen copy laid out as an installed package (PYTHONPATH=COPY/pkg, cwd outside the
# checkout), so a commit made meanwhile cannot change what is measured:
#   COPY/src = `git archive <commit>`; COPY/pkg/fedsynth = src/fedsynth + src/{common,client,
#   server,simulations} + src/pyproject.toml (what the editable install maps).
# before = main 50157ef, after = branch s3-16; "cold" = the after code with Flower's
# default isolation (a cold ClientApp process per message, --flower-isolation).
# Usage: drill.sh BEFORE_COPY AFTER_COPY OUT   (run with the project's venv python on PATH)
# (The recorded session ran the cold arm for i = 0 and 1 only.)
set -u
BEFORE=$1 AFTER=$2 OUT=$3
export OMP_NUM_THREADS=1
PY=${PY:-python}
mkdir -p "$OUT"
for i in 0 1 2; do
  for tree in before after; do
    COPY=$BEFORE; [ $tree = after ] && COPY=$AFTER
    echo "== $tree $i $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
    (cd "$COPY" && PYTHONPATH="$COPY/pkg" $PY "$COPY/pkg/fedsynth/simulations/benchmark_speed.py" \
      drill --repeats 1 --study-dir "$OUT/$tree-$i" --out "$OUT/$tree-$i.json" | grep '"run"')
  done
  echo "== cold $i $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
  rm -rf "$OUT/cold-$i"
  S=$(date +%s.%N)
  (cd "$AFTER" && PYTHONPATH="$AFTER/pkg" $PY -m fedsynth.simulations.deploy \
    --sites cleveland,hungarian,va --rounds 2 --generator-params '{"hidden":16,"latent":4}' \
    --flower-isolation --out "$OUT/cold-$i" > "$OUT/cold-$i.log" 2>&1)
  E=$(date +%s.%N)
  echo "{\"run\": \"deployed-cold\", \"i\": $i, \"command_s\": $(echo "$E - $S" | bc), \"federated_s\": $(grep -o 'federated seconds [0-9.]*' "$OUT/cold-$i.log" | cut -d' ' -f3)}"
done
echo "== done $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
