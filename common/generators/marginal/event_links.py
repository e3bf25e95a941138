"""Event links: one bounded release of every "covariate present, and the outcome" count.

A Cox model on synthetic rows needs each binary covariate's link to the survival
outcome: whether patients with a mutated gene, a cytogenetic group, tumour stage i or
a treatment die sooner. Measured pair by pair as 2-way marginals ((gene, death), (gene,
time)) each link costs a sensitivity-1 Gaussian, so a study of 40 covariates could
afford a handful, and the public workload (``engine.workload_order``) ranked them by
their noisy spread, which is not their prognostic weight: AMLSG's genes and TCGA's
stage and treatment indicators were never linked to the event (notes of the fourth
pass, benchmarks/marginal-datasets/results.md). This release links them all at once.

**The release** (``plan.LINKS``, once, after the code histogram and the code pairs):
the coordinator names a set ``U`` of binary covariates (binary columns that are no
survival event, and binary codes; at most ``plan.link_covariates``) and one survival
*tail*: the event ``(E,)`` or the event and the binned time ``(E, T)``, from the
schema's survival pair. For each ``c`` in ``U`` the site counts, in every cell of the
tail, the patients with ``c = 1`` (the ``c = 1`` slice of the marginal ``(c, E[, T])``).
A patient holding k covariates of ``U`` adds ``w_k = min(1, sqrt(b / k))`` (``b =
plan.link_bound``) to one cell of each of its k slices (the cell of its own event and
time), and the site adds N(0, sigma^2) per cell from its secret randomness.

**Sensitivity.** Add/remove one patient: the patient adds ``w_k`` to exactly one entry
of each of its k slices (a covariate named twice is refused) and nothing elsewhere,
and ``w_k`` depends on that patient's row alone, so the vector moves by L2 norm
``w_k sqrt(k) = min(sqrt(k), sqrt(b)) <= sqrt(b)``, whatever the tail (a patient has one
event value and one time bin). The release is ``b`` compositions of a sensitivity-1
Gaussian at noise multiplier sigma: ``record(sigma, 1.0, b)``. TCGA's patients hold
9-14 of the 38 indicators (one-hot groups), AMLSG's a few genes, so ``b`` is set per
table width (``model.LINK_BOUND``); patients over it are scaled down, a downward bias
on their links stated in docs/generators.md.

**Choosing U** is public or post-processing: the schema's binary columns, and the binary
codes whose summed noisy count in the code histogram clears ``codes.THRESHOLD`` noise
stds (``code_pairs.frequent_codes``), the binary columns first.

**Reading it into the model**: each slice is a measurement of the ``c = 1`` cells of the
clique ``(c, *tail)`` (an ``mbi`` ``WeightedQuery`` with weight 0 on the other cells;
``fit._slice``). With the (E, T) marginal and c's 1-way marginal measured elsewhere,
the ``c = 0`` slice follows. A round of the workload no longer measures (c, E) or (c, T)
for a released covariate (``covered``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ...schema import Schema
from .discretize import Discretizer

if TYPE_CHECKING:
    from ...privacy.release_noise import ReleaseNoise

Clique = tuple[str, ...]
PRESENT = 1  # a binary attribute's cell of value 1 (categories (0, 1); missing last)


def link_covariates(discretizer: Discretizer, schema: Schema) -> list[str]:
    """Every attribute a link release may name: the binary columns that are not a
    survival event, the categorical columns (counted whole, ``whole_covariates``), then
    the binary codes (``Discretizer.direct_codes``)."""
    events = {e for _, e in schema.survival_pairs}
    kinds = {a.name: a.column.kind for a in discretizer.attributes
             if getattr(a, "column", None) is not None and not a.column.group}
    binary = [a for a, k in kinds.items() if k == "binary" and a not in events]
    return binary + whole_covariates(discretizer) + [
        c for c in discretizer.direct_codes if c not in binary]


def whole_covariates(discretizer: Discretizer) -> list[str]:
    """The categorical columns: every patient is in one of their cells, so a link
    counts all of them (the whole marginal (a, *tail)), one entry per patient."""
    return [a.name for a in discretizer.attributes
            if getattr(a, "column", None) is not None and not a.column.group
            and a.column.kind == "categorical"]


def link_tails(schema: Schema, sizes: dict[str, int]) -> list[Clique]:
    """The tails a release may count in: each survival pair's binary event alone, or
    the event and its binned time (``(E,)``, ``(E, T)``)."""
    out: list[Clique] = []
    for time, event in schema.survival_pairs:
        if event in sizes and time in sizes:
            out += [(event,), (event, time)]
    return out


def link_cliques(covariates: Sequence[str], tail: Clique) -> list[Clique]:
    return [(c, *tail) for c in covariates]


def slice_length(clique: Clique, sizes: dict[str, int], whole: Sequence[str] = ()) -> int:
    """Entries one covariate's slice has: the cells of the tail (times the covariate's
    cells for a categorical one, counted whole)."""
    inner = math.prod(sizes[a] for a in clique[1:])
    return inner * sizes[clique[0]] if clique[0] in set(whole) else inner


def link_request_problem(cliques: Sequence[Clique], allowed: Sequence[str],
                         tails: Sequence[Clique], cap: int) -> str:
    """Why a site refuses a link request ('' if it may answer): every clique a binary
    covariate followed by one allowed tail, the same tail throughout, no covariate
    twice, at most ``cap`` covariates."""
    if not cliques:
        return "a link request must name at least one covariate"
    tail = tuple(cliques[0][1:])
    if tail not in set(tails):
        return (f"{list(tail)} is not a survival event (and its time) of the schema; "
                f"allowed: {[list(t) for t in tails]}")
    seen: set[str] = set()
    for c in cliques:
        if tuple(c[1:]) != tail:
            return "every clique of a link request must end in the same tail"
        if c[0] not in allowed:
            return (f"{c[0]!r} is not a binary or categorical covariate or a binary code "
                    "of the schema")
        if c[0] in seen:  # counted twice, a patient would move twice as far
            return f"the covariate {c[0]!r} is asked twice"
        seen.add(c[0])
    if len(seen) > cap:
        return f"the request names {len(seen)} covariates, the plan allows at most {cap}"
    return ""


def link_weights(k: np.ndarray, bound: int) -> np.ndarray:
    """Each patient's weight from its number of named covariates present ``k``."""
    return np.minimum(1.0, np.sqrt(bound / np.maximum(np.asarray(k, dtype=float), 1.0)))


def bounded_link_counts(cells: np.ndarray, names: Sequence[str], sizes: dict[str, int],
                        cliques: Sequence[Clique], bound: int, whole: Sequence[str] = ()
                        ) -> np.ndarray:
    """Each covariate's weighted counts in every cell of the tail: of the patients who
    hold a binary one, of every patient in each cell of a ``whole`` (categorical) one
    (``cells``: rows x attributes cell indices in ``names`` order); the slices
    concatenated in request order. A patient's number of entries k is its binary
    covariates held plus the categorical ones named, its weight ``link_weights(k)``."""
    cells = np.asarray(cells)
    col = {a: i for i, a in enumerate(names)}
    tail = list(cliques[0][1:])
    tail_sizes = [sizes[a] for a in tail]
    inner = math.prod(tail_sizes)
    full = set(whole)
    if not len(cells):
        return np.zeros(sum(slice_length(c, sizes, whole) for c in cliques))
    where = (np.ravel_multi_index([cells[:, col[a]] for a in tail], tail_sizes)
             if tail else np.zeros(len(cells), dtype=np.int64))
    has = np.stack([np.ones(len(cells), dtype=bool) if c[0] in full
                    else cells[:, col[c[0]]] == PRESENT for c in cliques], axis=1)
    weight = link_weights(has.sum(axis=1), bound)
    parts = []
    for c, h in zip(cliques, has.T, strict=True):
        if c[0] in full:
            at = cells[:, col[c[0]]] * inner + where
            parts.append(np.bincount(at, weights=weight, minlength=sizes[c[0]] * inner))
        else:
            parts.append(np.bincount(where[h], weights=weight[h], minlength=inner))
    return np.concatenate(parts).astype(float)


def noisy_link_counts(cells: np.ndarray, names: Sequence[str], sizes: dict[str, int],
                      cliques: Sequence[Clique], bound: int, sigma: float,
                      noise: ReleaseNoise, whole: Sequence[str] = ()) -> np.ndarray:
    """The bounded link counts plus N(0, sigma^2) per entry (Gaussian mechanism; weighted,
    so the float lattice sampler in secret mode)."""
    counts = bounded_link_counts(cells, names, sizes, cliques, bound, whole)
    return noise.add(counts, sigma, integral=False)


def covered(cliques: Sequence[Clique]) -> list[Clique]:
    """The pairs a link release stands for (each covariate with each tail column):
    no workload round measures them again."""
    return [(c[0], a) for c in cliques for a in c[1:]]


def choose(allowed: Sequence[str], frequent: Sequence[str], direct: Sequence[str],
           cap: int) -> list[str]:
    """U: the binary and categorical columns, then the ``frequent`` codes (the code
    histogram's, or every binary code when there is none: post-processing or public),
    at most ``cap``."""
    binary = [a for a in allowed if a not in set(direct)]
    return (binary + [c for c in frequent if c in set(allowed) and c not in binary])[:cap]


def independence_z(meas: Sequence, one_way: dict[str, np.ndarray], total: float,
                   sizes: dict[str, int]) -> dict[Clique, float]:  # noqa: ANN001
    """Each released link's distance from independence in noise stds: the covariate
    holders' noisy event count (the tail's E = 1 cells summed) less what independence
    predicts (their noisy number times the event's noisy rate, ``one_way``: each
    attribute's noisy 1-way marginal), over the summed noise std (post-processing)."""
    out: dict[Clique, float] = {}
    for m in meas:
        values = np.asarray(m.values, dtype=float)
        sd = float(np.sqrt(np.sum(np.square(m.stddev)))) if m.by_site else float(m.stddev)
        if m.by_site:
            values = values.sum(axis=0)
        event = m.clique[1]
        if values.size != slice_length(m.clique, sizes):  # a categorical one: always read
            out[tuple(m.clique)] = np.inf
            continue
        block = values.reshape(sizes[event], -1)
        e1 = np.clip(one_way[event].reshape(-1, sizes[event]).sum(axis=0), 0, None)
        rate = float(e1[PRESENT] / max(e1.sum(), 1.0))
        observed = float(block[PRESENT].sum())
        expected = max(float(values.sum()), 0.0) * rate
        out[tuple(m.clique)] = (observed - expected) / max(sd * np.sqrt(block.shape[1]), 1e-9)
    return out
