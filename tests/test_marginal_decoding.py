"""Decoding a marginal model's numeric cells back to values (issue 13, fourth pass).

Real heart-disease rows; the noise is simulated (a seeded Gaussian of the std four
sites' summed fine release has at epsilon 3 each, labelled: a test, not a release).
What matters: a heaped value keeps its own cell and its share of its bin, and a smooth
column keeps the smooth estimate.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedsynth.common.dp_histogram import bin_weights, cell_weights, equal_mass_cuts
from fedsynth.common.generators.marginal.discretize import Discretizer, FineCells
from fedsynth.common.table import read_table

# summed noise std of 4 sites' fine release at epsilon 3 each (central emulation 1.393)
FOUR_SITES_STD = 21.0


@pytest.fixture(scope="module")
def rows(heart_schema, heart_files) -> pd.DataFrame:
    return pd.concat([read_table(p, heart_schema) for p in heart_files.values()],
                     ignore_index=True)


def test_a_grid_value_has_a_cell_of_its_own(heart_schema):
    """With more fine cells than grid values a column gets one cell per value: the
    0.1 mm grid of the ST depression (-3 to 7: 101 values), the ages 18-100 (83)."""
    fine = Discretizer(heart_schema, 256)
    oldpeak, age = fine.attribute("oldpeak"), fine.attribute("age")
    assert (oldpeak.bins, age.bins, fine.attribute("chol").bins) == (101, 83, 256)
    for attr in (oldpeak, age):
        grid = attr.grid()
        assert grid is not None
        assert np.array_equal(attr.value_cell(grid), np.arange(attr.bins))
    # decoding a cell gives back its grid value exactly
    cells = np.arange(101)
    decoded = oldpeak.decode(cells, np.random.default_rng(0)).to_numpy(dtype=float)
    assert np.allclose(decoded, np.round(-3.0 + 0.1 * cells, 1))
    # fewer fine cells than grid values: as before, equal-width cells
    assert Discretizer(heart_schema, 64).attribute("oldpeak").bins == 64


def _within_bin(weights: np.ndarray, cuts: np.ndarray, b: int) -> np.ndarray:
    w = weights[cuts[b]:cuts[b + 1]]
    return w / w.sum()


def test_bin_weights_keep_a_heap_and_leave_smooth_columns_smooth(heart_schema, rows):
    fine = Discretizer(heart_schema, 256)
    rng = np.random.default_rng(7)  # simulated noise (a test, not a release)
    share_new, share_old, tvd_new, tvd_old = [], [], [], []
    for _ in range(20):
        # a heap: ST depression 0.0 (about 40% of the patients)
        op = fine.attribute("oldpeak")
        true = np.bincount(op.value_cell(rows["oldpeak"].dropna().to_numpy(float)),
                           minlength=op.bins).astype(float)
        noisy = true + rng.normal(0, FOUR_SITES_STD, true.size)
        zero = int(op.value_cell(np.array([0.0]))[0])
        # the bin holding 0.0 also holds the rare negative values, as the noisy
        # equal-mass cuts of a federated study at epsilon 3 made it: (0, 31, 39, ...)
        cuts = np.array([0, zero + 1, zero + 9, zero + 19, zero + 30, zero + 40, op.bins])
        b = 0
        truth = true[cuts[b]:cuts[b + 1]] / true[cuts[b]:cuts[b + 1]].sum()
        new = _within_bin(bin_weights(noisy, FOUR_SITES_STD, cuts, 2.0), cuts, b)
        old = _within_bin(cell_weights(noisy, FOUR_SITES_STD), cuts, b)
        share_new.append(new[zero - cuts[b]] - truth[zero - cuts[b]])
        share_old.append(old[zero - cuts[b]] - truth[zero - cuts[b]])
        # a smooth column: age, about 9 patients per year against a noise std of 21
        ag = fine.attribute("age")
        true = np.bincount(ag.value_cell(rows["age"].to_numpy(float)),
                           minlength=ag.bins).astype(float)
        noisy = true + rng.normal(0, FOUR_SITES_STD, true.size)
        cuts = equal_mass_cuts(noisy, 6, FOUR_SITES_STD)
        new_w, old_w = bin_weights(noisy, FOUR_SITES_STD, cuts, 2.0), cell_weights(
            noisy, FOUR_SITES_STD)
        for b in range(6):
            t = true[cuts[b]:cuts[b + 1]] / max(true[cuts[b]:cuts[b + 1]].sum(), 1)
            tvd_new.append(0.5 * np.abs(_within_bin(new_w, cuts, b) - t).sum())
            tvd_old.append(0.5 * np.abs(_within_bin(old_w, cuts, b) - t).sum())
    # the heap keeps most of its share of its bin: it lost 0.45 of it (of ~0.97) to the
    # empty negative cells' noise under the smooth estimate, under 0.25 now
    assert abs(np.median(share_new)) < 0.25 < 0.4 < abs(np.median(share_old))
    # a smooth column's cells within a bin are noise-dominated either way (mean within-
    # bin TVD about 0.35 against the per-year truth); the blend stays close to before
    assert np.mean(tvd_new) <= np.mean(tvd_old) + 0.05


def test_weighted_fine_cells_decode_on_the_grid_inside_their_bin(heart_schema):
    fine = Discretizer(heart_schema, 256)
    op = fine.attribute("oldpeak")
    counts = np.zeros(op.bins)
    counts[30] = 300.0  # 0.0 mm
    counts[31:60] = 5.0
    cuts = np.array([0, 31, 40, 50, 60, 80, op.bins])
    weights = bin_weights(counts, 1.0, cuts, 2.0)
    assert np.isclose(weights.sum(), 1.0) and np.all(weights >= 0)
    disc = fine.refined({"oldpeak": FineCells(op.bins, tuple(map(int, cuts)),
                                              tuple(weights))})
    attr = disc.attribute("oldpeak")
    values = attr.decode(np.zeros(2000, dtype=np.int64), np.random.default_rng(1))
    v = values.to_numpy(dtype=float)
    # the bin's only weighted cell is 0.0: every value drawn in that bin is 0.0
    assert np.all(v == 0.0)
    assert list(attr.value_cell(np.array([0.0, 0.1]))) == [0, 1]  # 0.1 is the next bin


def test_wide_tables_keep_the_smooth_decoding(heart_schema):
    """Heart disease (91 pairs, scored) gets 256 fine cells and the heap-keeping
    weights; TCGA-BRCA and AMLSG (the public workload, many sites) keep 64 cells and
    the smooth weights, where the finer release cut worse bins and noise alone passed
    the threshold; ``fine_bins`` / ``decode_threshold`` set them explicitly."""
    from fedsynth.common.generators.marginal import MarginalGenerator
    from fedsynth.common.schema import Schema
    from fedsynth.simulations.benchmark import bundled_schema_path

    heart = MarginalGenerator(heart_schema)
    assert (heart.fine_cells(), heart.decode_threshold()) == (256, 2.0)
    for wide in ("tcga_brca", "amlsg"):
        schema = Schema.load(bundled_schema_path(wide))
        model = MarginalGenerator(schema)
        assert (model.fine_cells(), model.decode_threshold()) == (64, 0.0)
        chosen = MarginalGenerator(schema, fine_bins=128, decode_threshold=3)
        assert (chosen.fine_cells(), chosen.decode_threshold()) == (128, 3.0)
    assert MarginalGenerator(heart_schema, fine_bins=0).fine_cells() == 0
