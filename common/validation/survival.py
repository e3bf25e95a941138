"""Survival utility: would a survival analysis on synthetic patients reach the same answer?

In haematology the question a synthetic cohort must answer is usually a survival one:
how long patients live, and which factors shorten or lengthen that. So this area
compares, with lifelines rather than a hand-written fit:

- Kaplan-Meier curves (largest vertical gap, area between the curves), the log-rank
  test and the median survival - synthetic vs real holdout;
- a Cox proportional-hazards model fitted on synthetic and on real training patients:
  does each hazard ratio point the same way, and do their 95% confidence intervals
  overlap? A reversed hazard ratio for a factor that matters in the real data
  (its real CI excludes 1) fails the section: it would turn a risk factor into a
  protective one;
- the concordance index on the real holdout of the Cox model fitted on synthetic data
  (reference: the one fitted on real training data). That model is a prediction
  model, so its ridge penalty is chosen as a user choosing one would: by 5-fold
  cross-validated concordance on its own training table, from ``COX_PENALIZERS``
  (``choose_penalizer``); the same rule for every table, real or synthetic. The
  hazard-ratio comparisons are inference and keep the small fixed ``COX_PENALIZER``
  (a strong ridge would bias the ratios and their intervals).

The area runs when ``validate`` gets ``survival=(time_column, event_column)``. The event
column is binary (its second category is the event) or numeric (> 0 is an event).
The Cox covariates are the other schema columns (or ``survival_covariates``), encoded
on public bounds: numeric scaled to [0, 1] with the median imputed and a missing
indicator, categorical as indicators of every category but the first (and missing).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index

from .context import Context
from .data import MISSING, Table
from .metric import MetricValue, metric

AREA = "survival"

#: L2 penalty of the Cox fits whose hazard ratios are compared; small, it only keeps
#: sparse indicator columns finite.
COX_PENALIZER = 0.01
#: Penalties the C-index's Cox model chooses from (``choose_penalizer``), and the folds.
#: TCGA-BRCA, tvae federated at epsilon 3 (issue 14, seventh pass): cross-validation on
#: the synthetic rows picked 0.1 in most seeds, on the real training rows 0.01 or 0.1;
#: 3-seed medians of 16 runs 0.642 -> 0.659 (synthetic), real rows over seeds 0-11
#: 0.763 -> 0.760 (benchmarks/deep-spread/results.md, "Seventh pass").
COX_PENALIZERS = (0.01, 0.1, 1.0)
CV_FOLDS = 5
#: C-index on the holdout may fall this far below the real model's and still pass.
C_INDEX_MARGIN = 0.05
#: Largest gap between the Kaplan-Meier curves that passes.
KM_GAP_THRESHOLD = 0.15
#: Significance below which a real hazard ratio "matters" for the sign check.
ALPHA = 0.05


def time_event(ctx: Context, table: Table) -> tuple[np.ndarray, np.ndarray]:
    """Survival times and event indicators (1 = event) of a table; rows lacking either
    are marked with NaN time and dropped by the callers."""
    assert ctx.survival is not None
    time_col, event_col = ctx.survival
    times = table.numeric[time_col].copy()
    column = ctx.schema.column(event_col)
    if column.is_numeric:
        raw = table.numeric[event_col]
        events = (raw > 0).astype(float)
        events[np.isnan(raw)] = np.nan
    else:
        labels = table.labels[event_col]
        events = (labels == str(column.categories[-1])).astype(float)
        events[labels == MISSING] = np.nan
    bad = np.isnan(times) | np.isnan(events) | (times < 0)
    times[bad] = np.nan
    return times, events


def _complete(t: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = ~np.isnan(t)
    return t[keep], e[keep].astype(int)


def km_curves(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
) -> tuple[float, float]:
    """Largest vertical gap and mean absolute gap of two Kaplan-Meier curves.

    Both are read on the union of observed times up to the shorter follow-up (beyond
    it one curve is unknown); the mean gap is the area between the curves divided by
    that horizon, so both lie in [0, 1].
    """
    (ta, ea), (tb, eb) = a, b
    horizon = min(ta.max(), tb.max())
    grid = np.unique(np.concatenate([ta, tb, [0.0]]))
    grid = grid[grid <= horizon]
    sa = KaplanMeierFitter().fit(ta, ea).survival_function_at_times(grid).to_numpy()
    sb = KaplanMeierFitter().fit(tb, eb).survival_function_at_times(grid).to_numpy()
    gap = np.abs(sa - sb)
    if horizon <= 0 or grid.size < 2:
        return float(gap.max()), math.nan
    area = float(np.sum(gap[:-1] * np.diff(grid)))  # step functions: exact integral
    return float(gap.max()), area / float(horizon)


def median_survival(t: np.ndarray, e: np.ndarray) -> float:
    """Kaplan-Meier median survival time (inf when the curve never reaches one half)."""
    return float(KaplanMeierFitter().fit(t, e).median_survival_time_)


def design(ctx: Context, table: Table, covariates: list[str]) -> pd.DataFrame:
    """The Cox design matrix of a table, on public bounds (see the module docstring)."""
    data: dict[str, np.ndarray] = {}
    for name in covariates:
        column = ctx.schema.column(name)
        if column.is_numeric:
            lo, hi = float(column.min), float(column.max)  # type: ignore[arg-type]
            x = np.clip((table.numeric[name] - lo) / (hi - lo), 0.0, 1.0)
            missing = np.isnan(x)
            fill = float(np.nanmedian(x)) if (~missing).any() else 0.5
            data[name] = np.where(missing, fill, x)
            if column.nullable:
                data[f"{name}={MISSING}"] = missing.astype(float)
        else:
            labels = table.labels[name]
            levels = [str(c) for c in column.categories[1:]]
            if column.nullable:
                levels.append(MISSING)
            for level in levels:
                data[f"{name}={level}"] = (labels == level).astype(float)
    return pd.DataFrame(data)


def _cox_data(frame: pd.DataFrame, t: np.ndarray, e: np.ndarray) -> pd.DataFrame | None:
    """The rows with a time, the covariates that vary, ``_time`` and ``_event``; None
    with fewer than two events."""
    data = frame.assign(_time=t, _event=e)
    data = data[~np.isnan(t)]
    data = data.loc[:, data.std(ddof=0) > 0].assign(_time=data["_time"], _event=data["_event"])
    return None if data["_event"].sum() < 2 else data


def _fit(data: pd.DataFrame, penalizer: float) -> CoxPHFitter | None:
    cox = CoxPHFitter(penalizer=penalizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cox.fit(data, duration_col="_time", event_col="_event")
        except Exception:  # lifelines raises ConvergenceError and linear-algebra errors
            return None
    return cox


def fit_cox(
    frame: pd.DataFrame, t: np.ndarray, e: np.ndarray, penalizer: float = COX_PENALIZER
) -> CoxPHFitter | None:
    """A penalised Cox fit (lifelines); None when it cannot be fitted."""
    data = _cox_data(frame, t, e)
    return None if data is None else _fit(data, penalizer)


def choose_penalizer(
    frame: pd.DataFrame, t: np.ndarray, e: np.ndarray, rng: np.random.Generator
) -> float:
    """The penalty of ``COX_PENALIZERS`` with the best mean concordance over
    ``CV_FOLDS`` folds of this table alone (folds dealt within each event value, as
    lifelines' ``k_fold_cross_validation`` deals them, but from ``rng`` rather than
    numpy's global seed). A penalty whose fit fails in a fold scores that fold 0.5."""
    data = _cox_data(frame, t, e)
    if data is None:
        return COX_PENALIZER
    fold = np.zeros(len(data), dtype=int)
    events = data["_event"].to_numpy()
    for value in np.unique(events):
        idx = rng.permutation(np.flatnonzero(events == value))
        fold[idx] = np.arange(len(idx)) % CV_FOLDS
    scores = []
    for penalizer in COX_PENALIZERS:
        per_fold = []
        for k in range(CV_FOLDS):
            train, test = data[fold != k], data[fold == k]
            cox = _fit(train, penalizer) if train["_event"].sum() >= 2 else None
            if cox is None or test["_event"].sum() < 1:
                per_fold.append(0.5)
                continue
            risk = cox.predict_partial_hazard(test[list(cox.params_.index)]).to_numpy()
            per_fold.append(concordance_index(test["_time"], -risk, test["_event"]))
        scores.append(float(np.mean(per_fold)))
    return COX_PENALIZERS[int(np.argmax(scores))]


def _c_index(cox: CoxPHFitter | None, frame: pd.DataFrame, t: np.ndarray, e: np.ndarray) -> float:
    if cox is None:
        return math.nan
    keep = ~np.isnan(t)
    x = frame.loc[keep, list(cox.params_.index)]
    risk = cox.predict_partial_hazard(x).to_numpy()
    return float(concordance_index(t[keep], -risk, e[keep]))


def _compare_cox(real: CoxPHFitter, other: CoxPHFitter | None) -> dict[str, dict[str, float]]:
    """Per covariate of the real fit: sign agreement and CI overlap with the other fit."""
    out: dict[str, dict[str, float]] = {}
    ci_real = real.confidence_intervals_
    for name in real.params_.index:
        entry = {
            "hr_real": float(np.exp(real.params_[name])),
            "p_real": float(real.summary.loc[name, "p"]),
            "hr_other": math.nan,
            "same_sign": math.nan,
            "ci_overlap": math.nan,
        }
        if other is not None and name in other.params_.index:
            ci_other = other.confidence_intervals_
            entry["hr_other"] = float(np.exp(other.params_[name]))
            entry["same_sign"] = float(np.sign(real.params_[name]) == np.sign(other.params_[name]))
            lo_r, hi_r = ci_real.loc[name].to_numpy()
            lo_o, hi_o = ci_other.loc[name].to_numpy()
            entry["ci_overlap"] = float(lo_r <= hi_o and lo_o <= hi_r)
        out[name] = entry
    return out


def _share(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def run(ctx: Context) -> list[MetricValue]:
    """Kaplan-Meier, log-rank, median survival, Cox hazard ratios and C-index."""
    if ctx.survival is None:
        return []
    time_col, event_col = ctx.survival
    cols = [time_col, event_col]
    hold = _complete(*time_event(ctx, ctx.holdout))
    syn = _complete(*time_event(ctx, ctx.synthetic))
    train = _complete(*time_event(ctx, ctx.train))
    out: list[MetricValue] = []
    if min(len(hold[0]), len(syn[0]), len(train[0])) < 2:
        return [
            metric(
                "km_max_gap",
                AREA,
                math.nan,
                "lower",
                "Kaplan-Meier largest gap",
                columns=cols,
                note="fewer than two rows with a time and an event",
            )
        ]

    gap, area = km_curves(hold, syn)
    gap_ref, area_ref = km_curves(hold, train)
    out.append(
        metric(
            "km_max_gap",
            AREA,
            gap,
            "lower",
            "largest vertical gap between the Kaplan-Meier curves (real holdout vs synthetic)",
            columns=cols,
            reference=gap_ref,
            threshold=KM_GAP_THRESHOLD,
        )
    )
    out.append(
        metric(
            "km_mean_gap",
            AREA,
            area,
            "lower",
            "area between the Kaplan-Meier curves divided by the follow-up horizon",
            columns=cols,
            reference=area_ref,
        )
    )
    out.append(
        metric(
            "logrank_p",
            AREA,
            float(logrank_test(hold[0], syn[0], hold[1], syn[1]).p_value),
            "higher",
            "log-rank test p-value, holdout vs synthetic (small = the curves differ)",
            columns=cols,
            reference=float(logrank_test(hold[0], train[0], hold[1], train[1]).p_value),
        )
    )
    med_h, med_s, med_t = (median_survival(*x) for x in (hold, syn, train))

    def rel(a: float, b: float) -> float:
        if not (math.isfinite(a) and math.isfinite(b)) or a == 0:
            return math.nan
        return abs(b - a) / a

    out.append(
        metric(
            "median_survival_rel_diff",
            AREA,
            rel(med_h, med_s),
            "lower",
            "relative difference of the Kaplan-Meier median survival time",
            columns=cols,
            reference=rel(med_h, med_t),
            details={"real": med_h, "synthetic": med_s, "train": med_t},
            note="" if math.isfinite(med_h) else "the real median is not reached",
        )
    )

    covariates = list(
        ctx.options.get("survival_covariates") or [c for c in ctx.schema.names if c not in cols]
    )
    frames = {k: design(ctx, ctx.table(k), covariates) for k in ("train", "holdout", "synthetic")}
    te = {k: time_event(ctx, ctx.table(k)) for k in frames}
    cox = {k: fit_cox(frames[k], *te[k]) for k in frames}
    chosen_pen = {k: choose_penalizer(frames[k], *te[k], ctx.rng("cox-cv"))
                  for k in ("train", "synthetic")}
    predict = {k: fit_cox(frames[k], *te[k], penalizer=chosen_pen[k]) for k in chosen_pen}
    c_value = _c_index(predict["synthetic"], frames["holdout"], *te["holdout"])
    c_ref = _c_index(predict["train"], frames["holdout"], *te["holdout"])
    out.append(
        metric(
            "cox_c_index",
            AREA,
            c_value,
            "higher",
            "C-index on the real holdout of a Cox model fitted on synthetic data",
            columns=cols,
            reference=c_ref,
            threshold=c_ref - C_INDEX_MARGIN if math.isfinite(c_ref) else None,
            details={"penalizer": chosen_pen["synthetic"], "penalizer_ref": chosen_pen["train"]},
            note="" if predict["synthetic"] is not None else "the Cox model could not be fitted",
        )
    )
    if cox["train"] is None:
        return out
    versus_syn = _compare_cox(cox["train"], cox["synthetic"])
    versus_hold = _compare_cox(cox["train"], cox["holdout"])
    important = [n for n, v in versus_syn.items() if v["p_real"] < ALPHA]
    chosen = important or list(versus_syn)
    out.append(
        metric(
            "cox_hr_sign_agreement",
            AREA,
            _share([versus_syn[n]["same_sign"] for n in chosen]),
            "higher",
            "share of hazard ratios (those significant in real data) pointing the same way",
            columns=cols,
            reference=_share([versus_hold[n]["same_sign"] for n in chosen]),
            details={"covariates": chosen},
        )
    )
    out.append(
        metric(
            "cox_ci_overlap",
            AREA,
            _share([v["ci_overlap"] for v in versus_syn.values()]),
            "higher",
            "share of covariates whose 95% hazard-ratio intervals (synthetic, real) overlap",
            columns=cols,
            reference=_share([v["ci_overlap"] for v in versus_hold.values()]),
        )
    )
    for name in important:
        v, ref = versus_syn[name], versus_hold[name]
        out.append(
            metric(
                "cox_hr_same_sign",
                AREA,
                v["same_sign"],
                "higher",
                f"1 if the hazard ratio of {name} (real {v['hr_real']:.2f}, p={v['p_real']:.3g}) "
                f"points the same way in synthetic data ({v['hr_other']:.2f})",
                columns=[name],
                reference=ref["same_sign"],
                threshold=1.0,
                details=v,
            )
        )
    return out
