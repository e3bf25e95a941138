"""DP histograms over a column's public bounds, and what can be derived from their sum.

Why: a schema's bounds are clinical, not the data's (age 18-100, survival time 0-300
months for values of 1-44), so anything scaled by them alone puts the data in a corner
of its range. Where the data lie is a statistic of the rows, so it is learned the one
way a site may learn anything: each site releases a fine histogram of the column over
the public bounds with Gaussian noise (adding or removing a patient changes one cell by
one), the coordinator adds the sites' releases up (as counts are added), and everything
after that is post-processing of the noisy sum:

``noisy counts -> monotone CDF -> quantile edges``

The CDF is made robust to the noise in three steps, each a function of the noisy sum
and the public noise level only: a small Gaussian smoothing across neighbouring cells
(real densities are smooth at the scale of a cell, the noise is not), a *support*
found as the cells from the first to the last whose smoothed count clears
``SUPPORT_SIGMAS`` noise standard deviations (noise alone rarely does; the flat tails
outside it, pure noise over the empty part of a wide public range, are set to zero),
and clipping at zero inside it. Quantile edges at evenly spaced probability levels are
then a public, strictly increasing grid: a generator's encoder maps a value through the
piecewise-linear CDF and back (``encoding.TabularEncoder``).

Used by the deep generators' quantile grid (issue 14); the marginal generator's 1-way
measurement over public bounds (issue 13) releases the same kind of histogram.
"""

from __future__ import annotations

import numpy as np

#: Cells of a released histogram over the public bounds of a numeric column.
BINS = 32
#: Probability levels of the derived grid (``LEVELS + 1`` edges, 0 and 1 included).
LEVELS = 64
#: Gaussian smoothing of the noisy counts, in cells (post-processing).
SMOOTH_CELLS = 1.0
#: A cell is in the support when its smoothed count clears this many noise stds.
SUPPORT_SIGMAS = 2.0


def histogram(values: np.ndarray, lo: float, hi: float, bins: int = BINS) -> np.ndarray:
    """Exact counts of ``values`` in ``bins`` equal cells over [lo, hi]; NaN (missing)
    is not counted and values outside are counted in the end cells, so one row changes
    at most one cell by one."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if hi <= lo:
        raise ValueError(f"histogram bounds must satisfy lo < hi, got [{lo}, {hi}]")
    cells = np.clip(((v - lo) / (hi - lo) * bins).astype(int), 0, bins - 1)
    return np.bincount(cells, minlength=bins).astype(float)


def add_noise(counts: np.ndarray, noise_std: float | None,
              rng: np.random.Generator | None) -> np.ndarray:
    """The release: ``counts`` plus Gaussian noise of std ``noise_std`` per cell (None:
    the exact counts, for a study without DP). ``rng`` must be the site's secret
    randomness (``DPRandomness.numpy``): whoever can replay it reads the exact counts."""
    counts = np.asarray(counts, dtype=float)
    if noise_std is None:
        return counts.copy()
    if rng is None:
        raise ValueError("a DP histogram release needs the site's secret randomness")
    return counts + rng.normal(0.0, noise_std, size=counts.shape)


def _smooth(counts: np.ndarray, cells: float) -> tuple[np.ndarray, float]:
    """Gaussian smoothing over cells; also the factor by which it shrinks iid noise."""
    if cells <= 0:
        return counts.copy(), 1.0
    half = int(np.ceil(3 * cells))
    offsets = np.arange(-half, half + 1)
    kernel = np.exp(-0.5 * (offsets / cells) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(counts, half, mode="constant")
    return np.convolve(padded, kernel, mode="valid"), float(np.sqrt((kernel**2).sum()))


def monotone_cdf(noisy: np.ndarray, noise_std: float) -> np.ndarray:
    """The CDF at the ``len(noisy) + 1`` cell edges (0 first, 1 last), nondecreasing.

    ``noise_std`` is the std of the noise in each cell of ``noisy`` (for a sum over
    sites, the root of the sum of their variances; 0 for exact counts). With nothing
    above the noise the CDF is uniform over the public bounds: nothing was learned.
    """
    noisy = np.asarray(noisy, dtype=float)
    smooth, shrink = _smooth(noisy, SMOOTH_CELLS if noise_std > 0 else 0.0)
    floor = SUPPORT_SIGMAS * noise_std * shrink
    above = np.flatnonzero(smooth > floor) if noise_std > 0 else np.flatnonzero(noisy > 0)
    mass = np.zeros_like(noisy)
    if above.size:
        first, last = above[0], above[-1]
        mass[first : last + 1] = np.clip(smooth[first : last + 1], 0.0, None)
    if mass.sum() <= 0:
        mass[:] = 1.0
    cdf = np.concatenate([[0.0], np.cumsum(mass)])
    return cdf / cdf[-1]


def quantile_edges(noisy: np.ndarray, lo: float, hi: float, noise_std: float,
                   levels: int = LEVELS) -> np.ndarray:
    """``levels + 1`` strictly increasing values at probabilities 0, 1/levels, ..., 1.

    The inverse of the piecewise-linear CDF of ``monotone_cdf`` over cells of equal
    width on [lo, hi]. Empty cells make the CDF flat, so the inverse jumps over them
    (no edge lands in an empty region); ties cannot occur inside a cell that has mass.
    A tiny increasing ramp keeps the edges strictly increasing for ``np.interp``.
    """
    cdf = monotone_cdf(noisy, noise_std)
    cell_edges = np.linspace(lo, hi, len(cdf))
    probs = np.linspace(0.0, 1.0, levels + 1)
    edges = _inverse(cdf, cell_edges, probs)
    ramp = (hi - lo) * 1e-9 * np.arange(len(edges))
    return np.maximum.accumulate(edges) + ramp


def _inverse(cdf: np.ndarray, cell_edges: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Quantiles of a piecewise-linear CDF given at ``cell_edges``."""
    out = np.empty_like(probs)
    for i, p in enumerate(probs):
        j = int(np.searchsorted(cdf, p, side="left"))
        if j == 0:
            # probability 0: the lower end of the first cell with mass
            j0 = int(np.searchsorted(cdf, 0.0, side="right"))
            out[i] = cell_edges[max(j0 - 1, 0)]
            continue
        j = min(j, len(cdf) - 1)
        lo_p, hi_p = cdf[j - 1], cdf[j]
        frac = 0.0 if hi_p <= lo_p else (p - lo_p) / (hi_p - lo_p)
        out[i] = cell_edges[j - 1] + frac * (cell_edges[j] - cell_edges[j - 1])
    return out
