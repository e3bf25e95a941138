"""TSTR/TRTR are the figures a user gets with the usual scikit-learn pipeline.

The validator's utility area is checked against a pipeline written here from scratch on
plain pandas frames of the real UCI heart-disease patients (imputation, a scaler
fitted on the training table, one-hot categoricals, the classifier), the way a
researcher would compute TSTR by hand. The "synthetic" table is a third, disjoint set
of real patients, so the check runs on real rows of every kind the schema has
(integers, a continuous column, categoricals, missing values).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from fedsynth.common.schema import Schema
from fedsynth.common.table import read_table
from fedsynth.common.validation import validate

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "simulations" / "data" / "heart_disease"
SITES = ("cleveland", "hungarian", "switzerland", "va")


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema.load(DATA / "schema.yaml")


@pytest.fixture(scope="module")
def split(schema: Schema) -> dict[str, pd.DataFrame]:
    frames = [read_table(DATA / f"processed.{s}.data", schema) for s in SITES]
    heart = pd.concat(frames, ignore_index=True)
    perm = np.random.default_rng(11).permutation(len(heart))
    parts = {"holdout": perm[:230], "train": perm[230:575], "synthetic": perm[575:]}
    return {k: heart.iloc[v].reset_index(drop=True) for k, v in parts.items()}


def _by_hand(train: pd.DataFrame, test: pd.DataFrame, schema: Schema, model: object) -> float:
    """TSTR as a user writes it: no fedsynth code beyond the column list."""
    target = schema.outcome.column
    positive = {str(v) for v in schema.outcome.positive}
    numeric = [c.name for c in schema.columns if c.is_numeric]
    categorical = [c.name for c in schema.columns if c.is_categorical and c.name != target]

    def xy(frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
        x = pd.DataFrame({c: pd.to_numeric(frame[c], errors="coerce").astype(float)
                          for c in numeric})
        for c in categorical:
            x[c] = frame[c].astype(object).where(frame[c].notna(), "NA").astype(str)
        y = frame[target].astype(str).isin(positive).to_numpy().astype(int)
        return x, y

    prep = ColumnTransformer([
        ("num", make_pipeline(SimpleImputer(strategy="median", add_indicator=True),
                              StandardScaler()), numeric),
        ("cat", OneHotEncoder(handle_unknown="ignore"), categorical),
    ])
    pipe = make_pipeline(prep, model)
    x_train, y_train = xy(train)
    x_test, y_test = xy(test)
    pipe.fit(x_train, y_train)
    return float(roc_auc_score(y_test, pipe.predict_proba(x_test)[:, 1]))


def test_tstr_and_trtr_match_a_hand_written_sklearn_pipeline(
    split: dict[str, pd.DataFrame], schema: Schema
) -> None:
    result = validate(split["train"], split["holdout"], split["synthetic"], schema,
                      seed=3, areas=("utility",))
    logistic = result.get("tstr_auroc_logistic_regression")
    boosting = result.get("tstr_auroc_gradient_boosting")
    hand_lr = _by_hand(split["synthetic"], split["holdout"], schema,
                       LogisticRegression(max_iter=2000))
    hand_lr_ref = _by_hand(split["train"], split["holdout"], schema,
                           LogisticRegression(max_iter=2000))
    hand_gb = _by_hand(split["synthetic"], split["holdout"], schema,
                       HistGradientBoostingClassifier(max_iter=100, random_state=3))
    # logistic regression is a convex fit: the same inputs give the same model
    assert logistic.value == pytest.approx(hand_lr, abs=1e-6)
    assert logistic.reference == pytest.approx(hand_lr_ref, abs=1e-6)
    # boosting sees the one-hot columns in another order (declared vs sorted), so its
    # tie-breaking between equally good splits may differ slightly
    assert boosting.value == pytest.approx(hand_gb, abs=0.01)
    assert result.headline()["tstr_auroc"] == pytest.approx(hand_lr, abs=1e-6)
    # the figure says how it was computed
    assert "StandardScaler" in logistic.details["pipeline"]
    assert "standard scikit-learn pipeline" in logistic.meaning


def test_standardised_tstr_sees_a_numeric_column_that_lost_its_signal(
    split: dict[str, pd.DataFrame], schema: Schema
) -> None:
    """A synthetic table whose numeric columns sit at their mean with small noise (no
    relation to anything: the collapse of issue 14) loses TSTR, whereas the same
    table with its numeric columns intact keeps it."""
    syn = split["synthetic"].copy()
    rng = np.random.default_rng(0)
    collapsed = syn.copy()
    for c in schema.columns:
        if c.is_numeric:
            x = pd.to_numeric(syn[c.name], errors="coerce").astype(float)
            collapsed[c.name] = x.mean() + 0.3 * x.std() * rng.standard_normal(len(x))
    intact = validate(split["train"], split["holdout"], syn, schema, areas=("utility",))
    lost = validate(split["train"], split["holdout"], collapsed, schema, areas=("utility",))
    assert lost.headline()["tstr_auroc"] < intact.headline()["tstr_auroc"] - 0.01
