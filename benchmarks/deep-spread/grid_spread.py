"""How much of the synthetic spread's swing the DP quantile grid alone causes.

No training: the real heart-disease rows of the four hospitals, their exact 32-cell
histogram per numeric column plus Gaussian noise at the benchmark's level (epsilon 3,
grid share 0.2: multiplier 3.8 per site, times sqrt(5) because one patient moves one
cell of each of the 5 columns, 4 sites summed: std 17 per cell), 200 draws; the std of
the distribution the grid's edges describe over the real std (5th, 50th, 95th
percentile). Rules: ``before`` the support from the first to the last cell whose
smoothed count clears 2 noise stds (session 2); ``gap G, S sd`` the run of cells over
S noise stds through the highest count, at most G cells below the floor in a row
(gap 1 at 2 sd: run F, reverted; gap 1 at 1 sd: `dp_histogram.support_cdf` now).

    .venv/bin/python benchmarks/deep-spread/grid_spread.py
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedsynth.common import dp_histogram as dh
from fedsynth.common.quantile_grid import cell_std, grid_noise_for
from fedsynth.simulations.datasets import load_site_frames

SITES, DRAWS = 4, 200


def connected(above: np.ndarray, peak: int, gap: int) -> tuple[int, int]:
    first = last = peak
    while nxt := [j for j in range(last + 1, min(last + gap + 2, len(above))) if above[j]]:
        last = nxt[0]
    while prv := [j for j in range(first - 1, max(first - gap - 2, -1), -1) if above[j]]:
        first = prv[0]
    return first, last


def cdf(noisy: np.ndarray, std: float, gap: int | None, sigmas: float) -> np.ndarray:
    smooth, shrink = dh._smooth(noisy, dh.SMOOTH_CELLS)
    above = smooth > sigmas * std * shrink
    mass = np.zeros_like(noisy)
    if above.any():
        idx = np.flatnonzero(above)
        f, last = (idx[0], idx[-1]) if gap is None else connected(
            above, int(np.argmax(np.where(above, smooth, -np.inf))), gap)
        mass[f:last + 1] = np.clip(smooth[f:last + 1], 0, None)
    else:
        mass[:] = 1.0
    c = np.concatenate([[0.0], np.cumsum(mass)])
    return c / c[-1]


RULES = {"before": (None, 2.0), "gap 1, 2 sd": (1, 2.0), "gap 3, 2 sd": (3, 2.0),
         "gap 2, 1 sd": (2, 1.0), "gap 3, 1 sd": (3, 1.0), "gap 1, 0.75 sd": (1, 0.75),
         "gap 1, 1 sd (now)": (1, 1.0), "gap 1, 1.5 sd": (1, 1.5)}

schema, frames = load_site_frames("heart_disease")
rows = pd.concat(frames.values(), ignore_index=True)
std = cell_std(schema, grid_noise_for(3.0, 1e-5, 0.2)) * np.sqrt(SITES)
print(f"noise std per summed cell: {std:.1f}")
rng = np.random.default_rng(0)
for col in ("age", "trestbps", "chol", "thalach", "oldpeak"):
    column = schema.column(col)
    v = pd.to_numeric(rows[col], errors="coerce").to_numpy(float)
    v = v[np.isfinite(v)]
    lo, hi = float(column.min), float(column.max)
    counts = dh.histogram(v, lo, hi)
    out = {}
    for name, (gap, sigmas) in RULES.items():
        ratios = []
        for _ in range(DRAWS):
            c = cdf(counts + rng.normal(0, std, counts.shape), std, gap, sigmas)
            edges = dh._inverse(c, np.linspace(lo, hi, len(c)), np.linspace(0, 1, 1001))
            ratios.append(np.std(edges) / np.std(v))
        out[name] = np.percentile(
            ratios, [5, 50, 95]).round(2).tolist()
    print(col, out)
