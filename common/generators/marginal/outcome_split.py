"""Pairs with the outcome measured on its public {absent, present} split.

Why: at 4 sites' summed noise (heart disease, epsilon 1 per site) each cell of a
(feature, outcome) pair holds fewer patients than its noise std, and heart's outcome
has 5 categories of which 4 mean "disease" (the schema's ``outcome.positive``). A
classifier trained on synthetic rows reads mostly "disease or not given the feature":
summing the 4 present cells at the site, under one noise draw, gives that count with
the noise of one cell instead of the sum of four noises (twice the std). The outcome's
1-way release keeps its full categories, so the model still knows how the present
patients split.

Privacy: one patient is in one cell of the pair's marginal, so in one cell of the
collapsed vector: sensitivity 1 per pair, as a plain ``measure`` release, charged the
same way (``plan.SPLIT`` at the ``measure`` noise level). The split (which cells are
"present") comes from the published schema, never from a row.

Layout: the request names each clique with the outcome last, ``(*features, outcome)``;
the collapsed vector is the clique's marginal with its last axis summed into groups
(``groups[cell]``: 0 absent, 1 present, 2 the missing cell when the outcome may be
missing), flattened in that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...schema import Schema
from ...table import _match_category
from .discretize import Discretizer

Clique = tuple[str, ...]


@dataclass(frozen=True)
class Split:
    """The outcome attribute and the group of each of its cells (public)."""

    outcome: str
    groups: tuple[int, ...]

    @property
    def width(self) -> int:
        return max(self.groups) + 1

    def length(self, clique: Clique, sizes: dict[str, int]) -> int:
        """Entries of one collapsed clique: its features' cells times the groups."""
        return int(np.prod([sizes[a] for a in clique[:-1]])) * self.width

    def problem(self, cliques: Sequence[Clique]) -> str:
        """Why a request of these cliques is no collapsed release ('' if it is)."""
        if any(len(c) < 2 or c[-1] != self.outcome or self.outcome in c[:-1]
               for c in cliques):
            return (f"a collapsed measurement names cliques ending with the outcome "
                    f"{self.outcome!r}, each with at least one feature")
        return ""

    def collapse(self, counts: np.ndarray) -> np.ndarray:
        """A ``(*features, outcome)`` marginal (flat) with its outcome axis summed into
        the groups: what a holder releases (before its noise)."""
        k = len(self.groups)
        table = np.asarray(counts, dtype=float).reshape(-1, k)
        out = np.zeros((table.shape[0], self.width))
        for cell, g in enumerate(self.groups):
            out[:, g] += table[:, cell]
        return out.ravel()

    def matrix(self, features: int) -> np.ndarray:
        """The linear map from a clique's flat marginal to its collapsed vector (each row
        sums one group of one feature cell): the model's query for this release."""
        k = len(self.groups)
        q = np.zeros((features * self.width, features * k))
        for f in range(features):
            for cell, g in enumerate(self.groups):
                q[f * self.width + g, f * k + cell] = 1.0
        return q


def outcome_split(schema: Schema, discretizer: Discretizer) -> Split | None:
    """The schema's outcome split on the model's cells, or None when the outcome is not
    categorical with a positive set that leaves at least two cells on one side (else
    collapsing would merge nothing)."""
    if schema.outcome is None or schema.outcome.column not in discretizer.names:
        return None
    attr = next(a for a in discretizer.attributes if a.name == schema.outcome.column)
    column = getattr(attr, "column", None)
    if column is None or column.is_numeric or not column.categories:
        return None
    positive = {str(_match_category(p, column)) for p in schema.outcome.positive}
    groups = [1 if str(c) in positive else 0 for c in column.categories]
    if column.nullable:
        groups.append(2)
    if len(set(groups[: len(column.categories)])) < 2 or len(groups) <= max(groups) + 1:
        return None
    return Split(column.name, tuple(groups))


def ordered(clique: Clique, outcome: str) -> Clique:
    """``clique`` with the outcome moved last (the collapsed release's layout)."""
    return (*[a for a in clique if a != outcome], outcome)
