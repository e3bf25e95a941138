"""The repeated TCGA-BRCA runs of ``tcga_runs.sh`` as a per-seed CSV and a markdown table:
per run, the C-index of seeds 0-2 and their median with the Cox penalty fixed at 0.01
and chosen by cross-validation, and over the runs: the median of the run medians and
how many runs fall below the bar (0.60). Issue 14, seventh pass.

    python benchmarks/deep-spread/tcga_runs_table.py tcga-runs.jsonl tcga-runs.csv
"""

import json
import statistics
import sys

import pandas as pd

with open(sys.argv[1]) as f:
    runs = [json.loads(line) for line in f if line.strip()]
rows = [{"run": r["tag"], "setting": r["setting"], **s} for r in runs for s in r["seeds"]]
pd.DataFrame(rows).to_csv(sys.argv[2], index=False)
print("| run | C-index per seed, penalty 0.01 (median) | penalty by CV (median) | CV's picks |")
print("|---|---|---|---|")
for r in runs:
    f = " / ".join(f"{s['syn_fixed']:.3f}" for s in r["seeds"])
    c = " / ".join(f"{s['syn_cv']:.3f}" for s in r["seeds"])
    p = " / ".join(f"{s['pen_syn']:g}" for s in r["seeds"])
    print(f"| {r['tag']} | {f} ({r['medians']['syn_fixed']:.3f}) | {c} "
          f"({r['medians']['syn_cv']:.3f}) | {p} |")
for key in ("syn_fixed", "syn_cv"):
    meds = [r["medians"][key] for r in runs]
    print(f"\n{key}: {len(meds)} runs, median of run medians {statistics.median(meds):.3f}, "
          f"range {min(meds):.3f}-{max(meds):.3f}, runs below 0.60: "
          f"{sum(m < 0.60 for m in meds)}", end="")
print(f"\nreal reference (seeds 0-2): penalty 0.01 {runs[0]['medians']['real_fixed']:.3f}, "
      f"by CV {runs[0]['medians']['real_cv']:.3f}")
frame = pd.DataFrame(rows)
print("\nper seed over the runs (penalty 0.01 / by CV): median, std, lowest")
for seed, g in frame.groupby("seed"):
    print(f"seed {seed}: " + "; ".join(
        f"{g[k].median():.3f}, {g[k].std():.3f}, {g[k].min():.3f}"
        for k in ("syn_fixed", "syn_cv")))
