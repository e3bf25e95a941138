"""Collect the eighth pass's TCGA-BRCA benchmark runs into results.csv (one row per seed
and setting) and print the per-seed table and medians (results.md "Eighth pass").

Usage: python table.py OUT_DIR=CODE ... (each a `fedsynth benchmark` / bench_params.py
--out folder and the code it ran: "base" (9b5bfb2), "before" (this branch, prognostic []) or
"after" (this branch)
"""

import csv
import statistics
import sys
from pathlib import Path

# the real training rows' C-index on each seed's holdout, with the same cross-validated
# penalty (tcga_probe.py's "real"; the benchmark's own reference, the same split)
REAL = dict(enumerate([0.771, 0.795, 0.748, 0.676, 0.700, 0.787, 0.795, 0.706, 0.748,
                       0.732, 0.773, 0.807]))
rows = []
for arg in sys.argv[1:]:
    folder, code = arg.split("=")
    for r in csv.DictReader((Path(folder) / "results.csv").read_text().splitlines()):
        rows.append({"code": code, "run": Path(folder).name, "seed": int(r["seed"]),
                     "setting": r["setting"], "c_index": round(float(r["cox_c_index"]), 3),
                     "real_c_index": REAL[int(r["seed"])],
                     "fidelity": round(float(r["fidelity"]), 3),
                     "detection_auroc": round(float(r["detection_auroc"]), 3),
                     "epsilon_max_site": round(float(r["epsilon_max_site"]), 4)})
out = Path(__file__).with_name("results.csv")
with open(out, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
for code in ("base", "before", "after"):
    for setting in ("marginal/federated/eps3", "marginal/central/eps3"):
        got = sorted((r["seed"], r["c_index"]) for r in rows
                     if r["code"] == code and r["setting"] == setting)
        if not got:
            continue
        seeds = " ".join(f"{s}:{c:.3f}" for s, c in got)
        first = [c for s, c in got if s < 3]
        print(f"{code:6s} {setting:24s} {seeds}\n   median seeds 0-2 "
              f"{statistics.median(first):.3f}  all {len(got)}: "
              f"{statistics.median(c for _, c in got):.3f}  real "
              f"{statistics.median(REAL[s] for s, _ in got):.3f}")
