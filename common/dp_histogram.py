"""DP histograms over a column's public bounds, and what can be derived from them.

Why: a schema's bounds are clinical, not the data's (age 18-100, survival time 0-300
months for values of 1-44), so anything cut or scaled by them alone puts the data in a
corner of its range. Where the data lie is a statistic of the rows, so it is learned the
one way a site may learn anything: each site releases a fine histogram of the column
over the public bounds with Gaussian noise (adding or removing a patient changes one
cell by one), the coordinator adds the sites' releases up (as counts are added: in
clear, or decrypted as a CKKS sum), and everything after that reads only the noisy sum
and the public noise level, so it is post-processing and costs no privacy.

Two users, two estimates of the CDF from the noisy sum:

- the deep generators' quantile grid (``quantile_grid.py``, issue 14) needs quantiles
  that never land in the empty part of a wide public range: :func:`support_cdf`
  smooths the counts over neighbouring cells (real densities are smooth at the scale of
  a cell, the noise is not), keeps the *support* (the run of cells through the highest
  smoothed count that clear ``SUPPORT_SIGMAS`` noise stds, gaps of at most
  ``SUPPORT_GAP`` cells allowed; the flat tails outside it are pure noise and set to
  zero) and clips at zero inside it; :func:`quantile_edges`
  inverts it;
- the marginal generator's bins (issue 13) are runs of whole fine cells of about equal
  mass and every bin must keep at least one cell: :func:`isotonic_cdf` is the running
  sum of the noisy counts (unbiased at every cell, unlike a running sum of clipped
  counts, which drifts up by the clipped noise) made non-decreasing by isotonic
  regression and, given the noise std, shrunk towards uniform by :func:`reliability`
  (``1 / (1 + (r / 0.5)^2)``, ``r`` the std of the noisy total over the total: about
  0.97, 0.76, 0.30 on heart disease's 4 sites, 64 cells at epsilon 10, 3, 1);
  :func:`equal_mass_cuts` cuts it and :func:`cell_weights` spreads a bin's mass over
  its cells.

The two were written side by side (issues 13 and 14 in one session) and each is tuned
and measured with its own user; making one estimator serve both is left to do.
"""


from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .privacy.release_noise import ReleaseNoise


#: Cells of a released histogram over the public bounds of a numeric column.
BINS = 32
#: Probability levels of the derived grid (``LEVELS + 1`` edges, 0 and 1 included).
LEVELS = 64
#: Gaussian smoothing of the noisy counts, in cells (post-processing).
SMOOTH_CELLS = 1.0
#: A cell is in the support when its smoothed count clears this many noise stds. At 2
#: (session 2) the floor cut real sparse tails (heart disease at epsilon 3: the grid's
#: own std ratio had a median of 0.82-0.95 over noise draws); with the support a
#: connected run (``_connected_run``) a lower floor no longer lets spikes in
#: (medians 0.85-1.01; ``benchmarks/deep-spread/grid_spread.py``).
SUPPORT_SIGMAS = 1.0
#: Cells below the floor that may interrupt the support (``_connected_run``).
SUPPORT_GAP = 1


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
              noise: ReleaseNoise | None) -> np.ndarray:
    """The release: ``counts`` plus Gaussian noise of std ``noise_std`` per cell (None:
    the exact counts, for a study without DP); the discrete Gaussian in secret mode.
    ``noise`` must be the site's secret ``DPRandomness.release`` stream: whoever can
    replay it reads the exact counts."""
    counts = np.asarray(counts, dtype=float)
    if noise_std is None:
        return counts.copy()
    if noise is None:
        raise ValueError("a DP histogram release needs the site's secret randomness")
    return noise.add(counts, noise_std, integral=True)


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


def _connected_run(above: np.ndarray, peak: int, gap: int = SUPPORT_GAP) -> tuple[int, int]:
    """First and last cell of the run of ``above`` cells through ``peak`` that no more
    than ``gap`` cells below the floor in a row interrupt. A lone cell over the floor
    far out in a wide public range is a noise spike;
    taking the support out to it spread the clipped noise of every empty cell between
    as a long tail (heart disease's cholesterol: a grid up to 673 mg/dl in some runs,
    328 in others, synthetic std ratios 0.68-1.93)."""
    first = last = peak
    while True:
        nxt = [j for j in range(last + 1, min(last + gap + 2, len(above))) if above[j]]
        if not nxt:
            break
        last = nxt[0]
    while True:
        prv = [j for j in range(first - 1, max(first - gap - 2, -1), -1) if above[j]]
        if not prv:
            break
        first = prv[0]
    return first, last


def support_cdf(noisy: np.ndarray, noise_std: float) -> np.ndarray:
    """The CDF at the ``len(noisy) + 1`` cell edges (0 first, 1 last), nondecreasing.

    ``noise_std`` is the std of the noise in each cell of ``noisy`` (for a sum over
    sites, the root of the sum of their variances; 0 for exact counts). With nothing
    above the noise the CDF is uniform over the public bounds: nothing was learned.
    """
    noisy = np.asarray(noisy, dtype=float)
    smooth, shrink = _smooth(noisy, SMOOTH_CELLS if noise_std > 0 else 0.0)
    floor = SUPPORT_SIGMAS * noise_std * shrink
    above = smooth > floor if noise_std > 0 else noisy > 0
    mass = np.zeros_like(noisy)
    if above.any():
        first, last = _connected_run(above, int(np.argmax(np.where(above, smooth, -np.inf))))
        mass[first : last + 1] = np.clip(smooth[first : last + 1], 0.0, None)
    if mass.sum() <= 0:
        mass[:] = 1.0
    cdf = np.concatenate([[0.0], np.cumsum(mass)])
    return cdf / cdf[-1]


def quantile_edges(noisy: np.ndarray, lo: float, hi: float, noise_std: float,
                   levels: int = LEVELS) -> np.ndarray:
    """``levels + 1`` strictly increasing values at probabilities 0, 1/levels, ..., 1.

    The inverse of the piecewise-linear CDF of ``support_cdf`` over cells of equal
    width on [lo, hi]. Empty cells make the CDF flat, so the inverse jumps over them
    (no edge lands in an empty region); ties cannot occur inside a cell that has mass.
    A tiny increasing ramp keeps the edges strictly increasing for ``np.interp``.
    """
    cdf = support_cdf(noisy, noise_std)
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


# -- equal-mass bins of whole cells (the marginal generator) --------------------
HALF_RELIABLE = 0.5  # relative noise of the total at which the release gets weight 1/2


def reliability(noisy_counts: np.ndarray, noise_std: float) -> float:
    """Weight of the noisy histogram against the uniform one, in [0, 1] (see above)."""
    counts = np.asarray(noisy_counts, dtype=float).ravel()
    total = float(counts.sum())
    if noise_std <= 0:
        return 1.0
    if total <= 0:
        return 0.0
    r = noise_std * np.sqrt(counts.size) / total
    return float(1.0 / (1.0 + (r / HALF_RELIABLE) ** 2))


def isotonic_cdf(noisy_counts: np.ndarray, noise_std: float = 0.0) -> np.ndarray:
    """Non-decreasing estimate of the CDF at the end of each cell, ending at 1.

    Falls back to the uniform CDF when the noisy total is not positive (nothing to
    learn from the release)."""
    counts = np.asarray(noisy_counts, dtype=float).ravel()
    if counts.size == 0:
        raise ValueError("a histogram needs at least one cell")
    from sklearn.isotonic import isotonic_regression  # here: a site's round needs no sklearn

    uniform = np.arange(1, counts.size + 1) / counts.size
    running = isotonic_regression(np.cumsum(counts), increasing=True)
    total = float(running[-1])
    if not np.isfinite(total) or total <= 0:
        return uniform
    a = reliability(counts, noise_std)
    return np.clip(a * running / total + (1 - a) * uniform, 0.0, 1.0)


def equal_mass_cuts(noisy_counts: np.ndarray, bins: int, noise_std: float = 0.0
                    ) -> np.ndarray:
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
    cdf = isotonic_cdf(noisy_counts, noise_std)
    inner = cdf[:-1]  # CDF at the boundary after cell i, i = 0 .. cells-2
    cuts = np.empty(bins + 1, dtype=np.int64)
    cuts[0], cuts[-1] = 0, cells
    for j in range(1, bins):
        cuts[j] = 1 + int(np.argmin(np.abs(inner - j / bins)))
    for j in range(1, bins):  # strictly increasing, leaving room for the bins after j
        cuts[j] = min(max(cuts[j], cuts[j - 1] + 1), cells - (bins - j))
    return cuts


def mass_and_width_cuts(noisy_counts: np.ndarray, bins: int, noise_std: float = 0.0,
                        tail: float = 0.01) -> np.ndarray:
    """Equal-mass cuts, with every bin split that is wider than 1/``bins`` of the
    data's noisy support.

    Equal-mass bins are narrow where patients are and wide in the tails; a bin's value
    is then decoded from the pooled within-bin histogram, which blurs whatever differs
    between patients in one wide tail bin (on the simulated SCM of the causal tests the
    treatment's effect lives there: its interventional ATE fell from 2.35 to 2.05).
    The support is the cells between the monotone CDF's ``tail`` and ``1 - tail``, so
    the empty stretch of a wide public range is not split; a bin's part inside it that
    is wider than the cap is cut into equal parts. At most ``2 * bins`` bins.
    Post-processing of the noisy counts.
    """
    cells = np.asarray(noisy_counts).size
    mass = equal_mass_cuts(noisy_counts, bins, noise_std)
    if cells <= bins:
        return mass
    cdf = isotonic_cdf(noisy_counts, noise_std)
    lo = int(np.searchsorted(cdf, tail, side="right"))
    hi = max(int(np.searchsorted(cdf, 1.0 - tail, side="left")) + 1, lo + 1)
    cap = max(1, math.ceil((min(hi, cells) - lo) / bins))
    extra: list[int] = []
    for start, end in zip(mass[:-1], mass[1:], strict=True):
        a, b = max(int(start), lo), min(int(end), hi)
        if b - a > cap:
            parts = math.ceil((b - a) / cap)
            extra += [int(round(a + k * (b - a) / parts)) for k in range(parts + 1)]
    return np.unique(np.concatenate([mass, np.asarray(extra, dtype=np.int64)]))


def cell_weights(noisy_counts: np.ndarray, noise_std: float = 0.0) -> np.ndarray:
    """How to spread mass over cells within a bin: the noisy counts clipped at zero,
    normalised, shrunk towards uniform by :func:`reliability` (sums to 1)."""
    counts = np.asarray(noisy_counts, dtype=float).ravel()
    clipped = np.clip(counts, 0.0, None)
    uniform = np.full(counts.size, 1.0 / counts.size)
    if clipped.sum() <= 0:
        return uniform
    a = reliability(counts, noise_std)
    return a * clipped / clipped.sum() + (1 - a) * uniform




def bin_weights(noisy_counts: np.ndarray, noise_std: float, cuts: np.ndarray,
                threshold: float) -> np.ndarray:
    """Cell weights for decoding inside the bins ``cuts`` (runs of cells), per bin a
    blend of two estimates by how much of the bin stands above the noise.

    In bin b, ``kept`` is its counts less ``threshold`` noise stds, clipped at 0
    and f = sum(kept) / sum(clipped counts) the share of
    the bin's mass that survives; the weights are f x kept (normalised) + (1 - f) x
    :func:`cell_weights` (clipped counts shrunk towards uniform). Post-processing.

    Why: clinical values are heaped (an ST depression of exactly 0.0 in 40% of the
    heart patients, blood pressures at multiples of 10) and the bin holding a heap often
    spans empty cells (the rare negative ST depressions); the smooth estimate gave each
    empty cell its clipped noise plus a uniform share, and with 4 sites' noise the 0.0
    kept 0.23 of the mass instead of 0.42. Thresholding every cell fixed that but made
    smooth columns (age, cholesterol: about 9 patients a cell against a noise std of
    about 21) spiky; their bins keep little above the threshold, so they keep the smooth
    estimate."""
    counts = np.asarray(noisy_counts, dtype=float).ravel()
    smooth = cell_weights(counts, noise_std)
    out = np.zeros(counts.size)
    cuts = np.asarray(cuts, dtype=np.int64)
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        y = counts[lo:hi]
        mass = float(np.clip(y, 0, None).sum())
        kept = np.clip(y - threshold * max(noise_std, 0.0), 0.0, None)
        share = min(1.0, float(kept.sum()) / mass) if mass > 0 else 0.0
        part = smooth[lo:hi] / max(float(smooth[lo:hi].sum()), 1e-300)
        if share > 0:
            part = share * kept / kept.sum() + (1 - share) * part
        out[lo:hi] = part * max(mass, 1e-12)
    return out / out.sum()
