"""Shared views of the three tables that every metric reads.

Metrics must agree on what a value *is*: a category written ``1``, ``"1"`` or ``1.0`` is
the same category, a missing value is a category of its own for categorical columns
(clinical missingness is informative), and a synthetic value the schema does not know is
kept (so fidelity sees it) rather than raising. So the three frames are turned once into
per-column arrays:

- numeric columns (continuous, integer): float arrays, NaN = missing;
- categorical columns (categorical, binary): string labels, ``MISSING`` = missing.

Distances between rows use only the schema's public bounds (a Gower distance), never a
statistic of the rows, so a distance-based privacy score cannot itself leak an outlier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from ..schema import Column, Schema

#: The label a missing categorical value gets.
MISSING = "(missing)"

#: Largest number of distance entries computed at once (about 64 MB of float64).
_CHUNK_ENTRIES = 8_000_000


def _category_lookup(column: Column) -> tuple[dict[float, str], dict[str, str]]:
    numeric = {}
    if column.numeric_categories:
        numeric = {float(c): str(c) for c in column.categories}  # type: ignore[arg-type]
    return numeric, {str(c).strip(): str(c) for c in column.categories}


def category_labels(values: pd.Series, column: Column) -> np.ndarray:
    """Map raw cells to the declared categories' labels; missing -> MISSING.

    Values that match no declared category keep their own text, so fidelity metrics
    count them as a category the real data does not have.
    """
    numeric, textual = _category_lookup(column)
    codes, uniques = pd.factorize(values.astype(object), use_na_sentinel=True)
    mapped: list[str] = []
    for value in uniques:
        label = textual.get(str(value).strip())
        if label is None and numeric:
            try:
                label = numeric.get(float(value))
            except (TypeError, ValueError):
                label = None
        mapped.append(label if label is not None else str(value).strip())
    table = np.array([*mapped, MISSING], dtype=object)  # code -1 (missing) -> last
    return table[codes]


def numeric_values(values: pd.Series) -> np.ndarray:
    """Float values with NaN for missing, whatever the input dtype (Int64, object, float)."""
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def column_labels(column: Column) -> list[str]:
    """The labels a categorical column may take, declared order, MISSING last if nullable."""
    labels = [str(c) for c in column.categories]
    if column.nullable:
        labels.append(MISSING)
    return labels


@dataclass
class Table:
    """One table (train, holdout or synthetic) as per-column arrays; see module docstring."""

    n: int
    numeric: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, schema: Schema) -> Table:
        missing = [c for c in schema.names if c not in frame.columns]
        if missing:
            raise ValueError(f"the table lacks schema column(s): {', '.join(missing)}")
        numeric: dict[str, np.ndarray] = {}
        labels: dict[str, np.ndarray] = {}
        for column in schema.columns:
            series = frame[column.name].reset_index(drop=True)
            if column.is_numeric:
                numeric[column.name] = numeric_values(series)
            else:
                labels[column.name] = category_labels(series, column)
        return cls(n=len(frame), numeric=numeric, labels=labels)

    def take(self, rows: np.ndarray) -> Table:
        """A row subset (used for subsamples and cross-validation folds)."""
        return Table(
            n=len(rows),
            numeric={k: v[rows] for k, v in self.numeric.items()},
            labels={k: v[rows] for k, v in self.labels.items()},
        )

    def frame(self, schema: Schema) -> pd.DataFrame:
        """A flat frame: numeric as float (NaN), categorical as labels (MISSING)."""
        data: dict[str, np.ndarray] = {}
        for column in schema.columns:
            if column.is_numeric:
                data[column.name] = self.numeric[column.name]
            else:
                data[column.name] = self.labels[column.name]
        return pd.DataFrame(data)


def _scaled(values: np.ndarray, column: Column) -> np.ndarray:
    lo, hi = float(column.min), float(column.max)  # type: ignore[arg-type]
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def gower(a: Table, b: Table, schema: Schema, columns: list[str] | None = None) -> np.ndarray:
    """Gower distance between every row of ``a`` and every row of ``b`` (shape n_a x n_b).

    Per column: numeric |x - y| / (public max - public min), values clipped to the
    public bounds; categorical 0 if equal else 1. A missing value is at distance 0 from
    a missing value and 1 from any present one. The row distance is the mean over the
    columns, so it lies in [0, 1] and 0 means an exact copy. Gower (1971) is the usual
    distance for mixed clinical tables; public bounds keep it free of row statistics.
    """
    names = columns if columns is not None else schema.names
    out = np.zeros((a.n, b.n), dtype=np.float64)
    step = max(1, _CHUNK_ENTRIES // max(b.n, 1))
    prepared = []
    for name in names:
        column = schema.column(name)
        if column.is_numeric:
            prepared.append(
                ("num", _scaled(a.numeric[name], column), _scaled(b.numeric[name], column))
            )
        else:
            codes, uniques = pd.factorize(
                np.concatenate([a.labels[name], b.labels[name]]), sort=False
            )
            prepared.append(("cat", codes[: a.n], codes[a.n :]))
    for start in range(0, a.n, step):
        stop = min(a.n, start + step)
        block = out[start:stop]
        for kind, xa, xb in prepared:
            if kind == "num":
                left = xa[start:stop, None]
                diff = np.abs(left - xb[None, :])
                na_left, na_right = np.isnan(left), np.isnan(xb)[None, :]
                diff = np.where(na_left & na_right, 0.0, np.where(na_left | na_right, 1.0, diff))
                block += diff
            else:
                block += xa[start:stop, None] != xb[None, :]
    out /= max(len(names), 1)
    return out


class CategoryIndicators(TransformerMixin, BaseEstimator):
    """One-hot columns over fixed, declared categories; an unknown value gets none.

    What ``OneHotEncoder(categories=..., handle_unknown="ignore")`` computes, as one
    comparison per category: scikit-learn's encoder checks and indexes its input one
    column at a time (about a millisecond each), which on the MIMIC-III demo's 1,236
    code columns made each detection and utility fit take seconds. Nothing is learnt
    from the rows, so ``fit`` only records the width.
    """

    def __init__(self, categories: list[list[Any]]) -> None:
        self.categories = categories

    def fit(self, x: Any, y: Any = None) -> CategoryIndicators:
        self.n_features_in_ = len(self.categories)
        return self

    def transform(self, x: Any) -> np.ndarray:
        cells = np.asarray(x, dtype=object)
        if cells.ndim != 2 or cells.shape[1] != len(self.categories):
            raise ValueError(
                f"expected {len(self.categories)} categorical columns, got {cells.shape}"
            )
        blocks = [
            (cells[:, [j]] == np.asarray(cats, dtype=object)[None, :]).astype(float)
            for j, cats in enumerate(self.categories)
        ]
        return np.hstack(blocks) if blocks else np.zeros((len(cells), 0))


def feature_pipeline(schema: Schema, features: list[str]) -> ColumnTransformer:
    """Model inputs for utility and detection classifiers.

    Numeric: scaled by public bounds, missing imputed with the median of the data the
    model is trained on plus a missing indicator (so missingness can carry signal).
    Categorical: one-hot over the declared categories with missing as a category;
    unknown synthetic categories are ignored at prediction time.
    """
    numeric = [c for c in features if schema.column(c).is_numeric]
    categorical = [c for c in features if not schema.column(c).is_numeric]
    transformers = []
    if numeric:
        bounds = np.array([[schema.column(c).min, schema.column(c).max] for c in numeric], float)

        def scale(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, dtype=float)
            return (x - bounds[:, 0]) / (bounds[:, 1] - bounds[:, 0])

        transformers.append(
            (
                "numeric",
                Pipeline(
                    [
                        ("scale", FunctionTransformer(scale)),
                        (
                            "impute",
                            SimpleImputer(
                                strategy="median", add_indicator=True, keep_empty_features=True
                            ),
                        ),
                    ]
                ),
                numeric,
            )
        )
    if categorical:
        cats = [column_labels(schema.column(c)) for c in categorical]
        # a non-nullable column can still get MISSING from a faulty generator; keep the slot
        cats = [c if MISSING in c else [*c, MISSING] for c in cats]
        transformers.append(
            (
                "categorical",
                CategoryIndicators(cats),
                categorical,
            )
        )
    return ColumnTransformer(transformers)


def decimals(values: np.ndarray, max_decimals: int = 6) -> int:
    """The number of decimals the real data is recorded with (0 for whole numbers).

    Used to round synthetic values before a detection classifier sees them, so it
    tells patients apart rather than float noise.
    """
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0
    for d in range(max_decimals + 1):
        if np.allclose(finite, np.round(finite, d), rtol=0.0, atol=1e-9):
            return d
    return max_decimals


def public_matrix(table: Table, schema: Schema) -> np.ndarray:
    """Rows as numbers on public bounds only, for Euclidean methods (k-means, silhouette).

    Numeric: scaled to [0, 1] by the schema bounds, a missing value at 0.5 plus a 0/1
    missing indicator when the column is nullable. Categorical: one-hot over the
    declared categories and missing; an unknown category is all zeros.
    """
    parts: list[np.ndarray] = []
    for column in schema.columns:
        if column.is_numeric:
            x = _scaled(table.numeric[column.name], column)
            missing = np.isnan(x)
            parts.append(np.where(missing, 0.5, x)[:, None])
            if column.nullable:
                parts.append(missing[:, None].astype(float))
        else:
            labels = table.labels[column.name]
            levels = column_labels(column)
            parts.append(np.stack([labels == level for level in levels], axis=1).astype(float))
    return np.hstack(parts) if parts else np.zeros((table.n, 0))
