"""The one entry point: ``validate(real_train, holdout, synthetic, schema)``.

Each area is a function ``Context -> list[MetricValue]`` registered in ``AREA_RUNNERS``;
``validate`` prepares the tables once, runs the requested areas in order, times each,
and collects the headline numbers. Adding an area or a metric is adding a function.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import pandas as pd
from threadpoolctl import threadpool_limits

from ..schema import Schema
from . import causal, clustering, detection, diversity, fidelity, privacy, survival, utility
from .context import Context, Target
from .data import Table
from .metric import MetricValue, ValidationResult

AreaRunner = Callable[[Context], list[MetricValue]]

#: Areas in the order they run and are reported.
AREA_RUNNERS: dict[str, AreaRunner] = {
    "fidelity": fidelity.run,
    "diversity": diversity.run,
    "utility": utility.run,
    "survival": survival.run,
    "causal": causal.run,
    "clustering": clustering.run,
    "detection": detection.run,
    "privacy": privacy.run,
}

#: headline key -> (metric name, take its reference instead of its value).
HEADLINE: dict[str, tuple[str, bool]] = {
    "fidelity": ("fidelity", False),
    "correlation_similarity": ("correlation_similarity", False),
    "contingency_similarity": ("contingency_similarity", False),
    "tstr_auroc": ("tstr_auroc_logistic_regression", False),
    "trtr_auroc": ("tstr_auroc_logistic_regression", True),
    "dcr_share_closer_to_train": ("dcr_share_closer_to_train", False),
    "prdc_coverage": ("prdc_coverage", False),
    "detection_auroc": ("detection_auroc_gradient_boosting", False),
    "kmeans_ari": ("kmeans_ari", False),
    "cox_c_index": ("cox_c_index", False),
    "km_max_gap": ("km_max_gap", False),
    "causal_edge_sign_agreement": ("causal_edge_sign_agreement", False),
    "membership_inference_auroc": ("membership_inference_auroc", False),
}


#: Fewest rows of each table an area can score; smaller tables used to end in an
#: IndexError or a scikit-learn error deep inside the area. Diversity measures each
#: row's distance to its ``PRDC_K``-th nearest other row, detection cross-validates
#: in ``FOLDS`` stratified folds, privacy compares each row's two nearest neighbours.
MIN_ROWS = {"diversity": diversity.PRDC_K + 1, "detection": detection.FOLDS, "privacy": 2}


def resolve_target(
    schema: Schema, target: str | None, positive: Sequence[object] | None
) -> Target | None:
    """The binary label for utility: the schema's outcome unless the caller names one.

    A binary column's positive class is its second category; any other categorical
    target needs ``positive``. Numeric targets are not predicted (utility here is
    classification; survival has its own area).
    """
    if target is None:
        if schema.outcome is None:
            return None
        target = schema.outcome.column
    column = schema.column(target)
    if not column.is_categorical:
        raise ValueError(f"target {target!r} is a {column.kind} column: utility predicts a "
                         "class, so name a categorical or binary column (or leave the "
                         "target out to use the schema's outcome)")
    if positive is None:
        if schema.outcome is not None and schema.outcome.column == target:
            positive = schema.outcome.positive
        elif column.kind == "binary":
            positive = (column.categories[-1],)
        else:
            raise ValueError(
                f"target {target!r} is a {column.kind} column; name the values that count "
                f"as the positive class (--target {target}=V1,V2; positive=[...] in Python)"
            )
    # a positive value the column never takes gave a label with one class, and TSTR and
    # TRTR were then silently left out of the report
    known = {str(c) for c in column.categories}
    given = {str(v) for v in positive}
    if not given or given - known:
        raise ValueError(f"target {target!r} has no value(s) {sorted(given - known)}; its "
                         f"values are {', '.join(sorted(known))}: name the positive ones")
    if given >= known:
        raise ValueError(f"every value of target {target!r} is named positive: leave at "
                         "least one as the negative class")
    return Target(column=target, positive=frozenset(given))


def validate(
    real_train: pd.DataFrame,
    holdout: pd.DataFrame,
    synthetic: pd.DataFrame,
    schema: Schema,
    *,
    target: str | None = None,
    seed: int = 0,
    areas: tuple[str, ...] | None = None,
    positive: Sequence[object] | None = None,
    survival: tuple[str, str] | None = None,
    survival_covariates: Sequence[str] | None = None,
    models: tuple[str, ...] | None = None,
    anonymeter_python: str | None = None,
) -> ValidationResult:
    """Score a synthetic table against real data the generator never saw.

    ``real_train`` is what the generator was trained on, ``holdout`` real patients it
    never saw; every figure compares the synthetic table with the holdout and is shown
    beside the same figure for ``real_train`` (the reference: what new real patients
    score). Frames may be typed (``read_table``) or raw; columns outside the schema are
    ignored. ``target`` defaults to the schema's outcome; ``survival`` names a
    (time, event) column pair; ``areas`` picks a subset of ``AREA_RUNNERS``;
    ``anonymeter_python`` is the interpreter of a separate environment with anonymeter
    (see ``anonymeter_runner``), whose attacks then join the privacy area.
    """
    wanted = tuple(AREA_RUNNERS) if areas is None else tuple(areas)
    unknown = [a for a in wanted if a not in AREA_RUNNERS]
    if unknown:
        raise ValueError(f"unknown area(s) {unknown}; choose from {list(AREA_RUNNERS)}")
    need = max((MIN_ROWS.get(a, 1) for a in wanted), default=1)
    small = {name: len(frame) for name, frame in
             (("real", real_train), ("holdout", holdout), ("synthetic", synthetic))
             if len(frame) < need}
    if small:
        raise ValueError(
            "too few rows to score: " + ", ".join(f"{k} has {v}" for k, v in small.items())
            + f"; every table needs at least {need} rows for the "
            + ", ".join(a for a in wanted if MIN_ROWS.get(a, 1) > 1) + " scores")
    if survival is not None:
        for name in survival:
            schema.column(name)
    options: dict[str, object] = {}
    if models is not None:
        options["models"] = tuple(models)
    if anonymeter_python:
        options["anonymeter_python"] = anonymeter_python
    if survival_covariates is not None:
        options["survival_covariates"] = [schema.column(c).name for c in survival_covariates]
    t0 = time.perf_counter()
    ctx = Context(
        schema=schema,
        train=Table.from_frame(real_train, schema),
        holdout=Table.from_frame(holdout, schema),
        synthetic=Table.from_frame(synthetic, schema),
        seed=seed,
        target=resolve_target(schema, target, positive),
        survival=survival,
        options=options,
    )
    seconds = {"prepare": time.perf_counter() - t0}
    result = ValidationResult(metrics=[])
    for area in wanted:
        start = time.perf_counter()
        # one thread: on a busy small machine OpenMP/BLAS thread pools oversubscribe the
        # cores and a 0.3 s gradient boosting fit takes 6 s; these tables are small
        with threadpool_limits(limits=1):
            result.extend(AREA_RUNNERS[area](ctx))
        seconds[area] = time.perf_counter() - start
    seconds["total"] = time.perf_counter() - t0
    result.seconds = seconds
    result.info = {
        "schema": schema.name,
        "rows": {"train": ctx.train.n, "holdout": ctx.holdout.n, "synthetic": ctx.synthetic.n},
        "target": None
        if ctx.target is None
        else {"column": ctx.target.column, "positive": sorted(ctx.target.positive)},
        "survival": list(survival) if survival else None,
        "seed": seed,
        "areas": list(wanted),
    }
    names = {
        m.name: m for m in result.metrics if m.columns is None or m.area in ("utility", "survival")
    }
    for key, (name, use_reference) in HEADLINE.items():
        m = names.get(name)
        if m is not None:
            result.headline_values[key] = m.reference if use_reference else m.value
    return result
