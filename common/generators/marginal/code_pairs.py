"""Pairs of codes: one bounded release of every co-occurrence count of the frequent codes.

Which genes go together (NPM1 with DNMT3A, TP53 without NPM1) is what a clinician reads
in a code set, and measuring it pair by pair as 2x2 marginals costs one sensitivity-1
Gaussian per pair: AMLSG's 54 genes have 1,431 pairs, and a study could afford 16.
This release counts them all at once.

**The release** (``plan.PAIRS``, once, after the code histogram): the coordinator names
a set ``U`` of direct codes (binary code attributes, ``Discretizer.direct_codes``), at
most ``plan.pair_codes`` of them, and pairs of codes of ``U``. A patient with k codes in
``U`` adds a weight ``w_k = min(1, sqrt(C(b, 2) / C(k, 2)))`` (``b = plan.pair_bound``)
to the count of each asked pair among those codes, and the site releases the weighted
counts plus N(0, sigma^2) per pair. A patient with at most ``b`` codes of ``U`` counts
fully; one with more is scaled down so that their pairs weigh as much, in L2, as ``b``
codes' pairs.

**Sensitivity.** The project's neighbouring relation is add/remove one patient. A
patient with k codes in ``U`` adds ``w_k`` to exactly the C(k, 2) pair counts of the
pairs among those codes (each asked pair at most once: the site refuses a request that
names a pair twice) and 0 to every other entry, and ``w_k`` depends on that patient's
row alone. Adding or removing the patient changes the vector by that contribution,
whose L2 norm is ``w_k sqrt(C(k, 2)) = min(sqrt(C(k, 2)), sqrt(C(b, 2))) <= sqrt(C(b,
2))``; no other patient's contribution changes. So the release is C(b, 2) compositions
of a sensitivity-1 Gaussian at noise multiplier sigma, whatever the number of codes or
pairs asked: ``record(sigma, 1.0, C(b, 2))`` (bound 4: 6; bound 3: 3). Without the
bound one patient with 9 genes would move 36 counts. Scaling rather than keeping a
random ``b`` of the codes (as the code histogram does) needs no randomness and loses
less: a pair of a patient with k > b codes keeps ``sqrt(C(b,2)/C(k,2))`` of its weight
instead of ``C(b,2)/C(k,2)`` in expectation, with no sampling noise.

**Choosing U** is post-processing of the noisy code histogram: the direct codes whose
summed noisy count is above ``THRESHOLD`` noise stds, most frequent first, at most the
public cap. Rarer codes add pairs that only the noise fills, and a patient keeps at most
``b`` codes of ``U``, so a smaller ``U`` clips fewer patients.

**Reading it into the model**: each pair's count is a measurement of the "both" cell
(1, 1) of the 2-way marginal of the two codes (a ``SlicedQuery`` of the last cell in
``mbi``, noise std of the summed count); the code histogram already measures each code's
"has it" cell, so the 2x2 table is pinned by the two. A model with every pair of 20+
binary codes has a junction tree of millions of cells, so :func:`model_pairs` keeps the
pairs in order of how far their count is from independence (in noise stds), as long as
the tree stays within ``max_cells``: the others stay as the model makes them
(independent given the rest). The scaling biases the counts of patients with more
than ``b`` codes of ``U`` downward (AMLSG: 21% of patients have more than 3 genes in
all); that bias is the price of the bound, stated in docs/generators.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from itertools import combinations
from typing import TYPE_CHECKING

import numpy as np

from .codes import THRESHOLD, pooled_counts

if TYPE_CHECKING:
    from ...privacy.release_noise import ReleaseNoise

Clique = tuple[str, ...]
# a released pair enters the model when its count is at least this many noise stds from
# what independence predicts (model_pairs). 0: every pair, most dependent first, while
# the junction tree fits. A pair the model does not read is independent in the model, so
# its sign in a sample is a coin flip; read, it has its noisy count's sign, right more
# often than not: with 18 sites' noise, the significant AMLSG pairs' expected sign
# agreement is 0.72-0.81 at 0 against 0.68-0.75 at 1 (noise-only Monte Carlo, seeds 0-2)
MIN_Z = 0.0


def pair_units(bound: int) -> int:
    """Sensitivity-1 Gaussians one pair release is worth: C(bound, 2) (see above)."""
    return math.comb(int(bound), 2)


def pair_cliques(codes: Sequence[str]) -> list[Clique]:
    """Every pair of ``codes``, in ``itertools.combinations`` order."""
    return [tuple(p) for p in combinations(codes, 2)]


def pair_request_problem(cliques: Sequence[Clique], direct: Sequence[str], cap: int
                         ) -> str:
    """Why a site refuses a pair request ('' if it may answer): every clique a pair of
    two distinct direct codes, no pair twice, at most ``cap`` codes in all."""
    seen: set[frozenset[str]] = set()
    for c in cliques:
        if len(c) != 2 or c[0] == c[1] or any(a not in direct for a in c):
            return f"{list(c)} is not a pair of two distinct binary codes of the schema"
        if frozenset(c) in seen:  # a pair counted twice would double its sensitivity
            return f"the pair {list(c)} is asked twice"
        seen.add(frozenset(c))
    n_codes = len(codes_of(cliques))
    if n_codes > cap:
        return f"the request names {n_codes} codes, the plan allows at most {cap}"
    return ""


def codes_of(cliques: Sequence[Clique]) -> list[str]:
    """The codes a pair request names, in first-appearance order."""
    return list(dict.fromkeys(a for c in cliques for a in c))


def pair_weights(k: np.ndarray, bound: int) -> np.ndarray:
    """Each patient's weight on its pairs from its number of named codes ``k``."""
    pairs = np.maximum(np.asarray(k, dtype=float) * (np.asarray(k) - 1) / 2, 1.0)
    return np.minimum(1.0, np.sqrt(pair_units(bound) / pairs))


def bounded_pair_counts(presence: np.ndarray, columns: dict[str, int],
                        cliques: Sequence[Clique], bound: int) -> np.ndarray:
    """Each pair's weighted count of the patients with both codes, a patient's weight
    ``pair_weights`` of its number of named codes (``presence``: rows x code-histogram
    entries; ``columns``: a code's entry)."""
    codes = codes_of(cliques)
    has = np.asarray(presence, dtype=float)[:, [columns[a] for a in codes]]
    if not len(has):
        return np.zeros(len(cliques))
    weighted = has * pair_weights(has.sum(axis=1), bound)[:, None]
    both = weighted.T @ has
    where = {a: i for i, a in enumerate(codes)}
    return np.array([both[where[a], where[b]] for a, b in cliques], dtype=float)


def noisy_pair_counts(presence: np.ndarray, columns: dict[str, int],
                      cliques: Sequence[Clique], bound: int, sigma: float,
                      noise: ReleaseNoise) -> np.ndarray:
    """The bounded pair counts plus N(0, sigma^2) per pair (Gaussian mechanism; weighted,
    so the float lattice sampler in secret mode)."""
    counts = bounded_pair_counts(presence, columns, cliques, bound)
    return noise.add(counts, sigma, integral=False)


def entry_columns(code_attrs: dict[str, int]) -> dict[str, int]:
    """Each code attribute's first column in the code presence matrix."""
    starts = np.cumsum([0, *code_attrs.values()])[:-1]
    return {a: int(s) for a, s in zip(code_attrs, starts, strict=True)}


def frequent_codes(code_meas: Sequence, direct: Sequence[str], cap: int) -> list[str]:  # noqa: ANN001
    """The direct codes whose summed noisy count clears ``THRESHOLD`` noise stds, most
    frequent first, at most ``cap`` (post-processing of the code histogram)."""
    counts = {}
    for m in code_meas:
        if m.clique[0] in set(direct):
            values, sd = pooled_counts(m)
            if float(values.ravel()[0]) > THRESHOLD * sd:
                counts[m.clique[0]] = float(values.ravel()[0])
    return sorted(counts, key=lambda a: -counts[a])[:cap]


def independence_z(pair_meas: Sequence, code_meas: Sequence, total: float
                   ) -> dict[Clique, float]:  # noqa: ANN001
    """Each released pair's distance from independence in noise stds: (count - n_a n_b /
    total) / the summed noise std, with the codes' counts from the code histogram
    (clipped at 0; post-processing)."""
    ones = {}
    for m in code_meas:
        values, _ = pooled_counts(m)
        ones[m.clique[0]] = max(float(values.ravel()[0]), 0.0)
    out = {}
    for m in pair_meas:
        values, sd = pooled_counts(m)
        a, b = m.clique
        expected = ones.get(a, 0.0) * ones.get(b, 0.0) / max(total, 1.0)
        out[tuple(m.clique)] = (float(values.ravel()[0]) - expected) / max(sd, 1e-9)
    return out


def above_floor(pair_meas: Sequence, code_meas: Sequence, floor: float  # noqa: ANN001
                ) -> set[Clique]:
    """The released pairs both of whose codes' summed noisy histogram counts are at least
    ``floor`` times the pair count's summed noise std (post-processing; ``floor`` 0:
    every pair).

    Why: the model cannot hold more patients with both codes than with either, nor fewer
    than none. A pair of a rare code whose noisy count lands above the code's count
    (positive noise) drags the code's 1-way count up in the least-squares fit, while
    one that lands below zero is absorbed by the pair's cell alone, so the pairs of rare
    codes pull those codes' frequencies up one-sidedly: on AMLSG at 18 sites' noise
    (codes share 0.42, seed 2) the model's gene-frequency correlation with the pairs
    read is 0.971, with the same code histogram alone 0.975. A code at ``floor`` stds
    above zero leaves its pairs' noise that room. The choice reads the code histogram
    only, never the pair counts, so it selects no noise. Its cost: the pairs left out
    are those the co-occurrence signs score too (floor 3: model 0.970 -> 0.972, signs
    0.857 -> 0.714, emulated; benchmarks/marginal-datasets/results.md "Sixth pass").
    """
    ones = {m.clique[0]: float(pooled_counts(m)[0].ravel()[0]) for m in code_meas}
    kept = set()
    for m in pair_meas:
        _, sd = pooled_counts(m)
        if all(ones.get(a, 0.0) >= floor * sd for a in m.clique):
            kept.add(tuple(m.clique))
    return kept


def capped(pair_meas: Sequence, code_meas: Sequence) -> list:  # noqa: ANN001
    """Each pooled pair count capped at the smaller of its two codes' noisy histogram
    counts (clipped at 0), as the model reads it (post-processing of both releases).

    Why: no table holds more patients with both codes than with either. A pair of a
    rare code whose noisy count lands above the code's count (positive noise) drags
    the code's 1-way count up in the least-squares fit, while one that lands below zero
    is absorbed by the pair's cell alone (see ``above_floor``). The cap is at or above
    what independence predicts (min(a, b) >= a b / n), so a pair's sign against
    independence is kept; it closes a little of the gap only (AMLSG, codes share 0.42,
    seed 2: 0.9716 -> 0.9725 of the histogram's 0.9752; benchmarks/marginal-datasets/
    results.md "Sixth pass"): larger groups of pairs still pull. Per-site counts (a
    model with a site attribute) are read as released.
    """
    ones = {m.clique[0]: max(float(pooled_counts(m)[0].ravel()[0]), 0.0) for m in code_meas}
    out = []
    for m in pair_meas:
        if not m.by_site:
            top = min(ones.get(a, 0.0) for a in m.clique)
            m = dataclasses.replace(m, values=np.minimum(np.asarray(m.values, float), top))
        out.append(m)
    return out


def model_pairs(z: dict[Clique, float], fits: callable, min_z: float) -> list[Clique]:  # noqa: ANN001
    """The pairs the model reads, most dependent first, while ``fits(chosen + [pair])``
    (the junction tree's cap) holds; pairs within ``min_z`` stds of independence are left
    to the model."""
    chosen: list[Clique] = []
    for pair in sorted(z, key=lambda p: -abs(z[p])):
        if abs(z[pair]) < min_z:
            break
        if fits([*chosen, pair]):
            chosen.append(pair)
    return chosen
