"""Collect kept benchmark folders into results-nodp.csv and print the per-run medians
(the table of results-nodp.md): federated tvae without DP against SDV's TVAE.

    .venv/bin/python benchmarks/deep-spread/nodp_table.py LABEL=DIR [LABEL=DIR ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).parent
KEYS = ("fidelity", "tstr_auroc", "detection_auroc", "trtr_auroc", "epsilon_max_site")

frames = []
for arg in sys.argv[1:]:
    label, folder = arg.split("=", 1)
    res = pd.read_csv(Path(folder) / "results.csv")
    frames.append(res[["dataset", "seed", "setting", *KEYS]].assign(run=label))
table = pd.concat(frames, ignore_index=True)[["run", "dataset", "seed", "setting", *KEYS]]
table.to_csv(HERE / "results-nodp.csv", index=False, float_format="%.4f")
for (run, setting), g in table.groupby(["run", "setting"], sort=False):
    cells = []
    for key in ("fidelity", "tstr_auroc", "detection_auroc"):
        per_seed = " / ".join(f"{v:.3f}" for v in g.sort_values("seed")[key])
        cells.append(f"{g[key].median():.3f} ({per_seed})")
    print(f"| {run} | {setting} | " + " | ".join(cells) + " |")
