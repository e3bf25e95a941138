"""Spread ratios (synthetic / real training rows) of every numeric column by three
measures: the standard deviation (issue 14's bar), the interquartile range and the
median absolute deviation. Why: cholesterol's std lives in a tail of 17 training patients
that the grid release cannot see (docs/generators.md), so the std ratio of a 3-seed
median misses the bar about one run in five; the robust measures say whether the body
of the distribution keeps its spread.

Reads ``fedsynth benchmark --keep-work --out DIR`` folders (as ``std_ratios.py``); prints
per-seed ratios and, per setting and column, the median over seeds and runs, and the
share of runs (3-seed medians) outside [0.8, 1.25] by each measure.

    .venv/bin/python benchmarks/deep-spread/robust_spread.py DIR [DIR ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from std_ratios import kept_tables

MEASURES = {
    "std": lambda x: float(np.std(x, ddof=1)),
    "iqr": lambda x: float(np.subtract(*np.percentile(x, [75, 25]))),
    "mad": lambda x: float(np.median(np.abs(x - np.median(x)))),
}


def _values(frame: pd.DataFrame, col: str) -> np.ndarray:
    x = pd.to_numeric(frame[col], errors="coerce").astype(float).to_numpy()
    return x[np.isfinite(x)]


def spreads(out: Path) -> pd.DataFrame:
    rows = []
    for setting, seed, real, syn, numeric in kept_tables(out):
        for col in numeric:
            r, s = _values(real, col), _values(syn, col)
            for name, f in MEASURES.items():
                rows.append({"run": out.name, "setting": setting, "seed": seed,
                             "column": col, "measure": name, "ratio": f(s) / f(r)})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    frame = pd.concat([spreads(Path(d)) for d in sys.argv[1:]], ignore_index=True)
    print(frame.pivot_table(index=["run", "setting", "seed"], columns=["measure", "column"],
                            values="ratio").round(2).to_string())
    runs = frame.groupby(["run", "setting", "column", "measure"])["ratio"].median()
    outside = ((runs < 0.8) | (runs > 1.25)).groupby(["setting", "column", "measure"]).mean()
    summary = pd.DataFrame({"median ratio": runs.groupby(["setting", "column", "measure"])
                            .median().round(2),
                            "runs outside [0.8, 1.25]": outside.round(2)})
    print("\n3-seed medians per run, then over runs")
    print(summary.unstack("measure").to_string())
