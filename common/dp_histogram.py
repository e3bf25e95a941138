"""From a noisy histogram to a monotone CDF and equal-mass bin edges (post-processing).

A DP release of a column's histogram over cells fixed in public (equal-width cells of
the schema's bounds, say) is a vector of counts plus noise: some cells come out
negative, and the running sum wobbles. Everything here reads only such a vector, so
whatever it returns is post-processing of the release and costs no privacy, at a site,
at the coordinator (of summed noisy counts, in clear or decrypted under CKKS) or in a
central fit alike.

- :func:`monotone_cdf`: the running sum of the noisy counts (unbiased at every cell,
  unlike the running sum of counts clipped at zero, which drifts up by the clipped
  noise), made non-decreasing by isotonic regression (the closest monotone sequence in
  least squares) and scaled to end at 1;
- :func:`equal_mass_cuts`: the cell boundaries that split that CDF into ``bins``
  runs of about equal mass; each run keeps at least one cell, so the number of bins
  (a public choice, and the model's shape) never depends on the data.
"""

from __future__ import annotations

import numpy as np
from sklearn.isotonic import isotonic_regression


def monotone_cdf(noisy_counts: np.ndarray) -> np.ndarray:
    """Non-decreasing estimate of the CDF at the end of each cell, ending at 1.

    Falls back to the uniform CDF when the noisy total is not positive (nothing to
    learn from the release)."""
    counts = np.asarray(noisy_counts, dtype=float).ravel()
    if counts.size == 0:
        raise ValueError("a histogram needs at least one cell")
    running = isotonic_regression(np.cumsum(counts), increasing=True)
    total = float(running[-1])
    if not np.isfinite(total) or total <= 0:
        return np.arange(1, counts.size + 1) / counts.size
    return np.clip(running / total, 0.0, 1.0)


def equal_mass_cuts(noisy_counts: np.ndarray, bins: int) -> np.ndarray:
    """Boundaries ``c_0 = 0 < c_1 < ... < c_bins = cells``: bin j is cells [c_j, c_{j+1}).

    Each inner boundary sits where the monotone CDF is closest to j / bins; ties and
    empty stretches are resolved so that every bin holds at least one cell. With no
    more cells than bins, every cell is its own bin.
    """
    cells = np.asarray(noisy_counts).size
    if bins < 1:
        raise ValueError("bins must be >= 1")
    if cells <= bins:
        return np.arange(cells + 1)
    cdf = monotone_cdf(noisy_counts)
    inner = cdf[:-1]  # CDF at the boundary after cell i, i = 0 .. cells-2
    cuts = np.empty(bins + 1, dtype=np.int64)
    cuts[0], cuts[-1] = 0, cells
    for j in range(1, bins):
        cuts[j] = 1 + int(np.argmin(np.abs(inner - j / bins)))
    for j in range(1, bins):  # strictly increasing, leaving room for the bins after j
        cuts[j] = min(max(cuts[j], cuts[j - 1] + 1), cells - (bins - j))
    return cuts


def cell_weights(noisy_counts: np.ndarray) -> np.ndarray:
    """The noisy counts clipped at zero: how to spread mass over cells within a bin."""
    return np.clip(np.asarray(noisy_counts, dtype=float).ravel(), 0.0, None)
