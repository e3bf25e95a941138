"""The C-index's Cox model picks its ridge penalty by cross-validation on its own
training table (``survival.choose_penalizer``), the same rule for every table: real
TCGA-BRCA rows (issue 14, seventh pass)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedsynth.common.validation import survival, validate
from fedsynth.common.validation.context import Context
from fedsynth.common.validation.data import Table
from fedsynth.simulations.datasets import load_site_frames


@pytest.fixture(scope="module")
def tcga() -> tuple[object, pd.DataFrame]:
    schema, frames = load_site_frames("tcga_brca")
    return schema, pd.concat(frames.values(), ignore_index=True)


def _split(pooled: pd.DataFrame, seed: int, n_train: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    perm = np.random.default_rng(seed).permutation(len(pooled))
    return (pooled.iloc[perm[:n_train]].reset_index(drop=True),
            pooled.iloc[perm[600:]].reset_index(drop=True))


def test_same_table_same_penalty_same_c_index(tcga: tuple[object, pd.DataFrame]) -> None:
    """The rule does not know which role a table plays: the training rows scored as the
    'synthetic' table get the reference's penalty and exactly the reference's C-index."""
    schema, pooled = tcga
    train, hold = _split(pooled, 0, 500)
    result = validate(train, hold, train.copy(), schema, survival=("T", "E"),
                      areas=("survival",))
    c = result.get("cox_c_index")
    assert c.details["penalizer"] == c.details["penalizer_ref"]
    assert c.details["penalizer"] in survival.COX_PENALIZERS
    assert c.value == pytest.approx(c.reference)
    assert c.value > 0.6


def test_small_table_gets_a_stronger_penalty_and_ranks_better(
    tcga: tuple[object, pd.DataFrame],
) -> None:
    """200 patients (21 deaths) and 40 covariates: the fixed small penalty overfits
    (holdout C-index 0.54); the cross-validated one is stronger and ranks the holdout
    better (0.63)."""
    schema, pooled = tcga
    train, hold = _split(pooled, 1, 200)
    tables = {"train": Table.from_frame(train, schema), "holdout": Table.from_frame(hold, schema)}
    ctx = Context(schema=schema, train=tables["train"], holdout=tables["holdout"],
                  synthetic=tables["train"], survival=("T", "E"))
    covs = [c for c in schema.names if c not in ("T", "E")]
    frames = {k: survival.design(ctx, t, covs) for k, t in tables.items()}
    te = {k: survival.time_event(ctx, t) for k, t in tables.items()}
    chosen = survival.choose_penalizer(frames["train"], *te["train"], ctx.rng("cox-cv"))
    assert chosen == survival.choose_penalizer(frames["train"], *te["train"], ctx.rng("cox-cv"))
    assert chosen > survival.COX_PENALIZER
    fixed = survival._c_index(survival.fit_cox(frames["train"], *te["train"]),
                              frames["holdout"], *te["holdout"])
    tuned = survival._c_index(survival.fit_cox(frames["train"], *te["train"], penalizer=chosen),
                              frames["holdout"], *te["holdout"])
    assert tuned > fixed + 0.05


def test_a_table_without_survival_never_fits_a_cox_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Heart disease has no survival pair: its validation does not reach the Cox fits,
    so the penalty's choice cannot move its figures."""
    from fedsynth.simulations.datasets import load_site_frames as load

    def refuse(*_: object, **__: object) -> float:
        raise AssertionError("choose_penalizer called on a table without survival")

    monkeypatch.setattr(survival, "choose_penalizer", refuse)
    schema, frames = load("heart_disease")
    rows = pd.concat(frames.values(), ignore_index=True)
    assert not schema.survival_pairs
    table = Table.from_frame(rows, schema)
    ctx = Context(schema=schema, train=table, holdout=table, synthetic=table)
    assert survival.run(ctx) == []
