"""Per-run medians (seeds 0-2) of kept benchmark folders: fidelity, TSTR, detection and
the synthetic missing shares against the pooled training rows' (issue 14, "ddpm and
ctgan" in results-nodp.md).

    .venv/bin/python benchmarks/deep-spread/nodp_families.py LABEL=DIR [LABEL=DIR ...]

DIR is a ``fedsynth benchmark --keep-work`` output folder (its work/ holds real rows:
delete it afterwards). "chol" is cholesterol's missing share; "gap" the mean absolute
gap between synthetic and real missing shares over the columns with missing values.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

KEYS = ("fidelity", "tstr_auroc", "detection_auroc")

print("| run | setting | fidelity | TSTR | detection | chol missing (real) | gap |")
print("|---|---|---|---|---|---|---|")
for arg in sys.argv[1:]:
    label, folder = arg.split("=", 1)
    res = pd.read_csv(Path(folder) / "results.csv")
    for setting, g in res.groupby("setting", sort=False):
        chol, real_chol, gaps = [], [], []
        for seed in g["seed"]:
            work = Path(folder) / "work" / f"seed-{seed}"
            path = work / setting.replace("/", "_") / "synthetic.csv"
            if not path.exists():  # a central setting keeps no synthetic rows
                continue
            syn = pd.read_csv(path)
            # the sites' files keep the source's layout: no header, empty = missing
            real = pd.read_csv(work / "real" / "train.csv", header=None, names=syn.columns)
            cols = [c for c in real.columns if real[c].isna().any()]
            gaps.append(sum(abs(syn[c].isna().mean() - real[c].isna().mean())
                            for c in cols) / len(cols))
            chol.append(syn["chol"].isna().mean())
            real_chol.append(real["chol"].isna().mean())
        cells = [f"{g[k].median():.3f} ({' / '.join(f'{v:.3f}' for v in g.sort_values('seed')[k])})"
                 for k in KEYS]
        shares = (f" | {pd.Series(chol).median():.2f} ({pd.Series(real_chol).median():.2f})"
                  f" | {pd.Series(gaps).median():.3f} |") if chol else " | - | - |"
        print(f"| {label} | {setting} | " + " | ".join(cells) + shares)
