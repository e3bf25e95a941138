"""Append one kept benchmark folder's rows to results.csv: the four scores, TRTR, the
epsilon spent and each numeric column's std ratio (from ``std_ratios.ratios``).

    .venv/bin/python benchmarks/deep-spread/append_results.py RUN_LABEL DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from std_ratios import ratios

HERE = Path(__file__).parent
label, out = sys.argv[1], Path(sys.argv[2])
table = pd.read_csv(HERE / "results.csv")
res = pd.read_csv(out / "results.csv")
rat = ratios(out)
rows = []
for _, r in res.iterrows():
    row = {"run": label, "dataset": r["dataset"], "seed": r["seed"], "setting": r["setting"]}
    for k in ("fidelity", "tstr_auroc", "detection_auroc", "cox_c_index", "trtr_auroc",
              "epsilon_max_site"):
        row[k] = r.get(k)
    mine = rat[(rat["seed"] == f"seed-{r['seed']}")
               & (rat["setting"] == r["setting"].replace("/", "_"))]
    for _, m in mine.iterrows():
        row[f"std_ratio_{m['column']}"] = m["ratio"]
    rows.append(row)
table = pd.concat([table, pd.DataFrame(rows)], ignore_index=True)
table.to_csv(HERE / "results.csv", index=False, float_format="%.4f")
print(pd.DataFrame(rows).round(3).to_string())
