"""Federated validation: each site scores the synthetic table against its own rows, and
the coordinator combines the sites' scores into study figures. No real row is pooled.

What a site sends is a handful of numbers, each a *score of the synthetic data* (how
far the released table is from this site's patients), plus the row count it already
released under DP for the FedAvg weight (re-using a DP release is post-processing and
costs nothing). It never sends a frequency table, a quantile, a mean of a column or a
per-row figure: those are statistics of its private rows, which may leave a site only
under DP, charged to its budget. The scores themselves are not DP; most are coarse
(one number per column or per table), but four are per-patient screens of the real
rows against the synthetic ones (``PATIENT_SCREENS``: ``dcr_min``, ``exact_copies``,
``synthetic_recall``, ``nearest_synthetic_distance_mean``), and ``include_privacy=False``
drops all four: against a model whose every sample is one guessed record, recall is
the share of the site's rows equal to it (a membership test) and the mean distance is
the rows' exact mean distance to it (docs/privacy.md, "Federated validation").

The reply's keys are a function of public inputs only (the schema, the target and
``include_privacy``): a figure the site cannot compute (a column it never observed,
one class of the target) is sent as ``NOT_COMPUTABLE``, not left out, and the
coordinator skips it. That the figure could not be computed is still a fact of the
rows, outside DP like the scores.

Each figure says how it combines (``RULES``):

- **exact**: the pooled figure is a function of the sites' figures alone
  (``dcr_min``: the smallest of the minima; ``exact_copies``: the sum of the shares,
  exact unless two sites hold an identical record, then an upper bound);
- **approximate, row mean**: the figure is a mean over real rows (TSTR accuracy and
  Brier score, distance to the nearest synthetic row, synthetic recall), so the
  row-weighted mean of the sites' figures *is* the pooled figure with the true counts;
  the weights are the DP counts, so the only gap is the count noise;
- **bound**: the figure is a convex distance between the real and the synthetic
  distribution (KS, Wasserstein, TVD, joint TVD). The pooled real distribution is the
  count-weighted mixture of the sites', so by convexity the row-weighted mean of the
  sites' distances is an upper bound of the pooled distance (a lower bound for
  similarities). It is exact with one site and loose when sites differ (on the four
  heart-disease hospitals: study fidelity 0.79 from the bounds, 0.95 pooled), so it is
  not an estimate of the pooled figure and carries no threshold; the per-site values
  answer their own question (does the synthetic table look like *this* hospital?).
  The exact figure needs the pooled ECDF or frequency tables, row statistics that may
  leave a site only under DP: not sent. For a numeric column with missing values the
  mixture weights are the sites' counts of *observed* values, which are not sent, so
  there the bound is not guaranteed;
- **none**: AUROC (it ranks patients of one site against patients of another),
  correlation (the pooled correlation depends on the differences between the sites'
  means), and the holdout-based privacy screens (DCR share, membership inference:
  they need the pooled training table and a holdout). Per-site values only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from ..schema import Schema
from . import fidelity
from .context import Context
from .data import Table, gower
from .suite import resolve_target
from .utility import standard_pipeline

#: The key a site's DP row count travels under.
COUNT_KEY = "n-rows-dp"
#: Neighbours of a synthetic row that set its ball's radius (synthetic recall).
RECALL_K = 5
#: Two rows at Gower distance below this are identical.
TIE = 1e-12
#: Screens of each real row against the synthetic rows (a minimum, a copy, a nearest
#: neighbour, a ball): against a model that samples one guessed record they answer
#: "is this patient here" and the exact counts, so only ``include_privacy`` sends them.
PATIENT_SCREENS = ("dcr_min", "exact_copies", "synthetic_recall",
                   "nearest_synthetic_distance_mean")
#: What a site sends for a figure it cannot compute: no score is negative, and a key
#: present at every site hides nothing a missing key would reveal about the rows.
NOT_COMPUTABLE = -1.0

Combine = Literal["min", "sum", "row-mean", "bound", "none"]
Exactness = Literal["exact", "approximate", "bound", "none"]


@dataclass(frozen=True)
class Rule:
    """How one site figure combines into a study figure, and why."""

    combine: Combine
    direction: Literal["higher", "lower"]
    meaning: str
    why: str

    @property
    def exactness(self) -> Exactness:
        return {"min": "exact", "sum": "exact", "row-mean": "approximate", "bound": "bound"}.get(
            self.combine, "none"
        )


_CONVEX = (
    "the pooled real distribution is the count-weighted mixture of the sites', so by "
    "convexity the row-weighted mean of the sites' values bounds the pooled value; the "
    "exact value needs the pooled {what} (row statistics, sent only under DP: not sent)"
)
_ROW_MEAN = (
    "a mean over real rows: the row-weighted mean of the sites' means is the pooled mean "
    "with the true counts; the weights are DP counts, so the gap is the count noise"
)

RULES: dict[str, Rule] = {
    "dcr_min": Rule(
        "min",
        "higher",
        "smallest Gower distance from a synthetic row to a real row",
        "the pooled minimum is the smallest of the sites' minima",
    ),
    "exact_copies": Rule(
        "sum",
        "lower",
        "share of synthetic rows identical to a real row",
        "a synthetic row copies a pooled row iff it copies a row of some site, and the "
        "denominator (synthetic rows) is public; exact unless two sites hold an identical "
        "record, then the sum is an upper bound",
    ),
    "tstr_accuracy_logistic_regression": Rule(
        "row-mean",
        "higher",
        "accuracy on real rows of logistic regression trained on synthetic",
        _ROW_MEAN,
    ),
    "tstr_brier_logistic_regression": Rule(
        "row-mean",
        "lower",
        "Brier score on real rows of logistic regression trained on synthetic",
        _ROW_MEAN,
    ),
    "nearest_synthetic_distance_mean": Rule(
        "row-mean",
        "lower",
        "mean Gower distance from a real row to its nearest synthetic row",
        _ROW_MEAN,
    ),
    "synthetic_recall": Rule(
        "row-mean",
        "higher",
        f"share of real rows inside some synthetic row's {RECALL_K}-NN ball (PRDC recall, "
        "full synthetic table)",
        _ROW_MEAN,
    ),
    "ks": Rule(
        "bound",
        "lower",
        "Kolmogorov-Smirnov statistic (bounds the pooled one if the column is never missing)",
        _CONVEX.format(what="ECDF"),
    ),
    "wasserstein": Rule(
        "bound",
        "lower",
        "Wasserstein distance / public range (bounds the pooled one if never missing)",
        _CONVEX.format(what="ECDF"),
    ),
    "tvd": Rule(
        "bound",
        "lower",
        "total variation distance (upper bound of the pooled one)",
        _CONVEX.format(what="frequency table"),
    ),
    "contingency_similarity": Rule(
        "bound",
        "higher",
        "mean over categorical pairs of 1 - TVD of the joint table (lower bound)",
        _CONVEX.format(what="joint frequency tables"),
    ),
    "fidelity": Rule(
        "bound",
        "higher",
        "mean over columns of 1 - KS / 1 - TVD, from the combined column values (lower bound)",
        "computed from the combined KS and TVD, each an upper bound of the pooled one",
    ),
    "tstr_auroc_logistic_regression": Rule(
        "none",
        "higher",
        "AUROC on real rows of logistic regression trained on synthetic",
        "AUROC ranks every positive against every negative, across sites: it needs the "
        "pooled scores (row-level figures); per-site values only",
    ),
    "correlation_similarity": Rule(
        "none",
        "higher",
        "mean over numeric pairs of 1 - |Pearson real - Pearson synthetic| / 2",
        "the pooled correlation depends on the differences between the sites' means and "
        "variances (row statistics); per-site values only",
    ),
}


def rule_for(key: str) -> Rule:
    """The rule of a site figure's key, e.g. ``ks[age]`` -> ``RULES['ks']``."""
    return RULES[key.split("[", 1)[0]]


# ---------------------------------------------------------------- the site's side


def _tstr(
    schema: Schema, real: Table, synthetic: Table, target: str, positive: frozenset[str]
) -> dict[str, float]:
    """Accuracy, Brier score and AUROC on ``real`` of a model fitted on ``synthetic``.

    Logistic regression with lbfgs is deterministic, so every site fits the same model
    from the same public synthetic table; its per-row figures then add up across sites.
    The three keys are always there (NaN when not computable: one class in the
    synthetic table, or AUROC with one class in ``real``), so they reveal no class mix.
    """
    from sklearn.metrics import roc_auc_score

    features = [c for c in schema.names if c != target]
    y_syn = np.isin(synthetic.labels[target], list(positive)).astype(int)
    y_real = np.isin(real.labels[target], list(positive)).astype(int)
    keys = [f"tstr_{m}_logistic_regression[{target}]" for m in ("accuracy", "brier", "auroc")]
    if len(np.unique(y_syn)) < 2:
        return dict.fromkeys(keys, math.nan)
    model = LogisticRegression(max_iter=2000)
    # the validator's own pipeline (scaler fitted on the synthetic table, public to all
    # sites), so a site's figure is the one the pooled validation and a user compute
    pipe = standard_pipeline(schema, features, model)
    pipe.fit(synthetic.frame(schema)[features], y_syn)
    proba = pipe.predict_proba(real.frame(schema)[features])[:, 1]
    both = len(np.unique(y_real)) == 2
    return dict(zip(keys, (float(np.mean((proba >= 0.5) == y_real)),
                           float(np.mean((proba - y_real) ** 2)),
                           float(roc_auc_score(y_real, proba)) if both else math.nan),
                    strict=True))


def _distances(schema: Schema, real: Table, synthetic: Table) -> dict[str, float]:
    """The ``PATIENT_SCREENS``: each real row's distance to the synthetic rows, summed
    up four ways; sent only with ``include_privacy`` (they hinge on single patients)."""
    d = gower(real, synthetic, schema)
    nearest = d.min(axis=1)
    within = gower(synthetic, synthetic, schema)
    np.fill_diagonal(within, np.inf)
    k = min(RECALL_K, synthetic.n - 1)
    radius = np.partition(within, k - 1, axis=1)[:, k - 1] if k >= 1 else np.zeros(synthetic.n)
    return {
        "nearest_synthetic_distance_mean": float(nearest.mean()),
        "synthetic_recall": float(np.mean((d <= radius[None, :] + TIE).any(axis=1))),
        "dcr_min": float(d.min()),
        "exact_copies": float(np.mean((d <= TIE).any(axis=0))),
    }


def _fidelity(schema: Schema, real: Table, synthetic: Table) -> dict[str, float]:
    out: dict[str, float] = {}
    specs = {"ks": fidelity.ks_statistic, "wasserstein": fidelity.wasserstein_scaled}
    for column in schema.columns:
        r = fidelity.column_values(real, column)
        s = fidelity.column_values(synthetic, column)
        if column.is_numeric:
            for name, fn in specs.items():
                out[f"{name}[{column.name}]"] = fn(r, s, column)
        else:
            out[f"tvd[{column.name}]"] = fidelity.tvd(r, s, column)
    ctx = Context(schema=schema, train=real, holdout=real, synthetic=synthetic)
    _, corr, _ = fidelity._numeric_pairs(ctx)
    _, cont, _ = fidelity._categorical_pairs(ctx)
    out["correlation_similarity"] = fidelity._mean(corr)
    out["contingency_similarity"] = fidelity._mean(cont)
    return out


def site_scores(
    rows: pd.DataFrame,
    synthetic: pd.DataFrame,
    schema: Schema,
    *,
    target: str | None = None,
    positive: Sequence[object] | None = None,
    include_privacy: bool = True,
) -> dict[str, float]:
    """Scores of ``synthetic`` against one site's ``rows``: only the figures in ``RULES``.

    Keys are metric labels (``ks[age]``, ``dcr_min``), the same at every site for the
    same schema, target and ``include_privacy``: a figure that cannot be computed at
    this site (a column never observed here, one class of the target) is sent as
    ``NOT_COMPUTABLE`` rather than left out, so the key set reveals nothing of the rows.
    ``include_privacy=False`` leaves out the ``PATIENT_SCREENS``.
    """
    real = Table.from_frame(rows, schema)
    syn = Table.from_frame(synthetic, schema)
    if real.n == 0 or syn.n < 2:
        raise ValueError(
            f"federated validation needs rows at the site and at least 2 synthetic rows; "
            f"got {real.n} and {syn.n}"
        )
    out = _fidelity(schema, real, syn)
    resolved = resolve_target(schema, target, positive)
    if resolved is not None:
        out.update(_tstr(schema, real, syn, resolved.column, resolved.positive))
    if include_privacy:
        out.update(_distances(schema, real, syn))
    return {k: _sendable(v) for k, v in out.items()}


def _sendable(value: float | None) -> float:
    """A score as sent: ``NOT_COMPUTABLE`` for a figure this site could not compute."""
    return float(value) if value is not None and math.isfinite(value) else NOT_COMPUTABLE


def computed(value: float) -> bool:
    """Whether a site's figure is a score (not ``NOT_COMPUTABLE`` or a non-finite value)."""
    return math.isfinite(value) and value != NOT_COMPUTABLE


# ---------------------------------------------------------------- the coordinator's side


@dataclass
class StudyFigure:
    """One combined figure: its value, how it was combined and the sites' values."""

    label: str
    value: float | None
    rule: Rule
    sites: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.label,
            "study": self.value,
            "combines": self.rule.exactness,
            "rule": self.rule.combine,
            "direction": self.rule.direction,
            "meaning": self.rule.meaning,
            "why": self.rule.why,
            "note": self.note,
            **{f"site:{k}": v for k, v in self.sites.items()},
        }


@dataclass
class FederatedValidation:
    """The study figures and each site's own, as the coordinator sees them."""

    figures: list[StudyFigure]
    weights: dict[str, float]

    def get(self, label: str) -> StudyFigure:
        for f in self.figures:
            if f.label == label:
                return f
        raise KeyError(f"no combined figure {label!r}")

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([f.to_dict() for f in self.figures])


def _weights(
    sites: Mapping[str, Mapping[str, float]], counts: Mapping[str, float] | None
) -> dict[str, float]:
    """Each site's weight: the count given, else the DP count it sent (none: weight 0)."""
    raw = {}
    for name, figs in sites.items():
        n = counts.get(name) if counts is not None else figs.get(COUNT_KEY)
        raw[name] = max(0.0, float(n)) if n is not None and math.isfinite(float(n)) else 0.0
    return raw


def _combine_one(
    label: str, rule: Rule, values: dict[str, float], weights: dict[str, float]
) -> tuple[float | None, str]:
    if not values:
        return None, "no site could compute it"
    if rule.combine == "min":
        return min(values.values()), ""
    if rule.combine == "sum":
        return float(sum(values.values())), ""
    if rule.combine == "none":
        return None, "does not combine; see the per-site values"
    w = np.array([weights.get(s, 0.0) for s in values])
    if w.sum() <= 0:
        return None, "no site sent a row count"
    skipped = [s for s in values if weights.get(s, 0.0) <= 0]
    v = np.array(list(values.values()))
    note = f"sites without a count left out: {', '.join(skipped)}" if skipped else ""
    return float(np.sum(w * v) / w.sum()), note


def combine(
    sites: Mapping[str, Mapping[str, float]], counts: Mapping[str, float] | None = None
) -> FederatedValidation:
    """Combine the sites' figures (``site_scores`` plus ``COUNT_KEY``) into study figures.

    Weights are the DP counts the sites sent; ``counts`` overrides them (a simulation
    passing the true counts, to measure how much of a gap the count noise makes).
    Unknown keys are ignored, so a newer site can talk to an older coordinator.
    """
    weights = _weights(sites, counts)
    labels: list[str] = []
    for figs in sites.values():
        labels += [k for k in figs if k not in labels and k.split("[", 1)[0] in RULES]
    labels = [k for k in labels if not k.startswith("fidelity")]
    figures: list[StudyFigure] = []
    for label in labels:
        rule = rule_for(label)
        values = {s: float(f[label]) for s, f in sites.items()
                  if label in f and computed(float(f[label]))}
        value, note = _combine_one(label, rule, values, weights)
        figures.append(StudyFigure(label, value, rule, values, note))
    column_scores = [
        1.0 - f.value
        for f in figures
        if f.value is not None and f.label.split("[", 1)[0] in ("ks", "tvd")
    ]
    figures.insert(
        0,
        StudyFigure(
            "fidelity",
            float(np.mean(column_scores)) if column_scores else None,
            RULES["fidelity"],
        ),
    )
    return FederatedValidation(figures=figures, weights=weights)


def pooled_figure(label: str, pooled: Mapping[str, float]) -> float | None:
    """The figure ``site_scores`` gives on the pooled table (simulation only), with the
    study ``fidelity`` recomputed the way ``combine`` does, from the column values."""
    if label == "fidelity":
        scores = [1.0 - v for k, v in pooled.items()
                  if k.split("[", 1)[0] in ("ks", "tvd") and computed(v)]
        return float(np.mean(scores)) if scores else None
    value = pooled.get(label)
    return None if value is None or not computed(float(value)) else float(value)
