"""Std ratios (synthetic / real training rows) of every numeric column, per setting.

Reads a ``fedsynth benchmark --keep-work --out DIR`` folder: for each seed and setting,
``work/seed-S/<setting>/synthetic.csv`` against ``work/seed-S/real/train.csv``; prints
the per-seed ratios and their median over seeds as CSV.

    .venv/bin/python benchmarks/deep-spread/std_ratios.py DIR [DIR ...]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from fedsynth.common.bundled import bundled_schema
from fedsynth.common.table import read_table


def kept_tables(out: Path) -> Iterator[tuple[str, str, pd.DataFrame, pd.DataFrame, list[str]]]:
    """(setting, seed, real training rows, synthetic rows, numeric columns) for every seed
    and setting of a kept benchmark folder: the one walk ``robust_spread.py`` shares."""
    dataset = json.loads((out / "run.json").read_text())["options"]["dataset"]
    schema = bundled_schema(dataset)
    numeric = [c.name for c in schema.columns if c.is_numeric]
    for seed_dir in sorted((out / "work").glob("seed-*")):
        real = read_table(seed_dir / "real" / "train.csv", schema)
        for setting in sorted(p for p in seed_dir.iterdir() if (p / "synthetic.csv").exists()):
            yield setting.name, seed_dir.name, real, pd.read_csv(setting / "synthetic.csv"), numeric


def ratios(out: Path) -> pd.DataFrame:
    rows = []
    for setting, seed, real, syn, numeric in kept_tables(out):
        for col in numeric:
            real_std = pd.to_numeric(real[col], errors="coerce").astype(float).std()
            r = pd.to_numeric(syn[col], errors="coerce").astype(float).std() / real_std
            rows.append({"setting": setting, "seed": seed, "column": col, "ratio": float(r)})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    frame = pd.concat([ratios(Path(d)) for d in sys.argv[1:]], ignore_index=True)
    per_seed = frame.pivot_table(index=["setting", "seed"], columns="column", values="ratio")
    print(per_seed.round(2).to_string())
    med = frame.groupby(["setting", "column"])["ratio"].median().unstack()
    print("\nmedian over seeds")
    print(med.round(2).to_csv())
