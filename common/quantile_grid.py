"""The deep generators' public quantile grid: what a site releases, what the
coordinator derives from the sum (issue 14; docs/privacy.md, "The quantile grid").

Before training, each site releases one noisy histogram of every numeric column over
the column's public bounds (``dp_histogram.BINS`` cells on the encoder's working scale,
log1p for survival times). A patient is one row, so adding or removing one changes one
cell of each of the ``k`` histograms by one: L2 sensitivity ``sqrt(k)``, and Gaussian
noise of std ``noise_multiplier * sqrt(k)`` per cell is the Gaussian mechanism at
``noise_multiplier`` (one ledger entry ``(noise_multiplier, 1.0, 1)``, whatever ``k``).
The coordinator adds the sites' vectors (in clear, or as a CKKS sum) and turns the sum
into quantile edges per column (``grid_from_counts``): post-processing, free. A central
``Generator.fit`` runs the same two functions on the pooled rows.

The release is one flat vector, the columns' histograms one after another in schema
order (``numeric_columns``), so the clear and the encrypted paths add the same thing.

**Heaps** (sixth pass). Real clinical values pile on a few recorded values: resting
blood pressure on multiples of 10 (120 mm Hg: 15% of heart disease's rows), ST
depression on 0.0 (42%). The 32 cells spread each cell's mass evenly, so the synthetic
rows had no heaps, and a classifier told them from real ones by those two columns
alone (one-column detection AUROC 0.875 and 0.834). So the same vector also carries,
for every column whose recording resolution gives at most ``HEAP_MAX_VALUES`` values
over its public bounds (``heap_columns``: integers, continuous columns with
``decimals``), a histogram at that resolution: one more cell per such column changes
with a patient, L2 sensitivity ``sqrt(k + f)`` with ``f`` those columns, still one
Gaussian release (``cell_std``). The coordinator keeps as heaps only the recorded
values whose summed count clears ``HEAP_SIGMAS`` noise stds and ``HEAP_RATIO`` times
their window's mean count (``heaps_from_counts``), and decoding moves that share of
the window's synthetic values onto them (``encoding.snap_heaps``): post-processing.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from . import dp_histogram
from .encoding import TabularEncoder, numeric_working_scale
from .schema import Column, Schema

if TYPE_CHECKING:
    from .privacy.release_noise import ReleaseNoise

#: Share of a site's budget the release takes by default (``grid_noise_for``). On the
#: heart data's four sites the grid alone (uniform draws decoded through it) had std
#: ratios 0.88-1.02 (medians of 5 draws) at noise multiplier 3, 0.85-1.02 at 4,
#: 0.79-1.06 at 6; a share of 0.2 gave 3.8 at epsilon 3 (benchmarks/deep-spread).
#: With the heap histograms in the same vector a patient changes 9 cells on heart
#: disease, not 5: at 0.35 the coarse cells' noise was 0.2's again (multiplier 2.9 x 3
#: against 3.8 x 2.24) and ddpm's cholesterol spread fell below 0.8 in 4 runs of 8; at
#: 0.5 (2.4 x 3, per summed cell 14.4 against 17.0) in 1 of 8, at the same detection
#: and fidelity (benchmarks/deep-spread/results.md "Sixth pass").
DEFAULT_GRID_SHARE = 0.5


def grid_noise_for(epsilon: float, delta: float, share: float) -> float:
    """The release's noise multiplier: ``share`` of the budget in zero-concentrated DP.

    A budget (epsilon, delta) is read as rho-zCDP through epsilon = rho + 2
    sqrt(rho ln(1/delta)); a Gaussian release of multiplier m costs rho = 1 / (2 m^2),
    so m = 1 / sqrt(2 share rho). A public function of public settings: every site
    with the same budget uses the same noise, and a smaller budget gets a coarser grid
    rather than an infeasible study. The ledger then accounts the release exactly.
    """
    if not (epsilon > 0 and 0 < delta < 1 and 0 < share < 1):
        raise ValueError("grid_noise_for needs epsilon > 0, 0 < delta < 1, 0 < share < 1")
    log_term = math.log(1.0 / delta)
    root = -math.sqrt(log_term) + math.sqrt(log_term + epsilon)  # sqrt(rho)
    return 1.0 / math.sqrt(2.0 * share * root * root)


#: A column gets a histogram at its recording resolution (for heaps) when that
#: resolution gives at most this many values over its public bounds (heart disease:
#: age 83, trestbps 181, thalach 181, oldpeak 101; cholesterol's 621 would spread its
#: noise over values that hold 2 patients each).
HEAP_MAX_VALUES = 200
#: A recorded value is a heap when its summed noisy count clears this many noise stds
#: (about 0.04 false heaps per study over heart disease's 546 values)...
HEAP_SIGMAS = 4.0
#: ...and this many times the mean count per value of its window (``HEAP_WINDOW``,
#: from the same release's coarse cells), so that the mode of a smooth column is not
#: taken for a heap.
HEAP_RATIO = 4.0
#: Half-width of a heap's window, in coarse cells: centred on the heap, so that moving
#: the window's values onto it pulls them from both sides alike (windows cut at the
#: coarse cells' edges pulled from one side and narrowed trestbps' and oldpeak's spread
#: by 2-3%); 1.5 cells catches the mass the grid's smoothing spread from the heap.
HEAP_WINDOW = 1.5


def numeric_columns(schema: Schema) -> list[Column]:
    """The columns the grid covers, in release order (a code set's members are not)."""
    return [c for c in schema.columns if c.is_numeric and not c.group]


def resolution(column: Column) -> float | None:
    """The public step between a column's recorded values (None: not recorded on a
    grid, or a survival time, whose working scale is logarithmic)."""
    if column.kind == "integer":
        return 1.0
    if column.kind == "continuous" and column.decimals is not None:
        return 10.0 ** -column.decimals
    return None


def recorded_values(column: Column) -> np.ndarray:
    """The values a column can be recorded as, over its public bounds."""
    step = resolution(column)
    if step is None:
        return np.zeros(0)
    lo, hi = float(column.min), float(column.max)  # type: ignore[arg-type]
    count = int(round((hi - lo) / step)) + 1
    return np.round(lo + step * np.arange(count), 10)


def heap_columns(schema: Schema) -> list[Column]:
    """The numeric columns whose release includes a histogram at recording resolution."""
    return [c for c in numeric_columns(schema)
            if 0 < len(recorded_values(c)) <= HEAP_MAX_VALUES]


def release_cells(schema: Schema) -> int:
    """Length of one site's release vector."""
    return (dp_histogram.BINS * len(numeric_columns(schema))
            + sum(len(recorded_values(c)) for c in heap_columns(schema)))


def cell_std(schema: Schema, noise_multiplier: float) -> float:
    """Std of the noise in each cell of one site's release: a patient changes one cell
    of each coarse histogram and one of each recording-resolution one."""
    changed = len(numeric_columns(schema)) + len(heap_columns(schema))
    return noise_multiplier * math.sqrt(max(changed, 1))


def site_counts(encoder: TabularEncoder, matrix: np.ndarray) -> np.ndarray:
    """The exact counts a site's release perturbs: ``matrix`` as ``encoder`` encoded it
    (a site's table under public bounds), one histogram per numeric column, then one at
    recording resolution per heap column."""
    values = encoder.working_values(matrix)
    parts = []
    for column in numeric_columns(encoder.schema):
        _, lo, hi = numeric_working_scale(column, None)
        parts.append(dp_histogram.histogram(values[column.name], lo, hi))
    for column in heap_columns(encoder.schema):
        grid = recorded_values(column)
        half = (grid[1] - grid[0]) / 2.0 if len(grid) > 1 else 0.5
        parts.append(dp_histogram.histogram(values[column.name], grid[0] - half,
                                            grid[-1] + half, bins=len(grid)))
    return np.concatenate(parts) if parts else np.zeros(0)


def release(encoder: TabularEncoder, matrix: np.ndarray, noise_multiplier: float | None,
            noise: ReleaseNoise | None) -> np.ndarray:
    """A site's release: exact counts plus secret Gaussian noise (None: no DP)."""
    std = None if noise_multiplier is None else cell_std(encoder.schema, noise_multiplier)
    return dp_histogram.add_noise(site_counts(encoder, matrix), std, noise)


def grid_from_counts(schema: Schema, summed: np.ndarray,
                     total_cell_std: float) -> dict[str, list[float]]:
    """Quantile edges per numeric column from the summed releases; ``total_cell_std`` is
    the std of the noise in each summed cell (``cell_std * sqrt(sites)``; 0 without DP)."""
    columns = numeric_columns(schema)
    bins = dp_histogram.BINS
    summed = _checked(schema, summed)
    grid: dict[str, list[float]] = {}
    for i, column in enumerate(columns):
        _, lo, hi = numeric_working_scale(column, None)
        edges = dp_histogram.quantile_edges(summed[i * bins:(i + 1) * bins], lo, hi,
                                            total_cell_std)
        grid[column.name] = [float(v) for v in edges]
    return grid


def _checked(schema: Schema, summed: np.ndarray) -> np.ndarray:
    summed = np.asarray(summed, dtype=float)
    cells = release_cells(schema)
    if summed.shape != (cells,):
        raise ValueError(f"a grid release has {cells} cells for this schema, "
                         f"got {summed.shape}")
    return summed


def heaps_from_counts(schema: Schema, summed: np.ndarray,
                      total_cell_std: float) -> dict[str, list[list[float]]]:
    """Per heap column, its heaps as ``[value, window_lo, window_hi, share]``: decoded
    values in [window_lo, window_hi) move onto ``value`` with probability ``share``.

    The window is ``HEAP_WINDOW`` coarse cells either side of the value (public
    geometry); ``share`` is the heap's count over the window's coarse counts (fewer
    noisy cells than the window's values at recording resolution; a cell the window
    cuts counts in proportion), both from the noisy sum, clipped to [0, 1]. Post-processing of the
    release; without DP (``total_cell_std`` 0) a heap still has to be ``HEAP_RATIO``
    times its window's mean, and at least one patient.
    """
    summed = _checked(schema, summed)
    bins = dp_histogram.BINS
    coarse = {c.name: summed[i * bins:(i + 1) * bins]
              for i, c in enumerate(numeric_columns(schema))}
    pos = bins * len(coarse)
    out: dict[str, list[list[float]]] = {}
    floor = max(HEAP_SIGMAS * total_cell_std, 1.0)
    for column in heap_columns(schema):
        grid = recorded_values(column)
        counts = summed[pos:pos + len(grid)]
        pos += len(grid)
        lo, hi = float(column.min), float(column.max)  # type: ignore[arg-type]
        width = (hi - lo) / bins
        found = []
        for j in np.flatnonzero(counts > floor):
            w_lo = max(grid[j] - HEAP_WINDOW * width, lo)
            w_hi = min(grid[j] + HEAP_WINDOW * width, hi + width)
            window = _window_count(coarse[column.name], lo, width, w_lo, w_hi)
            per_value = window / max(int(((grid >= w_lo) & (grid < w_hi)).sum()), 1)
            if window <= 0 or counts[j] < HEAP_RATIO * per_value:
                continue
            found.append([float(grid[j]), float(w_lo), float(w_hi),
                          float(min(counts[j] / window, 1.0))])
        if found:
            out[column.name] = _separate(found)
    return out


def _window_count(coarse: np.ndarray, lo: float, width: float, a: float, b: float) -> float:
    """The coarse noisy counts (clipped at 0) over [a, b), a cell cut by the window
    counting in proportion to its overlap."""
    edges = lo + width * np.arange(len(coarse) + 1)
    overlap = np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], a), 0.0, None) / width
    return float((np.clip(coarse, 0.0, None) * overlap).sum())


def _separate(heaps: list[list[float]]) -> list[list[float]]:
    """Overlapping windows split at the midpoint between their heaps, so each decoded
    value meets at most one heap."""
    heaps = sorted(heaps)
    for a, b in zip(heaps, heaps[1:], strict=False):
        if a[2] > b[1]:
            mid = (a[0] + b[0]) / 2.0
            a[2], b[1] = mid, mid
    return heaps
