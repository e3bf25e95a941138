"""One JSON line per setting of a kept benchmark folder: the medians over its seeds of
fidelity, TSTR, detection and membership inference, and of each numeric column's std
ratio (``std_ratios.ratios``). Used by ``grid_share_runs.sh``.

    python benchmarks/deep-spread/grid_share_summary.py SHARE DIR >> SUMMARY
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
from std_ratios import ratios

share, out = sys.argv[1], Path(sys.argv[2])
res = pd.read_csv(out / "results.csv")
rat = ratios(out)
for setting, g in res.groupby("setting"):
    med = {k: round(float(g[k].median()), 4) for k in
           ("fidelity", "tstr_auroc", "detection_auroc", "membership_inference_auroc")}
    r = rat[rat.setting == setting.replace("/", "_")].groupby("column")["ratio"].median()
    print(json.dumps({"share": float(share), "run": out.name, "setting": setting, **med,
                      "ratios": {k: round(float(v), 3) for k, v in r.items()}}))
