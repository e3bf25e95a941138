"""Detection: can a classifier tell synthetic patients from real ones?

The "can an expert tell?" test, with a model as the expert: label real holdout rows 1
and as many synthetic rows 0, and measure by stratified cross-validation how well a
classifier separates them (AUROC; 0.5 = indistinguishable). Synthetic values are first
rounded to the precision the real data is recorded with, otherwise a tree model
detects the extra decimals of a generator rather than unrealistic patients.

Reference: the same test with real training rows in place of the synthetic ones.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits

from .context import Context
from .data import Table, decimals, feature_pipeline
from .metric import MetricValue, metric
from .utility import MODELS

AREA = "detection"

#: Cross-validation folds.
FOLDS = 5
#: Detection AUROC above which synthetic rows count as easy to tell apart.
DETECTION_THRESHOLD = 0.75
#: Classifiers used as the detecting "expert".
DETECTION_MODELS: tuple[str, ...] = ("gradient_boosting", "logistic_regression")


def rounded(table: Table, precision: dict[str, int]) -> Table:
    """The table with each numeric column rounded to the real data's decimals."""
    numeric = {k: np.round(v, precision[k]) for k, v in table.numeric.items()}
    return Table(n=table.n, numeric=numeric, labels=dict(table.labels))


class DropConstant(TransformerMixin, BaseEstimator):
    """Drop the features that are constant in the rows a fold trains on.

    Neither classifier can use them: a tree finds no split in a constant feature, and a
    logistic regression's gradient for its weight is exactly zero, so the weight stays
    zero. Dropping them leaves every prediction as it was, and saves the gradient
    boosting most of its time on a wide table (the MIMIC-III demo's 1,236 diagnosis
    codes one-hot encoded, most of them absent from a fold of a few dozen patients).
    """

    def fit(self, x: object, y: object = None) -> DropConstant:
        hi = np.asarray(x.max(axis=0).todense() if hasattr(x, "todense") else x.max(axis=0))
        lo = np.asarray(x.min(axis=0).todense() if hasattr(x, "todense") else x.min(axis=0))
        keep = np.ravel(hi != lo)
        self.keep_ = keep if keep.any() else np.ones_like(keep)
        return self

    def transform(self, x: object) -> object:
        return x[:, self.keep_]  # type: ignore[index]


def detection_auroc(ctx: Context, real: Table, other: Table, model: str, purpose: str) -> float:
    """Cross-validated AUROC of ``model`` telling ``real`` (1) from ``other`` (0).

    ``other`` is subsampled to the size of ``real`` so both classes weigh the same.
    """
    rng = ctx.rng(purpose)
    n = min(real.n, other.n)
    real = real.take(np.sort(rng.choice(real.n, n, replace=False)))
    other = other.take(np.sort(rng.choice(other.n, n, replace=False)))
    x = pd.concat([real.frame(ctx.schema), other.frame(ctx.schema)], ignore_index=True)
    y = np.concatenate([np.ones(n, dtype=int), np.zeros(n, dtype=int)])
    pipe = Pipeline(
        [
            ("features", feature_pipeline(ctx.schema, ctx.schema.names)),
            ("informative", DropConstant()),
            ("model", MODELS[model](ctx.seed)),
        ]
    )
    folds = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=ctx.seed)
    # A few hundred rows: the gradient boosting's OpenMP threads only add start-up and
    # spin-waiting (badly so on a shared machine); one thread gives the same trees.
    with threadpool_limits(limits=1):
        return float(np.mean(cross_val_score(pipe, x, y, cv=folds, scoring="roc_auc")))


def run(ctx: Context) -> list[MetricValue]:
    precision = {
        name: decimals(np.concatenate([ctx.train.numeric[name], ctx.holdout.numeric[name]]))
        for name in ctx.numeric_columns
    }
    synthetic = rounded(ctx.synthetic, precision)
    out = []
    for model in ctx.options.get("detection_models", DETECTION_MODELS):
        value = detection_auroc(ctx, ctx.holdout, synthetic, model, f"detect-{model}")
        reference = detection_auroc(ctx, ctx.holdout, ctx.train, model, f"detect-{model}")
        out.append(
            metric(
                f"detection_auroc_{model}",
                AREA,
                value,
                "lower",
                f"cross-validated AUROC of {model.replace('_', ' ')} telling real from "
                "synthetic rows (0.5 = indistinguishable)",
                reference=reference,
                threshold=DETECTION_THRESHOLD,
                details={"folds": FOLDS, "rounded_decimals": precision},
            )
        )
    return out
