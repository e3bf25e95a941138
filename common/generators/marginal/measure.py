"""What a holder of rows computes: marginal counts, their noisy release, the scores.

Free of Flower and of the ledger, so a site (``client/measure.py``) and a central fit
(``MarginalGenerator.fit``) run the same arithmetic; both charge the ledger themselves
with the counts that ``plan.py`` explains. The noise source is always handed in: a
site passes its secret ``DPRandomness.release`` stream (OpenDP's exact sampler), never
anything the coordinator chose.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .outcome_split import Split

if TYPE_CHECKING:
    from ...privacy.release_noise import ReleaseNoise

Clique = tuple[str, ...]


def marginal(cells: np.ndarray, names: Sequence[str], sizes: dict[str, int],
             clique: Clique) -> np.ndarray:
    """Exact counts of one marginal, flattened in the clique's attribute order."""
    idx = [list(names).index(a) for a in clique]
    shape = tuple(sizes[a] for a in clique)
    if len(cells) == 0:
        return np.zeros(int(np.prod(shape)))
    flat = np.ravel_multi_index(tuple(cells[:, i] for i in idx), shape)
    return np.bincount(flat, minlength=int(np.prod(shape))).astype(float)


def noisy_marginals(
    cells: np.ndarray, names: Sequence[str], sizes: dict[str, int],
    cliques: Sequence[Clique], sigma: float, noise: ReleaseNoise,
) -> list[np.ndarray]:
    """Every marginal of ``cliques`` plus N(0, sigma^2) per cell (Gaussian mechanism;
    counts, so the discrete Gaussian in secret mode)."""
    out = []
    for clique in cliques:
        exact = marginal(cells, names, sizes, clique)
        out.append(noise.add(exact, sigma, integral=True))
    return out


def noisy_split(
    cells: np.ndarray, names: Sequence[str], sizes: dict[str, int],
    cliques: Sequence[Clique], split: Split, sigma: float, noise: ReleaseNoise,
) -> list[np.ndarray]:
    """Every ``(*features, outcome)`` marginal with the outcome collapsed to the
    split's groups (``outcome_split.py``), plus N(0, sigma^2) per entry: one patient is
    in one entry, so each is a sensitivity-1 Gaussian, as a plain marginal."""
    out = []
    for clique in cliques:
        exact = split.collapse(marginal(cells, names, sizes, clique))
        out.append(noise.add(exact, sigma, integral=True))
    return out


def noisy_scores(
    cells: np.ndarray, names: Sequence[str], sizes: dict[str, int],
    cliques: Sequence[Clique], model_marginals: Sequence[np.ndarray], total: float,
    sigma: float, noise: ReleaseNoise,
) -> np.ndarray:
    """For each candidate, ``|| M(D) - total * p ||_1`` plus N(0, sigma^2).

    ``p`` is the current model's normalised marginal (public: post-processing of past
    releases) and ``total`` the holder's noisy row count from its own 1-way release
    (also post-processing), so one patient moves each score by at most 1.
    """
    scores = np.empty(len(cliques))
    for i, (clique, p) in enumerate(zip(cliques, model_marginals, strict=True)):
        exact = marginal(cells, names, sizes, clique)
        scores[i] = np.abs(exact - total * np.asarray(p)).sum()
    return noise.add(scores, sigma, integral=False)
