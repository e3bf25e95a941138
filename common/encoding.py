"""Schema-driven encoding of a typed table to a float matrix and back.

Every number here comes from the schema or from a public DP release, none from the
rows: continuous and integer columns are scaled to [-1, 1] by their public bounds,
categories are one-hot over the published list.

With a quantile grid (``grid``: per numeric column, quantile edges at evenly spaced
probabilities, derived from the sites' summed DP histograms by ``dp_histogram``), a
numeric value is instead mapped through that piecewise-linear CDF and to its normal
score (``grid_scores``), so the data fill [-1, 1] as a Gaussian whatever the public
bounds (a survival time of 1-44 months under bounds of 0-300 no longer sits in a
corner), and a generator whose output spreads wider than the data decodes to the
data's range rather than the bounds'.

Missing values are part of the data (clinical tables have holes, often
informative ones), so they are modelled rather than dropped:

- a numeric column that may be missing gets a two-way block ``[present, missing]``
  beside its value (the value slot holds 0, the midpoint, when missing);
- a categorical column that may be missing gets one extra one-hot slot for "missing".

Decoding inverts this exactly: numbers are clipped to the bounds and integer columns
rounded; the category with the highest score wins; a value is missing where its
missing slot wins. Generators that need to *sample* categories do so before decoding
(``decode`` takes scores or one-hot samples alike).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from .schema import Column, Schema

MISSING = "__missing__"


@dataclass(frozen=True)
class Block:
    """A contiguous slice of the encoded row that belongs to one column."""

    column: str  # the column's name (a code set's name for a multihot block)
    kind: str  # "numeric" | "onehot" | "missing" | "multihot"
    start: int
    size: int

    @property
    def stop(self) -> int:
        return self.start + self.size

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)


class TabularEncoder:
    """Encode a typed frame (see ``table.read_table``) for the generators, and back."""

    def __init__(self, schema: Schema, grid: dict[str, list[float]] | None = None,
                 heaps: dict[str, list[list[float]]] | None = None) -> None:
        self.schema = schema
        self.grid = _check_grid(schema, grid or {})
        self.heaps = _check_heaps(schema, heaps or {})
        blocks: list[Block] = []
        pos = 0
        self.codesets = schema.codesets
        for column in schema.columns:
            if column.group:
                members = self.codesets[column.group]
                if column.name == members[0]:
                    blocks.append(Block(column.group, "multihot", pos, len(members)))
                    pos += len(members)
                continue
            if column.is_numeric:
                blocks.append(Block(column.name, "numeric", pos, 1))
                pos += 1
                if column.nullable:
                    blocks.append(Block(column.name, "missing", pos, 2))
                    pos += 2
            else:
                size = len(column.categories) + (1 if column.nullable else 0)
                blocks.append(Block(column.name, "onehot", pos, size))
                pos += size
        self.blocks: tuple[Block, ...] = tuple(blocks)
        self.dim = pos
        # name -> column and code -> slot: a code set of 1,236 members makes every
        # linear lookup in a per-column loop quadratic
        self._columns = {c.name: c for c in schema.columns}
        self._slot = {name: j for members in self.codesets.values()
                      for j, name in enumerate(members)}

    def categories(self, column: Column) -> list[object]:
        """The one-hot slots of a categorical column, 'missing' last if it can be."""
        cats: list[object] = list(column.categories)
        if column.nullable:
            cats.append(MISSING)
        return cats

    @property
    def onehot_blocks(self) -> list[Block]:
        """Blocks a generator must treat as categorical (softmax outputs)."""
        return [b for b in self.blocks if b.kind in ("onehot", "missing")]

    @property
    def numeric_blocks(self) -> list[Block]:
        return [b for b in self.blocks if b.kind == "numeric"]

    @property
    def multihot_blocks(self) -> list[Block]:
        """Code sets: independent 0/1 slots (a generator treats each as a Bernoulli)."""
        return [b for b in self.blocks if b.kind == "multihot"]

    def block(self, column: str, kind: str) -> Block:
        for b in self.blocks:
            if b.column == column and b.kind == kind:
                return b
        raise KeyError(f"no {kind} block for column {column!r}")

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """Encode a typed frame; values must already conform to the schema."""
        n = len(frame)
        out = np.zeros((n, self.dim), dtype=np.float32)
        for group, members in self.codesets.items():
            b = self.block(group, "multihot")
            ones = np.empty(len(members), dtype=object)
            ones[:] = [self._columns[name].categories[1] for name in members]
            # one object-array comparison for the whole set (Python == per cell, as before)
            cells = frame[list(members)].to_numpy(dtype=object)
            out[:, b.start : b.start + len(members)] = cells == ones[None, :]
        for column in self.schema.columns:
            if column.group:
                continue
            values = frame[column.name]
            missing = values.isna().to_numpy()
            if column.is_numeric:
                num = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
                num, lo, hi = _numeric_scale(column, num)
                edges = self.grid.get(column.name)
                if edges is None:
                    scaled = 2.0 * (num - lo) / (hi - lo) - 1.0
                else:
                    scaled = np.where(np.isnan(num), np.nan, grid_scores(num, edges))
                scaled = np.clip(np.nan_to_num(scaled, nan=0.0), -1.0, 1.0)
                out[:, self.block(column.name, "numeric").start] = scaled
                if column.nullable:
                    mb = self.block(column.name, "missing")
                    out[:, mb.start] = (~missing).astype(np.float32)
                    out[:, mb.start + 1] = missing.astype(np.float32)
            else:
                b = self.block(column.name, "onehot")
                cats = self.categories(column)
                lookup = {str(c): i for i, c in enumerate(cats)}
                for row, (value, is_na) in enumerate(zip(values.tolist(), missing, strict=True)):
                    key = MISSING if is_na else str(value)
                    out[row, b.start + lookup[key]] = 1.0
        return out

    def working_values(self, matrix: np.ndarray) -> dict[str, np.ndarray]:
        """Each numeric column of an encoded ``matrix`` on the working scale (log1p for
        survival times), NaN where the missing slot says missing; no clipping to bounds
        beyond the encoding's own."""
        out: dict[str, np.ndarray] = {}
        for column in self.schema.columns:
            if column.group or not column.is_numeric:
                continue
            _, lo, hi = _numeric_scale(column, None)
            scaled = np.clip(np.asarray(matrix[:, self.block(column.name, "numeric").start],
                                        dtype=float), -1.0, 1.0)
            edges = self.grid.get(column.name)
            if edges is None:
                values = lo + (scaled + 1.0) / 2.0 * (hi - lo)
            else:
                values = grid_values(scaled, edges)
            if column.nullable:
                mb = self.block(column.name, "missing")
                values = np.where(matrix[:, mb.start + 1] > matrix[:, mb.start], np.nan, values)
            out[column.name] = values
        return out

    def reencode(self, matrix: np.ndarray, source: TabularEncoder) -> np.ndarray:
        """``matrix`` (encoded by ``source``, same schema) in this encoder's numeric
        scale: a site keeps its table encoded by public bounds (``client/site.py``) and
        moves it onto the study's quantile grid once the grid is known."""
        if not self.grid and not source.grid:
            return matrix
        out = np.array(matrix, dtype=np.float32, copy=True)
        for name, values in source.working_values(matrix).items():
            column = self._columns[name]
            _, lo, hi = _numeric_scale(column, None)
            edges = self.grid.get(name)
            if edges is None:
                scaled = 2.0 * (values - lo) / (hi - lo) - 1.0
            else:
                scaled = grid_scores(values, edges)
            out[:, self.block(name, "numeric").start] = np.clip(
                np.nan_to_num(scaled, nan=0.0), -1.0, 1.0)
        return out

    def decode(self, matrix: np.ndarray) -> pd.DataFrame:
        """Turn generator output (scores or one-hot samples) into a typed frame."""
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[1] != self.dim:
            raise ValueError(f"expected an (n, {self.dim}) matrix, got {matrix.shape}")
        data: dict[str, object] = {}
        n = matrix.shape[0]
        for column in self.schema.columns:
            if column.group:
                b = self.block(column.group, "multihot")
                zero, one = column.categories
                col = np.empty(n, dtype=object)
                col.fill(zero)
                col[matrix[:, b.start + self._slot[column.name]] > 0.5] = one
                data[column.name] = col
            elif column.is_numeric:
                _, lo, hi = _numeric_scale(column, None)
                scaled = np.clip(matrix[:, self.block(column.name, "numeric").start], -1, 1)
                edges = self.grid.get(column.name)
                if edges is None:
                    values = lo + (scaled + 1.0) / 2.0 * (hi - lo)
                else:
                    values = grid_values(scaled, edges)
                if column.name in self.heaps:
                    values = snap_heaps(values, self.heaps[column.name], _output_rng(matrix))
                values = np.clip(values, lo, hi)
                if column.kind == "survival_time":
                    values = np.expm1(values)
                if column.nullable:
                    mb = self.block(column.name, "missing")
                    is_missing = matrix[:, mb.start + 1] > matrix[:, mb.start]
                    values = np.where(is_missing, np.nan, values)
                if column.kind == "integer" or (
                    column.kind == "survival_time" and column.decimals == 0
                ):
                    data[column.name] = pd.array(np.round(values), dtype="Float64").astype(
                        "Int64"
                    )
                else:
                    if column.decimals is not None:
                        values = np.round(values, column.decimals)
                    data[column.name] = values
            else:
                b = self.block(column.name, "onehot")
                cats = self.categories(column)
                picks = np.argmax(matrix[:, b.slice], axis=1)
                lookup = np.empty(len(cats), dtype=object)
                lookup[:] = [np.nan if c == MISSING else c for c in cats]
                data[column.name] = lookup[picks]
        return pd.DataFrame(data)


def _numeric_scale(
    column: Column, values: np.ndarray | None
) -> tuple[np.ndarray | None, float, float]:
    """Values and public bounds on the scale the encoder works in.

    Survival times are heavy-tailed (most patients in the first years, a few followed
    for decades), so they are scaled on log(1 + t) between the public bounds: on a
    linear scale most of them would crowd near -1.
    """
    lo, hi = float(column.min), float(column.max)  # type: ignore[arg-type]
    if column.kind == "survival_time":
        return (None if values is None else np.log1p(values)), float(np.log1p(lo)), float(
            np.log1p(hi)
        )
    return values, lo, hi


#: Probability mass beyond each end of the encoded range: values below the grid's
#: TAIL-quantile encode to -1 and -1 decodes to it, so a generator's output that reaches
#: the end of [-1, 1] (clipped Gaussian noise, a diffusion chain's clamp) lands on a
#: 1% quantile, not on the most extreme patient the histogram saw.
TAIL = 0.01
#: Normal score at 1 - TAIL: the encoded value is the normal score divided by it.
_Z = float(NormalDist().inv_cdf(1 - TAIL))


def grid_scores(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Values -> [-1, 1] through the grid's piecewise-linear CDF and normal scores.

    Normal scores, not ``2 F - 1``: a generator with Gaussian outputs (the TVAE's
    learned scale, a diffusion's Gaussian part) then meets a Gaussian marginal of std
    ``1 / _Z`` (0.43), and its errors spread into thin tails instead of piling on
    the ends of a uniform."""
    u = np.interp(values, edges, np.linspace(0.0, 1.0, len(edges)))
    u = np.clip(u, TAIL, 1 - TAIL)
    return _ndtri(u) / _Z


def grid_values(scaled: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The inverse of ``grid_scores`` (scores clipped to [-1, 1] first)."""
    u = _ndtr(np.clip(scaled, -1.0, 1.0) * _Z)
    return np.interp(u, np.linspace(0.0, 1.0, len(edges)), edges)


def _ndtr(z: np.ndarray) -> np.ndarray:
    from scipy.special import ndtr

    return np.asarray(ndtr(z), dtype=float)


def _ndtri(u: np.ndarray) -> np.ndarray:
    from scipy.special import ndtri

    return np.asarray(ndtri(u), dtype=float)


def snap_heaps(values: np.ndarray, heaps: list[list[float]],
               rng: np.random.Generator) -> np.ndarray:
    """Decoded values moved onto the released heaps (``quantile_grid.heaps_from_counts``):
    each value in a heap's window ``[lo, hi)`` becomes the heap's value with the heap's
    share. The grid spreads a cell's mass evenly; real clinical values pile on a few
    recorded ones (blood pressure on multiples of 10), and this puts them back."""
    out = np.array(values, dtype=float, copy=True)
    for value, lo, hi, share in heaps:
        inside = (out >= lo) & (out < hi) & (out != value)
        out[inside & (rng.random(out.shape) < share)] = value
    return out


def _output_rng(matrix: np.ndarray) -> np.random.Generator:
    """Decoding's own draws, seeded by the generator's output: sampling stays
    reproducible under a seeded generator, and it is post-processing (no secret)."""
    digest = hashlib.blake2b(np.ascontiguousarray(matrix).tobytes(), digest_size=8)
    return np.random.default_rng(int.from_bytes(digest.digest(), "little"))


def _check_heaps(schema: Schema, heaps: dict[str, list[list[float]]]
                 ) -> dict[str, list[list[float]]]:
    """The heaps after checking they fit the schema (a model file or a study config)."""
    out: dict[str, list[list[float]]] = {}
    for name, items in heaps.items():
        try:
            column = schema.column(name)
        except KeyError:
            raise ValueError(f"heaps name column {name!r}, not in the schema") from None
        rows = [[float(x) for x in item] for item in items]
        if not column.is_numeric or any(
                len(r) != 4 or not (r[1] <= r[0] < r[2]) or not 0 <= r[3] <= 1
                or not column.min <= r[0] <= column.max for r in rows):  # type: ignore[operator]
            raise ValueError(f"heaps of {name!r} must be [value, lo, hi, share] rows with "
                             "lo <= value < hi inside the public bounds and 0 <= share <= 1")
        out[name] = rows
    return out


def _check_grid(schema: Schema, grid: dict[str, list[float]]) -> dict[str, np.ndarray]:
    """The grid as arrays, after checking it fits the schema (a model file or a study
    config carries it; a wrong one must fail here, not decode to nonsense)."""
    out: dict[str, np.ndarray] = {}
    for name, edges in grid.items():
        try:
            column = schema.column(name)
        except KeyError:
            raise ValueError(f"quantile grid names column {name!r}, not in the schema") from None
        arr = np.asarray(edges, dtype=float)
        if not column.is_numeric or column.group:
            raise ValueError(f"quantile grid given for {name!r}, which is not numeric")
        _, lo, hi = _numeric_scale(column, None)
        if (arr.ndim != 1 or len(arr) < 2 or not np.all(np.isfinite(arr))
                or np.any(np.diff(arr) <= 0)):
            raise ValueError(f"quantile grid of {name!r} must be >= 2 strictly increasing "
                             "finite values")
        span = hi - lo
        if arr[0] < lo - 1e-6 * span or arr[-1] > hi + 1e-6 * span:
            raise ValueError(f"quantile grid of {name!r} leaves the public bounds")
        out[name] = arr
    return out


def numeric_working_scale(column: Column, values: np.ndarray | None) -> tuple[
        np.ndarray | None, float, float]:
    """Values and bounds on the scale the encoder (and its quantile grid) works in."""
    return _numeric_scale(column, values)
