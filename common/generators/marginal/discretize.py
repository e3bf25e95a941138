"""Cells of a marginal model, from the schema's public domain only (never from rows).

Each schema column becomes one discrete attribute of the model:

- categorical and binary columns keep their categories, a code set's codes are one
  binary attribute each (that is how the schema already expands them), unless the
  schema groups them: then one attribute per group (``codes.py``);
- integer, continuous and survival-time columns are cut into ``bins`` equal-width bins
  of the public range [min, max] (survival times on log(1 + t), as the encoder does,
  because follow-up is heavy-tailed); an integer column with no more values than
  ``bins`` keeps one cell per value;
- a missing value is one more cell of its column when the schema says it may be missing.

Numeric columns can instead be binned from a DP release (``FineCells``,
:meth:`Discretizer.refined`): the column's noisy 1-way histogram over ``fine`` equal-width
cells of the public range is released first; the model's bins are then runs of those
fine cells of about equal mass (``common/dp_histogram.py``), and a value is decoded by
drawing a fine cell of its bin by the clipped noisy fine counts, then a grid value in
it. The fine cells nest in the bins, so decoded values still fall in their own bin.

Decoding draws a value inside the cell. An integer column draws on its integer grid
(uniform over the integers of the bin, so no value is ever off the grid and no
rounding piles mass on bin edges); a continuous column
draws on the grid of its ``decimals`` when the schema gives them (else uniformly in the
bin). Either way a decoded value falls back into its own cell.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from ...schema import Column, Schema
from ...table import _match_category
from .codes import DEFAULT_CAP, CodeGroup, code_groups

DEFAULT_BINS = 10


@dataclass(frozen=True)
class FineCells:
    """A numeric column's bins as runs of fine equal-width cells (from a DP release).

    ``cuts[j] .. cuts[j+1]`` are the fine cells of bin j (``cuts[0] = 0``,
    ``cuts[-1] = count``); ``weights`` are the clipped noisy fine counts, used only to
    place a decoded value inside its bin. Both are post-processing of noisy counts."""

    count: int
    cuts: tuple[int, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        cuts = np.asarray(self.cuts)
        if (len(cuts) < 2 or cuts[0] != 0 or cuts[-1] != self.count
                or np.any(np.diff(cuts) < 1)):
            raise ValueError(f"bin cuts {list(self.cuts)} must rise strictly from 0 to "
                             f"{self.count} (the number of fine cells)")
        if len(self.weights) != self.count:
            raise ValueError(f"{len(self.weights)} fine weights for {self.count} cells")


@dataclass(frozen=True)
class Attribute:
    """One column as the model sees it: its cells and how to map values to them."""

    column: Column
    bins: int  # numeric: number of value bins (missing cell excluded)
    fine: FineCells | None = None  # numeric: bins made of fine cells (DP-derived)

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
        if self.fine is not None:
            fine = self._fine_attribute().value_cell(values)
            return np.searchsorted(np.asarray(self.fine.cuts), fine, side="right") - 1
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
        if self.fine is not None:
            return self._fine_attribute().edges()[np.asarray(self.fine.cuts)]
        lo, hi = self._bounds()
        if self._integer_grid() and not self._log:
            return lo + np.arange(self.bins + 1) * (hi - lo + 1) / self.bins
        return np.linspace(lo, hi, self.bins + 1)

    def decode(self, cells: np.ndarray, rng: np.random.Generator) -> pd.Series:
        """A schema-valid value for every cell index."""
        cells = np.asarray(cells, dtype=np.int64)
        missing = (cells == self.missing_cell) if self.column.nullable else np.zeros(
            len(cells), dtype=bool)
        if not self.numeric:
            cats = list(self.column.categories)
            out = [np.nan if m else cats[c] for c, m in zip(cells, missing, strict=True)]
            return pd.Series(out, dtype=object)
        values = self._draw_in_bins(np.where(missing, 0, cells), rng)
        values = np.where(missing, np.nan, values)
        if self._integer_grid():
            return pd.Series(pd.array(values, dtype="Float64").astype("Int64"))
        if self.column.decimals is not None:
            values = np.round(values, self.column.decimals)
        lo, hi = float(self.column.min), float(self.column.max)  # type: ignore[arg-type]
        return pd.Series(np.clip(values, lo, hi))

    def grid(self) -> np.ndarray | None:
        """Every value the column can be recorded as, when that set is finite and small:
        the integers of an integer column (or of a survival time in whole days), the
        multiples of 10^-decimals of a continuous column. None: a continuum."""
        lo, hi = float(self.column.min), float(self.column.max)  # type: ignore[arg-type]
        if self._integer_grid():
            step = 1.0
        elif self.column.decimals is not None:
            step = 10.0 ** -self.column.decimals
        else:
            return None
        count = int(math.floor((hi - lo) / step + 1e-9)) + 1
        if count > 200_000:
            return None
        return np.round(lo + np.arange(count) * step, 10)

    def _draw_in_bins(self, bins: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A value in each bin: uniform over the bin's recordable values (its grid), so a
        decoded value always falls back into its own bin and never between grid points."""
        if self.fine is not None:
            return self._draw_fine(bins, rng)
        grid = self.grid()
        grid_cells = self.value_cell(grid) if grid is not None else None
        edges = self.edges()
        out = np.empty(len(bins), dtype=float)
        for b in np.unique(bins):
            rows = np.flatnonzero(bins == b)
            if grid is not None:
                points = grid[grid_cells == b]
                if points.size:
                    out[rows] = rng.choice(points, size=len(rows))
                    continue
            v = rng.uniform(edges[b], edges[b + 1], size=len(rows))
            out[rows] = np.expm1(v) if self._log else v
        return out


    # -- bins made of fine cells (numeric path) -----------------------------------------
    def _fine_attribute(self) -> Attribute:
        """The same column cut into the fine equal-width cells its bins are made of."""
        assert self.fine is not None
        return Attribute(self.column, self.fine.count)

    def _draw_fine(self, bins: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A fine cell of each bin, drawn by the clipped noisy fine counts (uniform over
        the bin's cells if they are all zero), then a grid value inside that cell."""
        assert self.fine is not None
        cuts, weights = np.asarray(self.fine.cuts), np.asarray(self.fine.weights, float)
        fine = np.empty(len(bins), dtype=np.int64)
        for b in np.unique(bins):
            rows = np.flatnonzero(bins == b)
            w = weights[cuts[b]:cuts[b + 1]]
            p = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))
            fine[rows] = cuts[b] + rng.choice(len(w), size=len(rows), p=p)
        return self._fine_attribute()._draw_in_bins(fine, rng)


def grid_cells(column: Column, bins: int) -> int:
    """Cells of a column cut into ``bins`` equal-width cells, but never more cells than
    the values it can be recorded as (the integers of an integer column, the multiples
    of 10^-decimals of a continuous one): with as many cells as grid values each value
    has a cell of its own, so a heaped value (an ST depression of 0.0 mm, 40% of the
    heart patients) is not split with its neighbour when decoded. The grid of a
    continuous column then maps value j to cell j (cell width (hi - lo) / count, just
    under one step)."""
    if column.kind == "integer":
        return min(bins, int(column.max - column.min) + 1)  # type: ignore[operator]
    if column.kind == "continuous" and column.decimals is not None:
        step = 10.0 ** -column.decimals
        count = int(math.floor((float(column.max) - float(column.min)) / step + 1e-9)) + 1  # type: ignore[arg-type]
        return max(2, min(bins, count))
    return bins


class Discretizer:
    """Every column of the schema as a model attribute (see the module docstring)."""

    def __init__(self, schema: Schema, bins: int = DEFAULT_BINS, *, group_codes: bool = True,
                 code_cap: int = DEFAULT_CAP) -> None:
        if bins < 2:
            raise ValueError("bins must be >= 2")
        self.schema = schema
        self.attributes: list[Attribute | CodeGroup] = []
        self.groups = code_groups(schema, code_cap) if group_codes else []
        # the code histogram's noisy counts per group (codes.py); None: uniform in group
        self.code_weights: dict[str, np.ndarray] = {}
        grouped = {m: g for g in self.groups for m in g.members}
        for column in schema.columns:
            if column.name in grouped:
                if column.name == grouped[column.name].members[0]:
                    self.attributes.append(grouped[column.name])
                continue
            self.attributes.append(Attribute(column, grid_cells(column, bins)))

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]

    def refined(self, fine: dict[str, FineCells]) -> Discretizer:
        """A copy whose named numeric columns use bins made of fine cells.

        ``self`` must cut those columns into the fine cells (``Discretizer(schema,
        fine_bins)``): each ``FineCells.count`` must match, so a site and the
        coordinator cannot disagree on what a cut means."""
        out = copy.copy(self)
        out.attributes, out.code_weights = [], dict(self.code_weights)
        for a in self.attributes:
            f = fine.get(a.name)
            if f is not None:
                if (not isinstance(a, Attribute) or not a.numeric or a.fine is not None
                        or a.bins != f.count):
                    raise ValueError(f"column {a.name!r}: cuts over {f.count} fine cells do "
                                     f"not fit its {getattr(a, 'bins', a.size)} cells")
                a = replace(a, bins=len(f.cuts) - 1, fine=f)
            out.attributes.append(a)
        return out

    def numeric_names(self) -> list[str]:
        return [a.name for a in self.attributes if a.numeric]

    @property
    def shape(self) -> dict[str, int]:
        return {a.name: a.size for a in self.attributes}

    def attribute(self, name: str) -> Attribute:
        for a in self.attributes:
            if a.name == name and isinstance(a, Attribute):
                return a
        grouped = next((g.name for g in self.groups if name in g.members), None)
        if grouped is not None:
            raise KeyError(f"code column {name!r} is modelled as part of group {grouped!r} "
                           "(the schema groups its code set): it has no cells of its own")
        raise KeyError(f"no attribute {name!r}")

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """An (n, d) matrix of cell indices, columns in schema order."""
        return np.stack([a.encode_frame(frame) if isinstance(a, CodeGroup)
                         else a.encode(frame[a.name]) for a in self.attributes], axis=1)

    @property
    def code_attrs(self) -> dict[str, int]:
        """Attributes the code histogram covers (``codes.py``), in order, with their number
        of entries: a group its member codes, an ungrouped code column one."""
        out: dict[str, int] = {}
        for a in self.attributes:
            if isinstance(a, CodeGroup):
                out[a.name] = len(a.members)
            elif a.column.group:
                out[a.name] = 1
        return out

    @property
    def direct_codes(self) -> list[str]:
        """Code attributes whose histogram entry is their 1-way marginal's "has it" cell:
        they need no 1-way release of their own (see ``codes.py``)."""
        return [a for a, n in self.code_attrs.items() if n == 1 and self.shape[a] == 2]

    def code_presence(self, frame: pd.DataFrame) -> np.ndarray:
        """(n, histogram entries) 0/1 matrix in :attr:`code_attrs` order."""
        parts = []
        for a in self.attributes:
            if isinstance(a, CodeGroup):
                parts.append(a.presence(frame))
            elif a.column.group:
                v = pd.to_numeric(frame[a.name], errors="coerce").fillna(0).to_numpy(float)
                parts.append((v > 0).astype(np.int64)[:, None])
        return (np.concatenate(parts, axis=1) if parts
                else np.zeros((len(frame), 0), dtype=np.int64))

    def decode(
        self,
        cells: np.ndarray,
        rng: np.random.Generator,
        fixed: dict[str, object] | None = None,
    ) -> pd.DataFrame:
        """A typed frame in the schema; ``fixed`` values (exact conditions) are copied."""
        fixed = fixed or {}
        data = {}
        for j, a in enumerate(self.attributes):
            if isinstance(a, CodeGroup):
                codes = a.decode(cells[:, j], self.code_weights.get(a.name), rng)
                for k, member in enumerate(a.members):
                    data[member] = pd.Series(codes[:, k].tolist(), dtype=object)
                continue
            col = a.decode(cells[:, j], rng)
            if a.name in fixed and fixed[a.name] is not None and a.numeric:
                col = pd.Series([fixed[a.name]] * len(cells), dtype=col.dtype)
            data[a.name] = col
        return pd.DataFrame(data)[self.schema.names]


# -- a study's binning as it travels (coordinator -> sites) and is saved ----------------
def binning_to_json(fine_bins: int, fine: dict[str, FineCells], weights: bool = False) -> str:
    """The public description of the cells: the fine resolution and each column's cuts
    (and, for a saved model, the decoding weights; the sites need only the cuts)."""
    raw: dict[str, object] = {"fine": fine_bins,
                              "cuts": {k: list(map(int, f.cuts)) for k, f in fine.items()}}
    if weights:
        raw["weights"] = {k: [float(w) for w in f.weights] for k, f in fine.items()}
    return json.dumps(raw)


def discretizer_for(schema: Schema, bins: int, binning: str | None, *,
                    group_codes: bool = True, code_cap: int = DEFAULT_CAP) -> Discretizer:
    """The cells a request or a saved model names: equal-width ``bins`` when no binning
    is given; the fine cells when only ``fine`` is (the fine 1-way release); bins made
    of fine cells when cuts are given too. Malformed cuts are a ValueError.
    ``group_codes``/``code_cap``: how code sets become attributes (``codes.py``)."""
    if not binning:
        return Discretizer(schema, bins, group_codes=group_codes, code_cap=code_cap)
    raw = json.loads(binning)
    fine = Discretizer(schema, int(raw["fine"]), group_codes=group_codes, code_cap=code_cap)
    cuts = raw.get("cuts") or {}
    weights = raw.get("weights") or {}
    cells = {}
    for name, c in cuts.items():
        count = fine.attribute(name).bins
        w = weights.get(name) or [0.0] * count
        cells[name] = FineCells(count, tuple(int(x) for x in c), tuple(float(x) for x in w))
    return fine.refined(cells) if cells else fine
