"""Heaps: the recorded values real clinical data pile on (blood pressure on multiples
of 10, ST depression on 0.0), released with the quantile grid and put back at decoding
(``quantile_grid.heaps_from_counts``, ``encoding.snap_heaps``; sixth pass of issue 14).

Real heart-disease rows of the four hospitals. Where a test adds noise itself it is the
test's numpy draw at the benchmark's level (4 sites at epsilon 3, the default grid
share), simulated, not a site's release.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fedsynth.common import quantile_grid
from fedsynth.common.encoding import _Z, TAIL, TabularEncoder
from fedsynth.common.generators import get_generator
from fedsynth.common.generators.base import GRID_PARAM, HEAPS_PARAM
from fedsynth.common.schema import Schema
from fedsynth.common.table import read_table

SITES = 4


@pytest.fixture(scope="module")
def heart(heart_schema: Schema, heart_files) -> pd.DataFrame:
    return pd.concat([read_table(p, heart_schema) for p in heart_files.values()],
                     ignore_index=True)


def _summed_noise(schema: Schema) -> float:
    m = quantile_grid.grid_noise_for(3.0, 1e-5, quantile_grid.DEFAULT_GRID_SHARE)
    return quantile_grid.cell_std(schema, m) * math.sqrt(SITES)


def test_one_patient_moves_the_release_by_its_stated_sensitivity(heart_schema: Schema,
                                                                 heart: pd.DataFrame) -> None:
    """Playing the attacker who compares the release with and without one patient: the
    L2 change is at most sqrt(k + f) (k numeric columns, f heap columns), and the noise
    per cell is the multiplier times exactly that, so the ledger's one Gaussian entry
    (multiplier m, sensitivity 1) accounts for it. Without the heap histograms in the
    sensitivity a patient would move the vector by 3 where the noise assumed 2.24."""
    enc = TabularEncoder(heart_schema)
    matrix = enc.encode(heart)
    full = quantile_grid.site_counts(enc, matrix)
    k = len(quantile_grid.numeric_columns(heart_schema))
    f = len(quantile_grid.heap_columns(heart_schema))
    assert (k, f) == (5, 4)
    moves = [float(np.linalg.norm(full - quantile_grid.site_counts(
        enc, np.delete(matrix, i, axis=0)))) for i in range(0, len(heart), 7)]
    assert max(moves) == pytest.approx(math.sqrt(k + f))
    assert all(m <= math.sqrt(k + f) + 1e-9 for m in moves)
    assert quantile_grid.cell_std(heart_schema, 2.0) == pytest.approx(2.0 * math.sqrt(k + f))


def test_the_released_heaps_are_the_real_ones(heart_schema: Schema,
                                              heart: pd.DataFrame) -> None:
    """Over 30 simulated noise draws the coordinator finds the big heaps (oldpeak 0.0:
    42% of the rows; trestbps 120 and 130) in nearly every draw and never one in age,
    whose mode is smooth; the shares it releases are near the real shares of each
    window."""
    enc = TabularEncoder(heart_schema)
    counts = quantile_grid.site_counts(enc, enc.encode(heart))
    noise = _summed_noise(heart_schema)
    rng = np.random.default_rng(0)
    found: dict[tuple[str, float], list[float]] = {}
    for _ in range(30):
        heaps = quantile_grid.heaps_from_counts(
            heart_schema, counts + rng.normal(0.0, noise, counts.shape), noise)
        for name, rows in heaps.items():
            for value, lo, hi, share in rows:
                assert lo <= value < hi and 0 <= share <= 1
                found.setdefault((name, value), []).append(share)
    assert len(found[("oldpeak", 0.0)]) >= 29
    assert len(found[("trestbps", 120.0)]) >= 25 and len(found[("trestbps", 130.0)]) >= 25
    assert not any(name == "age" for name, _ in found)  # age's mode is smooth: no heap
    # peak heart rate is heaped on tens too (150: 43 rows, 140: 41): found sometimes,
    # and only there
    assert all(value % 10 == 0 for (name, value) in found if name == "thalach")
    oldpeak = pd.to_numeric(heart["oldpeak"], errors="coerce").dropna()
    window = oldpeak[(oldpeak >= -0.5) & (oldpeak < 0.4375)]  # coarse cells 8-10
    assert np.median(found[("oldpeak", 0.0)]) == pytest.approx((window == 0).mean(), abs=0.1)


def test_decoding_puts_the_heaps_back(heart_schema: Schema, heart: pd.DataFrame) -> None:
    """A perfect generator (Gaussian scores, what the grid's encoding makes of the rows)
    decoded through a grid with the released heaps gives oldpeak 0.0 and trestbps 120
    about as often as the real rows; through the grid alone it did not (6% at 0.0
    against 42%: a classifier told the synthetic rows from the real by these columns)."""
    enc = TabularEncoder(heart_schema)
    counts = quantile_grid.site_counts(enc, enc.encode(heart))
    noise = _summed_noise(heart_schema)
    noisy = counts + np.random.default_rng(1).normal(0.0, noise, counts.shape)
    grid = quantile_grid.grid_from_counts(heart_schema, noisy, noise)
    heaps = quantile_grid.heaps_from_counts(heart_schema, noisy, noise)
    z = np.random.default_rng(2).standard_normal((20000, 1))
    scores = np.clip(z / _Z, -1.0, 1.0)
    real = {c: pd.to_numeric(heart[c], errors="coerce").dropna() for c in ("oldpeak", "trestbps")}

    def share_at(encoder: TabularEncoder, column: str, value: float) -> float:
        matrix = np.zeros((len(scores), encoder.dim))
        matrix[:, encoder.block(column, "numeric").start] = scores[:, 0]
        if heart_schema.column(column).nullable:  # every row present
            matrix[:, encoder.block(column, "missing").start] = 1.0
        out = pd.to_numeric(encoder.decode(matrix)[column], errors="coerce")
        return float((out == value).mean())

    plain, snapped = TabularEncoder(heart_schema, grid), TabularEncoder(heart_schema, grid, heaps)
    for column, value in (("oldpeak", 0.0), ("trestbps", 120.0)):
        truth = float((real[column] == value).mean())
        assert abs(share_at(snapped, column, value) - truth) < 0.1, column
        assert share_at(plain, column, value) < truth / 2, column
    assert TAIL == 0.01  # the perfect generator above clips scores as the encoder does


def test_a_model_keeps_its_heaps_and_refuses_bad_ones(heart_schema: Schema, tmp_path) -> None:
    """Saved and loaded, a model decodes with the same heaps; a malformed heap (value
    outside its window or its public bounds, share above 1) is refused with a message
    that names the column."""
    heaps = {"oldpeak": [[0.0, -0.5, 0.4375, 0.9]]}
    model = get_generator("tvae")(heart_schema, seed=0, hidden=8, latent=2)
    model.set_grid({}, heaps)
    path = tmp_path / "m.fedsynth"
    model.save(path)
    loaded = type(model).load(path)
    assert loaded.hparams[HEAPS_PARAM] == heaps and loaded.encoder.heaps == heaps
    assert loaded.hparams[GRID_PARAM] == {}
    for bad in ([[0.0, 0.1, 0.4, 0.5]], [[9.0, 8.0, 10.0, 0.5]], [[0.0, -0.5, 0.4, 1.5]]):
        with pytest.raises(ValueError, match="heaps of 'oldpeak'"):
            TabularEncoder(heart_schema, heaps={"oldpeak": bad})
