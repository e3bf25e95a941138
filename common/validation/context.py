"""What every area of the suite receives: the three tables, the schema and the options.

Holding them in one object lets areas share expensive intermediate results (the
distance matrices, above all) instead of each recomputing them, and gives every area the
same seeded randomness so a validation run is reproducible.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..schema import Schema
from .data import Table, gower


@dataclass
class Target:
    """The binary label utility metrics predict: a column and its positive labels."""

    column: str
    positive: frozenset[str]

    def labels(self, table: Table) -> np.ndarray:
        return np.isin(table.labels[self.column], list(self.positive)).astype(int)


@dataclass
class Context:
    """Inputs of one validation run plus a cache shared by the areas."""

    schema: Schema
    train: Table
    holdout: Table
    synthetic: Table
    seed: int = 0
    target: Target | None = None
    survival: tuple[str, str] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def table(self, name: str) -> Table:
        return {"train": self.train, "holdout": self.holdout, "synthetic": self.synthetic}[name]

    def rng(self, purpose: str) -> np.random.Generator:
        """A generator seeded by the run's seed and the purpose, so areas are independent
        of each other's order and a metric gives the same value alone or in the suite."""
        return np.random.default_rng([self.seed, zlib.crc32(purpose.encode())])

    def distances(self, a: str, b: str) -> np.ndarray:
        """Gower distances from every row of table ``a`` to every row of ``b``, cached."""
        key = ("gower", a, b)
        if key not in self._cache:
            flipped = ("gower", b, a)
            if flipped in self._cache:
                self._cache[key] = self._cache[flipped].T
            else:
                self._cache[key] = gower(self.table(a), self.table(b), self.schema)
        return self._cache[key]

    def self_distances(self, name: str) -> np.ndarray:
        """Distances within one table, with the diagonal (a row to itself) set to inf."""
        key = ("gower-self", name)
        if key not in self._cache:
            d = gower(self.table(name), self.table(name), self.schema)
            np.fill_diagonal(d, np.inf)
            self._cache[key] = d
        return self._cache[key]

    @property
    def numeric_columns(self) -> list[str]:
        return [c.name for c in self.schema.columns if c.is_numeric]

    @property
    def categorical_columns(self) -> list[str]:
        return [c.name for c in self.schema.columns if c.is_categorical]
