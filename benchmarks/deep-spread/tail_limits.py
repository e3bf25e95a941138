"""Can the DP quantile grid keep cholesterol's spread? What the release can see of each
heart column's tail, and what tail models would do to the other columns (fifth pass).

No training: the real heart-disease training rows of the benchmark's split (seeds 0-2,
four hospitals, 80%), their exact 32-cell histogram per numeric column plus Gaussian
noise at the benchmark's level (epsilon 3, grid share 0.2: std 17 per summed cell),
``DRAWS`` simulated draws (simulated noise, not a DP release). For each rule the
distribution the grid's edges describe is decoded as a perfect generator would
decode it (normal scores clipped at the encoder's 1% ``TAIL``; ``+ clamp`` also
draws the outer 1% from the grid's own tail) and its std is divided by the real std.

Part 1 (what the release can see): per column, the grid's top edge (median over
draws), the training patients above it and the share of the real std they carry, and
the noise std of the sum of every released cell above it (the best any coarser,
hierarchical sum of the same release can do), beside the noise of a dedicated
release of the column's clipped second moment that took the *whole* budget.

Part 2 (tail models, post-processing of the same release): ``now`` is
``dp_histogram.support_cdf``; ``exact inside`` (a diagnostic, not a rule: it reads
the exact counts) keeps the noisy support but the exact counts inside it, which
separates the support's truncation from the widening by the noise clipped at zero;
``exp`` continues the support beyond its ends with an
exponential fitted by least squares to the noisy counts from 3 cells inside the end
to the bound; ``logquad S`` fits a quadratic to the log of the smoothed density from
the mode to the end (weights count / noise, curvature at most 0: at most exponential)
on a support cut at S noise stds and continues it; ``running sum`` is the unbiased
running sum of the noisy counts made monotone (isotonic), no support cut.

    .venv/bin/python benchmarks/deep-spread/tail_limits.py [DRAWS [GRID_SHARE [RULES [H]]]]

``GRID_SHARE`` (default 0.2, the study's then) shows what a larger share of the budget
buys; ``RULES`` a comma-separated subset of the rules; ``H`` the noise split over H of
the 4 sites, were the grid release summed under masks (default 1, each its own noise).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd

from fedsynth.common import dp_histogram as dh
from fedsynth.common.encoding import TAIL
from fedsynth.common.quantile_grid import cell_std, grid_noise_for, numeric_columns
from fedsynth.simulations.datasets import load_site_frames
from fedsynth.simulations.splits import holdout_split

DRAWS = int(sys.argv[1]) if len(sys.argv) > 1 else 200
SITES, EPS, DELTA = 4, 3.0, 1e-5
SHARE = float(sys.argv[2]) if len(sys.argv) > 2 else 0.2
schema, frames = load_site_frames("heart_disease")
COLUMNS = [c.name for c in numeric_columns(schema)]
# the sites' noises summed; with a split of one noise over HONEST sites (masked sums,
# docs/privacy.md "Distributed noise"; not built for the grid) the sum carries SITES/HONEST
HONEST = int(sys.argv[4]) if len(sys.argv) > 4 else 1
NOISE = cell_std(schema, grid_noise_for(EPS, DELTA, SHARE)) * math.sqrt(SITES / HONEST)


def train_rows(seed: int) -> pd.DataFrame:
    return pd.concat([holdout_split(f, schema, 0.2, seed=seed + i)[0]
                      for i, f in enumerate(frames.values())], ignore_index=True)


def support(noisy: np.ndarray, sigmas: float) -> tuple[np.ndarray, int, int]:
    smooth, shrink = dh._smooth(noisy, dh.SMOOTH_CELLS)
    above = smooth > sigmas * NOISE * shrink
    first, last = dh._connected_run(above, int(np.argmax(np.where(above, smooth, -np.inf))))
    mass = np.zeros_like(noisy)
    mass[first:last + 1] = np.clip(smooth[first:last + 1], 0, None)
    return mass, first, last


def exp_tail(y: np.ndarray, last: int, inside: int = 3) -> np.ndarray:
    """Cells after ``last`` under a * exp(-b k), fitted to y[last-inside+1:]."""
    if last >= len(y) - 1:
        return np.zeros(0)
    js = np.arange(max(last - inside + 1, 0), len(y))
    best = (np.inf, 0.0, 1.0)
    for b in np.linspace(0.05, 3.0, 60):
        x = np.exp(-b * (js - last))
        a = max(float(x @ y[js]) / float(x @ x), 0.0)
        best = min(best, (float(((y[js] - a * x) ** 2).sum()), a, b))
    _, a, b = best
    return a * np.exp(-b * np.arange(1, len(y) - last))


def logquad_tail(mass: np.ndarray, last: int) -> np.ndarray:
    if last >= len(mass) - 1:
        return np.zeros(0)
    js = np.arange(int(np.argmax(mass[:last + 1])), last + 1)
    js = js[mass[js] > 0]
    if len(js) < 3:
        return np.zeros(len(mass) - 1 - last)
    w = mass[js] / NOISE
    k = (js - last).astype(float)
    design = np.stack([np.ones_like(k), k, k * k], 1)
    a, b, c = np.linalg.lstsq(design * w[:, None], np.log(mass[js]) * w, rcond=None)[0]
    if c > 0:
        a, b = np.linalg.lstsq(design[:, :2] * w[:, None], np.log(mass[js]) * w, rcond=None)[0]
        c = 0.0
    if b >= 0:
        return np.zeros(len(mass) - 1 - last)
    k = np.arange(1, len(mass) - last, dtype=float)
    return np.exp(a + b * k + c * k * k)


def cell_mass(noisy: np.ndarray, rule: str, exact: np.ndarray) -> np.ndarray:
    if rule == "running sum":
        from sklearn.isotonic import isotonic_regression
        return np.diff(np.concatenate([[0.0], np.clip(
            isotonic_regression(np.cumsum(noisy), increasing=True), 0, None)]))
    sigmas = float(rule.split()[1]) if rule.startswith("logquad") else 1.0
    mass, first, last = support(noisy, sigmas)
    if rule == "now":
        return mass
    if rule == "exact inside":
        out = np.zeros_like(mass)
        out[first:last + 1] = exact[first:last + 1]
        return out
    flip = len(noisy) - 1 - first
    if rule == "exp":
        mass[last + 1:] = exp_tail(noisy, last)
        mass[:first] = exp_tail(noisy[::-1], flip)[::-1]
    else:
        mass[last + 1:] = logquad_tail(mass, last)
        mass[:first] = logquad_tail(mass[::-1], flip)[::-1]
    return mass


def decoded(mass: np.ndarray, lo: float, hi: float, clamp: bool, u: np.ndarray
            ) -> tuple[np.ndarray, float]:
    """A perfect generator's values through the grid of ``mass``, and the top edge."""
    cdf = np.concatenate([[0.0], np.cumsum(mass)])
    cdf = cdf / cdf[-1] if cdf[-1] > 0 else np.linspace(0, 1, len(cdf))
    edges = dh._inverse(cdf, np.linspace(lo, hi, len(cdf)), np.linspace(0, 1, dh.LEVELS + 1))
    edges = np.maximum.accumulate(edges) + (hi - lo) * 1e-9 * np.arange(len(edges))
    uu = u if clamp else np.clip(u, TAIL, 1 - TAIL)
    return np.interp(uu, np.linspace(0, 1, len(edges)), edges), float(edges[-1])


def best_moment_release(v: np.ndarray, lo: float, hi: float, share: float) -> float:
    """Relative error (bias and 1 sd of noise, in quadrature) of the std from a
    site-summed Gaussian release of every column's clipped sum of squared deviations
    (one row moves each column's sum by at most radius^2: L2 sensitivity sqrt(k) on the
    sums scaled by radius^2) taking ``share`` of the budget, at the best clip radius."""
    m = grid_noise_for(EPS, DELTA, share) * math.sqrt(len(COLUMNS))
    centre, n, best = float(np.median(v)), len(v), np.inf
    for radius in np.linspace(0.5, 1.0, 26) * max(hi - centre, centre - lo):
        kept = np.clip(v - centre, -radius, radius)
        ssq = float((kept ** 2).sum())
        noise = m * radius ** 2 * math.sqrt(SITES)  # one row moves the sum by radius^2
        bias = math.sqrt(ssq / n) / v.std() - 1.0
        best = min(best, math.hypot(bias, 0.5 * noise / ssq))
    return best


ALL_RULES = ("now", "exact inside", "exp", "logquad 1", "logquad 2", "running sum")
RULES = tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else ALL_RULES
rng, u = np.random.default_rng(0), np.random.default_rng(1).uniform(0, 1, 20000)
ratios: dict[tuple[str, str], list[float]] = {}
seen: dict[str, list[tuple[float, int, float, float]]] = {c: [] for c in COLUMNS}
trains = [train_rows(s) for s in range(3)]
for draw in range(DRAWS):
    train = trains[draw % 3]
    for col in COLUMNS:
        column = schema.column(col)
        v = pd.to_numeric(train[col], errors="coerce").to_numpy(float)
        v = v[np.isfinite(v)]
        lo, hi = float(column.min), float(column.max)
        counts = dh.histogram(v, lo, hi)
        noisy = counts + rng.normal(0, NOISE, counts.shape)
        for rule in RULES:
            for clamp in (False, True):
                if clamp and rule not in ("now", "exp"):
                    continue
                d, top = decoded(cell_mass(noisy, rule, counts), lo, hi, clamp, u)
                ratios.setdefault((col, rule + (" + clamp" if clamp else "")), []).append(
                    float(d.std() / v.std()))
                if rule == "now" and not clamp:
                    above = int((v > top).sum())
                    cells = dh.BINS - min(int((top - lo) / (hi - lo) * dh.BINS) + 1, dh.BINS)
                    seen[col].append((top, above, float(v[v <= top].std() / v.std()),
                                      NOISE * math.sqrt(max(cells, 1))))

print(f"grid share {SHARE}: noise std per summed cell {NOISE:.1f}; {DRAWS} draws\n")
print("| column | real std | grid's top edge | patients above (share) | std without them |"
      " noise of their summed cells | dedicated std release: error at share 0.2 / 0.999 |")
print("|---|---|---|---|---|---|---|")
for col in COLUMNS:
    t = np.array(seen[col])
    v = pd.to_numeric(trains[0][col], errors="coerce").dropna().to_numpy(float)
    column = schema.column(col)
    print(f"| {col} | {v.std():.1f} | {np.median(t[:, 0]):.0f} | {np.median(t[:, 1]):.0f} "
          f"({np.median(t[:, 1]) / len(v):.1%}) | {np.median(t[:, 2]):.2f} | "
          f"{np.median(t[:, 3]):.0f} | "
          + " / ".join(f"{best_moment_release(v, column.min, column.max, sh):.0%}"
                       for sh in (0.2, 0.999)) + " |")
rules = sorted({r for _, r in ratios}, key=lambda r: ([*RULES].index(r.split(" + ")[0]), r))
print("\nstd ratio of the grid alone, 5th / 50th / 95th percentile over draws; "
      "P(median of 3 draws outside 0.8-1.25)\n")
print("| rule | " + " | ".join(COLUMNS) + " |")
print("|---|" + "---|" * len(COLUMNS))
pick = np.random.default_rng(2)
for rule in rules:
    cells = []
    for col in COLUMNS:
        r = np.array(ratios[(col, rule)])
        med3 = np.median(pick.choice(r, (4000, 3)), axis=1)
        out = float(((med3 < 0.8) | (med3 > 1.25)).mean())
        p = np.percentile(r, [5, 50, 95])
        cells.append(f"{p[0]:.2f} / {p[1]:.2f} / {p[2]:.2f}; {out:.2f}")
    print(f"| {rule} | " + " | ".join(cells) + " |")
