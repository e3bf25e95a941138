"""Diversity and coverage: does the synthetic table cover the real patients, no more?

Fidelity metrics average over patients and can hide a generator that only draws the
common cases (mode collapse) or that draws impossible ones. These metrics look at the
edges: entropy per column, whether every real category and the real range appear,
whether synthetic values stay within the real range and the public domain, and a
nearest-neighbour view of the whole rows - precision, recall, density and coverage of
Naeem et al. (2020), "Reliable Fidelity and Diversity Metrics for Generative Models",
ICML, on Gower distances (``data.gower``) with k = ``PRDC_K``.

Real = the holdout; reference = the training table in place of the synthetic one.
The coverage and adherence definitions follow SDMetrics (CategoryCoverage,
RangeCoverage, BoundaryAdherence) so the values can be cross-checked against it,
except that a missing category value is a category here, as everywhere in this module.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from ..schema import Column
from .context import Context
from .data import MISSING, Table, gower
from .fidelity import column_values, counts
from .metric import MetricValue, metric

AREA = "diversity"

#: Neighbours defining each real row's ball in PRDC (Naeem et al. use k = 5).
PRDC_K = 5
#: Synthetic rows compared per PRDC run (subsampled to the same size as the reference).
PRDC_MAX_ROWS = 2000
#: PRDC coverage must reach this share of the reference coverage.
COVERAGE_RATIO_THRESHOLD = 0.80
#: Share of synthetic cells inside the schema's public domain required.
DOMAIN_THRESHOLD = 0.99


def entropy_gap(real: np.ndarray, other: np.ndarray, column: Column) -> tuple[float, float, float]:
    """|H(other) - H(real)| / log(support size), with both entropies (nats).

    Lower entropy than the real column means collapse onto common values; higher means
    spread the real data does not have. Normalising by the log of the support makes
    columns with many and few categories comparable.
    """
    ca, cb = counts(real, other, column)
    h_real, h_other = float(stats.entropy(ca)), float(stats.entropy(cb))
    return abs(h_other - h_real) / math.log(len(ca)), h_real, h_other


def category_coverage(real: np.ndarray, other: np.ndarray) -> float:
    """Share of the categories seen in the real column that the other column has."""
    seen = set(real)
    return len(seen & set(other)) / len(seen)


def range_coverage(real: np.ndarray, other: np.ndarray) -> float:
    """How much of the real [min, max] the other column spans (1 = all of it)."""
    r, o = real[~np.isnan(real)], other[~np.isnan(other)]
    if r.size == 0 or o.size == 0 or r.min() == r.max():
        return math.nan
    span = r.max() - r.min()
    low = max((o.min() - r.min()) / span, 0.0)
    high = max((r.max() - o.max()) / span, 0.0)
    return float(max(1.0 - (low + high), 0.0))


def boundary_adherence(real: np.ndarray, other: np.ndarray) -> float:
    """Share of the other column's values inside the real [min, max].

    When the real column is never missing, a missing synthetic value counts as outside.
    """
    observed = real[~np.isnan(real)]
    if observed.size == 0:
        return math.nan
    values = other[~np.isnan(other)] if np.isnan(real).any() else other
    if values.size == 0:
        return math.nan
    inside = (values >= observed.min()) & (values <= observed.max())
    return float(inside.mean())


def domain_adherence(table: Table, ctx: Context) -> float:
    """Share of all cells that lie in the schema's public domain (bounds, categories)."""
    good = total = 0
    for column in ctx.schema.columns:
        if column.is_numeric:
            values = table.numeric[column.name]
            present = values[~np.isnan(values)]
            ok = (present >= column.min) & (present <= column.max)
            if column.kind == "integer":
                ok &= np.isclose(present, np.round(present))
            good += int(ok.sum()) + (int(np.isnan(values).sum()) if column.nullable else 0)
        else:
            allowed = {str(c) for c in column.categories}
            if column.nullable:
                allowed.add(MISSING)
            good += int(np.isin(table.labels[column.name], list(allowed)).sum())
        total += table.n
    return good / total if total else math.nan


def prdc(
    d_real_real: np.ndarray, d_real_fake: np.ndarray, d_fake_fake: np.ndarray, k: int = PRDC_K
) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al., 2020) from distances.

    ``d_real_real`` and ``d_fake_fake`` have inf on the diagonal; ``d_real_fake`` is
    real x fake. A real row's ball has the radius of its k-th nearest real neighbour.
    """
    r_real = np.sort(d_real_real, axis=1)[:, k - 1]
    r_fake = np.sort(d_fake_fake, axis=1)[:, k - 1]
    inside = d_real_fake <= r_real[:, None]  # real x fake: fake row in real row's ball
    precision = float(inside.any(axis=0).mean())
    density = float(inside.sum() / (k * d_real_fake.shape[1]))
    coverage = float((d_real_fake.min(axis=1) <= r_real).mean())
    recall = float((d_real_fake <= r_fake[None, :]).any(axis=1).mean())
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def _prdc_pair(ctx: Context) -> tuple[dict[str, float], dict[str, float]]:
    n = min(ctx.synthetic.n, ctx.train.n, PRDC_MAX_ROWS)
    rng = ctx.rng("prdc")
    d_hh = ctx.self_distances("holdout")
    out = []
    for name in ("synthetic", "train"):
        table = ctx.table(name)
        rows = np.sort(rng.choice(table.n, size=n, replace=False)) if table.n > n else None
        fake = table.take(rows) if rows is not None else table
        d_hf = ctx.distances("holdout", name)
        d_hf = d_hf[:, rows] if rows is not None else d_hf
        d_ff = gower(fake, fake, ctx.schema)
        np.fill_diagonal(d_ff, np.inf)
        out.append(prdc(d_hh, d_hf, d_ff))
    return out[0], out[1]


def run(ctx: Context) -> list[MetricValue]:
    """Per-column entropy and coverage, domain adherence, and PRDC on whole rows."""
    out: list[MetricValue] = []
    for column in ctx.schema.columns:
        hold, syn, train = (
            column_values(t, column) for t in (ctx.holdout, ctx.synthetic, ctx.train)
        )
        gap, h_real, h_syn = entropy_gap(hold, syn, column)
        ref, _, h_train = entropy_gap(hold, train, column)
        out.append(
            metric(
                "entropy_gap",
                AREA,
                gap,
                "lower",
                "|entropy synthetic - entropy real| / log(number of categories or bins)",
                columns=[column.name],
                reference=ref,
                details={"real": h_real, "synthetic": h_syn, "train": h_train},
            )
        )
        if column.is_numeric:
            out.append(
                metric(
                    "range_coverage",
                    AREA,
                    range_coverage(hold, syn),
                    "higher",
                    "share of the real [min, max] range the synthetic values span",
                    columns=[column.name],
                    reference=range_coverage(hold, train),
                )
            )
            out.append(
                metric(
                    "boundary_adherence",
                    AREA,
                    boundary_adherence(hold, syn),
                    "higher",
                    "share of synthetic values inside the real [min, max] range",
                    columns=[column.name],
                    reference=boundary_adherence(hold, train),
                )
            )
        else:
            out.append(
                metric(
                    "category_coverage",
                    AREA,
                    category_coverage(hold, syn),
                    "higher",
                    "share of the real categories (missing included) the synthetic data has",
                    columns=[column.name],
                    reference=category_coverage(hold, train),
                )
            )
    value, reference = _prdc_pair(ctx)
    meanings = {
        "precision": "share of synthetic rows inside some real row's k-NN ball (realism)",
        "recall": "share of real rows inside some synthetic row's k-NN ball (diversity)",
        "density": "how many real k-NN balls hold a synthetic row, per row / k (~1 = ideal)",
        "coverage": "share of real rows whose k-NN ball holds a synthetic row",
    }
    for key, meaning in meanings.items():
        threshold = None
        if key == "coverage" and math.isfinite(reference[key]):
            threshold = COVERAGE_RATIO_THRESHOLD * reference[key]
        out.append(
            metric(
                f"prdc_{key}",
                AREA,
                value[key],
                "higher",
                meaning,
                reference=reference[key],
                threshold=threshold,
                details={"k": PRDC_K, "distance": "gower"},
            )
        )
    out.append(
        metric(
            "domain_adherence",
            AREA,
            domain_adherence(ctx.synthetic, ctx),
            "higher",
            "share of synthetic cells inside the schema's public domain",
            reference=domain_adherence(ctx.train, ctx),
            threshold=DOMAIN_THRESHOLD,
        )
    )
    return out
