"""Where a kept benchmark run loses each numeric column's spread: in the DP grid, or in
the generator trained on it.

For each seed and setting of ``fedsynth benchmark --keep-work --out DIR``: the std of
``synthetic.csv`` over the std of ``real/train.csv`` (as ``std_ratios.py``), the std
the model's grid alone describes (uniform probabilities decoded through the saved
grid, clipped at the encoder's 1% tails as a perfect generator's outputs would be),
the grid's top edge against the real maximum, and the missing shares.

    .venv/bin/python benchmarks/deep-spread/grid_vs_synthetic.py DIR [DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from fedsynth.common.bundled import bundled_schema
from fedsynth.common.encoding import TAIL
from fedsynth.common.generators.base import Generator
from fedsynth.common.table import read_table

U = np.clip(np.linspace(0.0, 1.0, 20001), TAIL, 1 - TAIL)


def rows(out: Path) -> list[dict]:
    run = out / "run.json"  # written at the end: a run still going is heart disease
    dataset = json.loads(run.read_text())["options"]["dataset"] if run.exists() else (
        "heart_disease")
    schema = bundled_schema(dataset)
    found = []
    for seed_dir in sorted((out / "work").glob("seed-*")):
        real = read_table(seed_dir / "real" / "train.csv", schema)
        for setting in sorted(p for p in seed_dir.iterdir() if (p / "synthetic.csv").exists()):
            grid = Generator.load(setting / "model.fsg").encoder.grid
            syn = pd.read_csv(setting / "synthetic.csv")
            for col, edges in grid.items():
                r = pd.to_numeric(real[col], errors="coerce").astype(float)
                s = pd.to_numeric(syn[col], errors="coerce").astype(float)
                g = np.interp(U, np.linspace(0, 1, len(edges)), edges)
                found.append({"run": out.name, "seed": seed_dir.name, "setting": setting.name,
                              "column": col, "synthetic": s.std() / r.std(),
                              "grid": g.std() / r.std(), "top_edge": edges[-1],
                              "real_max": r.max(), "miss_real": r.isna().mean(),
                              "miss_syn": s.isna().mean()})
    return found


if __name__ == "__main__":
    frame = pd.DataFrame([r for d in sys.argv[1:] for r in rows(Path(d))])
    pd.set_option("display.width", 200)
    print(frame.round(3).to_string(index=False))
