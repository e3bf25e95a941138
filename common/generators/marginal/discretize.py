"""Cells of a marginal model, from the schema's public domain only (never from rows).

Each schema column becomes one discrete attribute of the model:

- categorical and binary columns keep their categories, a code set's codes are one
  binary attribute each (that is how the schema already expands them);
- integer, continuous and survival-time columns are cut into ``bins`` equal-width bins
  of the public range [min, max] (survival times on log(1 + t), as the encoder does,
  because follow-up is heavy-tailed); an integer column with no more values than
  ``bins`` keeps one cell per value;
- a missing value is one more cell of its column when the schema says it may be missing.

Decoding draws a value inside the cell. An integer column draws on its integer grid
(uniform over the integers of the bin, so no value is ever off the grid and no
rounding piles mass on bin edges); a continuous column draws uniformly in the bin and
rounds to the schema's ``decimals``. When the coordinator has a finer noisy 1-way
histogram of the column (``fine`` cells, measured under DP and charged), decoding
draws within the bin in proportion to it instead of uniformly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ...schema import Column, Schema
from ...table import _match_category

DEFAULT_BINS = 10


@dataclass(frozen=True)
class Attribute:
    """One column as the model sees it: its cells and how to map values to them."""

    column: Column
    bins: int  # numeric: number of value bins (missing cell excluded)

    @property
    def name(self) -> str:
        return self.column.name

    @property
    def numeric(self) -> bool:
        return self.column.is_numeric

    @property
    def _log(self) -> bool:
        return self.column.kind == "survival_time"

    def _bounds(self) -> tuple[float, float]:
        lo, hi = float(self.column.min), float(self.column.max)  # type: ignore[arg-type]
        return (math.log1p(lo), math.log1p(hi)) if self._log else (lo, hi)

    def _integer_grid(self) -> bool:
        return self.column.kind == "integer" or (
            self.column.kind == "survival_time" and self.column.decimals == 0
        )

    @property
    def size(self) -> int:
        """Number of cells, the missing cell included."""
        base = self.bins if self.numeric else len(self.column.categories)
        return base + (1 if self.column.nullable else 0)

    @property
    def missing_cell(self) -> int | None:
        return self.size - 1 if self.column.nullable else None

    def value_cell(self, values: np.ndarray) -> np.ndarray:
        """Bin of each (non-missing) numeric value; values are clipped to the domain."""
        lo, hi = self._bounds()
        v = np.log1p(np.maximum(values, 0.0)) if self._log else values
        if self._integer_grid() and not self._log:
            # equal-width bins on the integer grid: value k -> floor((k - lo) / width)
            width = (hi - lo + 1) / self.bins
            idx = np.floor((np.round(v) - lo) / width)
        else:
            idx = np.floor((v - lo) / (hi - lo) * self.bins)
        return np.clip(idx, 0, self.bins - 1).astype(np.int64)

    def encode(self, series: pd.Series) -> np.ndarray:
        """Cell index of every value (missing -> the missing cell)."""
        missing = series.isna().to_numpy()
        if self.numeric:
            num = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
            cells = self.value_cell(np.nan_to_num(num, nan=float(self.column.min)))
        else:
            lookup = {str(c): i for i, c in enumerate(self.column.categories)}
            cells = np.array(
                [0 if m else lookup[str(_match_category(v, self.column))]
                 for v, m in zip(series.tolist(), missing, strict=True)],
                dtype=np.int64,
            )
        if missing.any():
            if self.missing_cell is None:
                raise ValueError(f"column {self.name!r} has missing values the schema forbids")
            cells = np.where(missing, self.missing_cell, cells)
        return cells

    def edges(self) -> np.ndarray:
        """The bins' edges on the encoding scale (log scale for survival times)."""
        lo, hi = self._bounds()
        if self._integer_grid() and not self._log:
            return lo + np.arange(self.bins + 1) * (hi - lo + 1) / self.bins
        return np.linspace(lo, hi, self.bins + 1)

    def decode(
        self, cells: np.ndarray, rng: np.random.Generator, fine: np.ndarray | None = None
    ) -> pd.Series:
        """A schema-valid value for every cell index."""
        cells = np.asarray(cells, dtype=np.int64)
        missing = (cells == self.missing_cell) if self.column.nullable else np.zeros(
            len(cells), dtype=bool)
        if not self.numeric:
            cats = list(self.column.categories)
            out = [np.nan if m else cats[c] for c, m in zip(cells, missing, strict=True)]
            return pd.Series(out, dtype=object)
        values = self._draw_in_bins(np.where(missing, 0, cells), rng, fine)
        values = np.where(missing, np.nan, values)
        if self._integer_grid():
            return pd.Series(pd.array(values, dtype="Float64").astype("Int64"))
        if self.column.decimals is not None:
            values = np.round(values, self.column.decimals)
        lo, hi = float(self.column.min), float(self.column.max)  # type: ignore[arg-type]
        return pd.Series(np.clip(values, lo, hi))

    def fine_grid(self, cells: int) -> np.ndarray:
        """Edges of a finer histogram used to decode within bins (``cells`` per range)."""
        lo, hi = self._bounds()
        return np.linspace(lo, hi, cells + 1)

    def _draw_in_bins(
        self, bins: np.ndarray, rng: np.random.Generator, fine: np.ndarray | None
    ) -> np.ndarray:
        lo_all, hi_all = self._bounds()
        edges = self.edges()
        out = np.empty(len(bins), dtype=float)
        for b in np.unique(bins):
            rows = np.flatnonzero(bins == b)
            lo, hi = edges[b], edges[b + 1]
            if self._integer_grid() and not self._log:
                grid = np.arange(math.ceil(lo - 1e-9), math.ceil(hi - 1e-9))
                grid = grid[(grid >= lo_all) & (grid <= hi_all)]
                weights = _fine_weights(grid.astype(float), lo_all, hi_all, fine)
                out[rows] = rng.choice(grid, size=len(rows), p=weights)
                continue
            if fine is not None:
                # a finer noisy histogram: draw a fine cell in this bin, then uniform in it
                f_edges = np.linspace(lo_all, hi_all, len(fine) + 1)
                inside = np.flatnonzero((f_edges[:-1] >= lo - 1e-12) & (f_edges[1:] <= hi + 1e-12))
                if inside.size:
                    w = np.clip(fine[inside], 0, None) + 1e-9
                    pick = rng.choice(inside, size=len(rows), p=w / w.sum())
                    v = rng.uniform(f_edges[pick], f_edges[pick + 1])
                    out[rows] = np.expm1(v) if self._log else v
                    continue
            v = rng.uniform(lo, hi, size=len(rows))
            out[rows] = np.expm1(v) if self._log else v
        if self._integer_grid() and self._log:
            out = np.round(out)
        return out


def _fine_weights(
    grid: np.ndarray, lo: float, hi: float, fine: np.ndarray | None
) -> np.ndarray:
    """Probabilities of the integers of one bin: uniform, or by the fine noisy histogram."""
    if fine is None or grid.size == 0:
        return np.full(grid.size, 1.0 / max(grid.size, 1))
    idx = np.clip(((grid - lo) / (hi - lo + 1) * len(fine)).astype(int), 0, len(fine) - 1)
    w = np.clip(fine[idx], 0, None) + 1e-9
    return w / w.sum()


class Discretizer:
    """Every column of the schema as a model attribute (see the module docstring)."""

    def __init__(self, schema: Schema, bins: int = DEFAULT_BINS) -> None:
        if bins < 2:
            raise ValueError("bins must be >= 2")
        self.schema = schema
        self.attributes: list[Attribute] = []
        for column in schema.columns:
            n = bins
            if column.kind == "integer":
                n = min(bins, int(column.max - column.min) + 1)  # type: ignore[operator]
            self.attributes.append(Attribute(column, n))

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]

    @property
    def shape(self) -> dict[str, int]:
        return {a.name: a.size for a in self.attributes}

    def attribute(self, name: str) -> Attribute:
        for a in self.attributes:
            if a.name == name:
                return a
        raise KeyError(f"no attribute {name!r}")

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """An (n, d) matrix of cell indices, columns in schema order."""
        return np.stack([a.encode(frame[a.name]) for a in self.attributes], axis=1)

    def decode(
        self,
        cells: np.ndarray,
        rng: np.random.Generator,
        fine: dict[str, np.ndarray] | None = None,
        fixed: dict[str, object] | None = None,
    ) -> pd.DataFrame:
        """A typed frame in the schema; ``fixed`` values (exact conditions) are copied."""
        fine = fine or {}
        fixed = fixed or {}
        data = {}
        for j, a in enumerate(self.attributes):
            col = a.decode(cells[:, j], rng, fine.get(a.name))
            if a.name in fixed and fixed[a.name] is not None and a.numeric:
                col = pd.Series([fixed[a.name]] * len(cells), dtype=col.dtype)
            data[a.name] = col
        return pd.DataFrame(data)
