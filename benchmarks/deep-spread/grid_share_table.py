"""The issue-14 bars over repeated runs (``grid_share_runs.sh``): per grid share (and
code, by the run tag's prefix) and generator, the medians over runs and every run that
misses a bar (fidelity >= 0.90, TSTR >= 0.82, detection <= 0.90, each numeric column's
std ratio in [0.8, 1.25]; each run's figures are medians of seeds 0-2).

    python benchmarks/deep-spread/grid_share_table.py SUMMARY
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import numpy as np

rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines()]
groups = collections.defaultdict(list)
for r in rows:
    groups[(r["run"].split("_")[0], r["share"], r["setting"].split("/")[0])].append(r)
print("| code | grid share | generator | runs | fidelity | TSTR | detection | MIA | "
      "chol ratio | lowest ratio | highest ratio | runs missing a bar (which) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for (tag, share, gen), rs in sorted(groups.items()):
    fails = []
    for r in rs:
        miss = [f"fidelity {r['fidelity']:.3f}"] if r["fidelity"] < 0.90 else []
        miss += [f"TSTR {r['tstr_auroc']:.3f}"] if r["tstr_auroc"] < 0.82 else []
        miss += [f"detection {r['detection_auroc']:.3f}"] if r["detection_auroc"] > 0.90 else []
        miss += [f"{c} {v:.3f}" for c, v in r["ratios"].items() if not 0.8 <= v <= 1.25]
        if miss:
            fails.append(", ".join(miss))
    lo = min((v, c) for r in rs for c, v in r["ratios"].items())
    hi = max((v, c) for r in rs for c, v in r["ratios"].items())

    def med(key: str, rs: list = rs) -> float:
        return float(np.median([r[key] for r in rs]))

    chol = float(np.median([r["ratios"]["chol"] for r in rs]))
    print(f"| {tag} | {share} | {gen} | {len(rs)} | {med('fidelity'):.3f} | "
          f"{med('tstr_auroc'):.3f} | {med('detection_auroc'):.3f} | "
          f"{med('membership_inference_auroc'):.3f} | {chol:.2f} | {lo[0]:.2f} ({lo[1]}) | "
          f"{hi[0]:.2f} ({hi[1]}) | {len(fails)}"
          + (f" ({'; '.join(fails)})" if fails else "") + " |")
