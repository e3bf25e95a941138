"""A central ``fit`` checks its input at the edge, as scikit-learn does: the budget's
numbers and the table against the schema, before any release or training.

Why: a NaN or negative epsilon failed inside the grid planner with a message about
``grid_noise_for``, an infinite one reported "the smallest feasible epsilon is inf", the
marginal generator fitted at delta 2 and on an empty table, a missing column was a bare
KeyError, and a column of words where the schema says numbers was fitted as all missing,
silently (real heart-disease rows, Cleveland's table)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from fedsynth.common.errors import FedsynthError
from fedsynth.common.generators import get_generator
from fedsynth.common.schema import Schema
from fedsynth.common.table import read_table

SMALL = {"tvae": {"hidden": 8, "latent": 4}, "marginal": {"iters": 20}}


@pytest.fixture(scope="module")
def cleveland(heart_schema: Schema, heart_files) -> pd.DataFrame:
    return read_table(heart_files["cleveland"], heart_schema)


@pytest.mark.parametrize("name", ["tvae", "marginal"])
@pytest.mark.parametrize(("budget", "says"), [
    ({"epsilon": math.nan}, "epsilon must be a finite number > 0, got nan"),
    ({"epsilon": -1.0}, "epsilon must be a finite number > 0, got -1"),
    ({"epsilon": math.inf}, "epsilon must be a finite number > 0, got inf"),
    ({"epsilon": 3.0, "delta": 2.0}, "delta must be in (0, 1), got 2.0"),
])
def test_fit_refuses_a_budget_that_is_not_one(
    name: str, budget: dict, says: str, heart_schema: Schema, cleveland: pd.DataFrame
) -> None:
    model = get_generator(name)(heart_schema, **SMALL[name])
    with pytest.raises(FedsynthError) as err:
        model.fit(cleveland, **budget)
    assert says in str(err.value) and f"{name}.fit" in str(err.value)


@pytest.mark.parametrize("name", ["tvae", "marginal"])
@pytest.mark.parametrize(("change", "says"), [
    (lambda df: df.iloc[:0], "the table has no rows"),
    (lambda df: df.drop(columns=["age"]), "missing column(s): age"),
    (lambda df: df.assign(age="old"), "column 'age'"),
])
def test_fit_refuses_a_table_the_schema_does_not_describe(
    name: str, change, says: str, heart_schema: Schema, cleveland: pd.DataFrame
) -> None:
    model = get_generator(name)(heart_schema, **SMALL[name])
    with pytest.raises(FedsynthError) as err:
        model.fit(change(cleveland), epsilon=3.0)
    assert says in str(err.value)


@pytest.mark.parametrize("name", ["tvae", "ctgan", "ddpm", "marginal"])
def test_sample_refuses_a_model_neither_fitted_nor_loaded(name: str, heart_schema: Schema
                                                          ) -> None:
    # a deep generator sampled its random initial weights: schema-valid rows that mean
    # nothing, which a user could take for a model's (SDV and scikit-learn refuse too)
    from fedsynth.common.generators.base import NotFittedError

    model = get_generator(name)(heart_schema)
    with pytest.raises(NotFittedError, match="neither fitted nor loaded"):
        model.sample(5)
    if name != "marginal":  # a state loaded (a federated round's model) may be sampled
        twin = get_generator(name)(heart_schema)
        twin.load_state_dict(model.state_dict())
        assert len(twin.sample(5, seed=0)) == 5
