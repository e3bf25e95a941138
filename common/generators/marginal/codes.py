"""Code sets in a marginal model: one attribute per code, or one per public group.

A code set with a thousand codes (MIMIC's ICD-9 categories) cannot be a thousand model
attributes: a 1-way marginal each splits the budget a thousand ways and ``mbi`` slows to
a crawl. When the schema declares public ``groups`` for a code set
(``common/schema.py``: ``{prefix: N}`` or named lists/ranges of codes), the model sees
one attribute per group instead: how many of the group's codes a patient has, capped at
``cap`` (the last cell means "cap or more"). A group of one code is exactly the old
binary attribute.

Decoding a group's count back into codes needs to know which codes of the group are
common. That is one more DP release, the **code histogram**: each site counts, for every
grouped code, how many of its patients have it. One patient with k codes moves k counts
by one (L2 sensitivity sqrt(k)), so each patient contributes at most ``bound`` of their
grouped codes, chosen uniformly at random with the site's secret randomness; the vector
then has L2 sensitivity sqrt(bound), i.e. ``bound`` sensitivity-1 Gaussians at the
release's noise std (``plan.py`` records it so). Subsampling a patient's codes uniformly
keeps the within-group proportions in expectation, and only those proportions are used.
A decoded row with count c in a group draws c distinct codes of the group with
probabilities proportional to the noisy counts less ``THRESHOLD`` noise stds, clipped at
zero (post-processing: without it, the positive noise on the many absent codes of a
large group outweighs the few codes patients have); with no histogram (or nothing left
above the threshold) the draw is uniform over the group.

What grouping loses: co-occurrence between codes is kept only at the group level, and a
code's link to the other columns only through its group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ...schema import Schema

if TYPE_CHECKING:
    from ...privacy.release_noise import ReleaseNoise

DEFAULT_CAP = 3  # a group's count cells 0, 1, 2, "3 or more"
THRESHOLD = 2.0  # noisy counts below this many noise stds are taken as zero


@dataclass(frozen=True)
class CodeGroup:
    """One public group of a code set, as a model attribute (its capped code count)."""

    name: str  # attribute name, "<codeset>[<group>]"
    members: tuple[str, ...]  # the member codes' column names, in code-list order
    cap: int

    numeric = False
    missing_cell = None

    @property
    def size(self) -> int:
        return min(self.cap, len(self.members)) + 1

    def presence(self, frame: pd.DataFrame) -> np.ndarray:
        """(n, members) 0/1 matrix of the group's codes."""
        if not len(frame):
            return np.zeros((0, len(self.members)), dtype=np.int64)
        values = frame[list(self.members)].apply(pd.to_numeric, errors="coerce")
        return (values.fillna(0).to_numpy(dtype=float) > 0).astype(np.int64)

    def encode_frame(self, frame: pd.DataFrame) -> np.ndarray:
        """Each row's number of the group's codes, capped at the last cell."""
        return np.minimum(self.presence(frame).sum(axis=1), self.size - 1)

    def decode(self, cells: np.ndarray, weights: np.ndarray | None,
               rng: np.random.Generator) -> np.ndarray:
        """(n, members) 0/1 codes: ``cells[i]`` distinct codes drawn per row.

        Sampling without replacement proportional to ``weights`` by the Gumbel top-k
        trick: the c largest of log(w) + Gumbel noise are a weighted draw of c codes.
        """
        m = len(self.members)
        w = np.ones(m) if weights is None else np.clip(np.asarray(weights, float), 0, None)
        if not np.any(w > 0):
            w = np.ones(m)
        logw = np.log(np.where(w > 0, w, 1e-12 * w[w > 0].min()))
        keys = logw + rng.gumbel(size=(len(cells), m))
        rank = np.argsort(np.argsort(-keys, axis=1), axis=1)
        return (rank < np.asarray(cells, dtype=np.int64)[:, None]).astype(np.int64)


def code_groups(schema: Schema, cap: int = DEFAULT_CAP) -> list[CodeGroup]:
    """Every declared group of every code set of ``schema`` (none: no code set is grouped)."""
    if cap < 1:
        raise ValueError("code_cap must be >= 1")
    out: list[CodeGroup] = []
    names = set(schema.names)
    for codeset in schema.codesets:
        for group, members in schema.code_groups(codeset).items():
            name = f"{codeset}[{group}]"
            if name in names:
                raise ValueError(f"code group attribute {name!r} clashes with a column of "
                                 "the schema; rename the group or the column")
            out.append(CodeGroup(name, tuple(members), cap))
    return out


def bounded_rows(presence: np.ndarray, bound: int, rng: np.random.Generator) -> np.ndarray:
    """Each row's 0/1 codes with at most ``bound`` kept, chosen uniformly at random.

    Every row is subsampled on its own, so a patient's kept codes depend on that patient
    and the draw only: adding or removing one patient adds or removes one row of this
    matrix, whose L2 norm is at most sqrt(bound).
    """
    if bound < 1:
        raise ValueError("code_bound must be >= 1")
    presence = np.asarray(presence, dtype=np.int64)
    if not presence.size:
        return presence
    keys = np.where(presence > 0, rng.random(presence.shape), np.inf)
    rank = np.argsort(np.argsort(keys, axis=1), axis=1)
    return ((presence > 0) & (rank < bound)).astype(np.int64)


def bounded_histogram(presence: np.ndarray, bound: int, rng: np.random.Generator
                      ) -> np.ndarray:
    """Per-code counts of :func:`bounded_rows`: L2 sensitivity sqrt(bound), as charged."""
    kept = bounded_rows(presence, bound, rng)
    return kept.sum(axis=0).astype(float) if kept.ndim == 2 else np.zeros(0)


def pooled_counts(meas) -> tuple[np.ndarray, float]:  # noqa: ANN001 (a fit.Measurement)
    """A code histogram measurement added over sites, and the std of the summed noise
    (sites that did not answer carry a huge std and no counts: left out)."""
    values = np.asarray(meas.values, dtype=float)
    sd = np.atleast_1d(np.asarray(meas.stddev, dtype=float))
    if not meas.by_site:
        return values, float(sd[0])
    kept = sd < 1e11
    return values[kept].sum(axis=0), float(np.sqrt(np.sum(sd[kept] ** 2)))


def code_weights(counts: np.ndarray, sd: float, threshold: float = THRESHOLD) -> np.ndarray:
    """Decoding weights from the summed noisy histogram: counts less ``threshold`` stds."""
    return np.clip(np.asarray(counts, dtype=float) - threshold * sd, 0.0, None)


def noisy_code_histogram(presence: np.ndarray, bound: int, sigma: float,
                         noise: ReleaseNoise) -> np.ndarray:
    """The bounded code histogram plus N(0, sigma^2) per code (Gaussian mechanism; counts,
    so the discrete Gaussian in secret mode). The subsampling draws from the stream's
    secret generator ``noise.rng``."""
    counts = bounded_histogram(presence, bound, noise.rng)
    return noise.add(counts, sigma, integral=True)
