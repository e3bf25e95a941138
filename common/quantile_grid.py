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
"""

from __future__ import annotations

import math

import numpy as np

from . import dp_histogram
from .encoding import TabularEncoder, numeric_working_scale
from .schema import Column, Schema

#: Share of a site's budget the release takes by default (``grid_noise_for``). On the
#: heart data's four sites the grid alone (uniform draws decoded through it) had std
#: ratios 0.88-1.02 (medians of 5 draws) at noise multiplier 3, 0.85-1.02 at 4,
#: 0.79-1.06 at 6; a share of 0.2 gives 3.8 at epsilon 3 (benchmarks/deep-spread).
DEFAULT_GRID_SHARE = 0.2


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


def numeric_columns(schema: Schema) -> list[Column]:
    """The columns the grid covers, in release order (a code set's members are not)."""
    return [c for c in schema.columns if c.is_numeric and not c.group]


def cell_std(schema: Schema, noise_multiplier: float) -> float:
    """Std of the noise in each cell of one site's release."""
    return noise_multiplier * math.sqrt(max(len(numeric_columns(schema)), 1))


def site_counts(encoder: TabularEncoder, matrix: np.ndarray) -> np.ndarray:
    """The exact counts a site's release perturbs: ``matrix`` as ``encoder`` encoded it
    (a site's table under public bounds), one histogram per numeric column."""
    values = encoder.working_values(matrix)
    parts = []
    for column in numeric_columns(encoder.schema):
        _, lo, hi = numeric_working_scale(column, None)
        parts.append(dp_histogram.histogram(values[column.name], lo, hi))
    return np.concatenate(parts) if parts else np.zeros(0)


def release(encoder: TabularEncoder, matrix: np.ndarray, noise_multiplier: float | None,
            rng: np.random.Generator | None) -> np.ndarray:
    """A site's release: exact counts plus secret Gaussian noise (None: no DP)."""
    std = None if noise_multiplier is None else cell_std(encoder.schema, noise_multiplier)
    return dp_histogram.add_noise(site_counts(encoder, matrix), std, rng)


def grid_from_counts(schema: Schema, summed: np.ndarray,
                     total_cell_std: float) -> dict[str, list[float]]:
    """Quantile edges per numeric column from the summed releases; ``total_cell_std`` is
    the std of the noise in each summed cell (``cell_std * sqrt(sites)``; 0 without DP)."""
    columns = numeric_columns(schema)
    bins = dp_histogram.BINS
    summed = np.asarray(summed, dtype=float)
    if summed.shape != (bins * len(columns),):
        raise ValueError(f"a grid release has {bins * len(columns)} cells for this schema, "
                         f"got {summed.shape}")
    grid: dict[str, list[float]] = {}
    for i, column in enumerate(columns):
        _, lo, hi = numeric_working_scale(column, None)
        edges = dp_histogram.quantile_edges(summed[i * bins:(i + 1) * bins], lo, hi,
                                            total_cell_std)
        grid[column.name] = [float(v) for v in edges]
    return grid
