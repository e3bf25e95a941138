"""Benchmark the generator families centrally on the heart-disease data (a script).

Pools the rows of the four hospitals, splits them 80/20 stratified by hospital, trains
each generator on the 80% without DP and with DP at the given epsilons (the same
trainer and accountant as a federated site), and scores the synthetic table against
the real 20% that no generator saw:

- ``AUROC``: train on synthetic, test on real (logistic regression, target num > 0);
- ``fidelity``: mean per-column 1 - KS (numeric, observed values) and 1 - TVD
  (categorical, missing as a category of its own);
- ``seconds``: wall time of training.

The "real" row trains the same classifier on the real 80%: the ceiling a synthetic
table is measured against. Figures are means over ``--seeds`` seeds (split fixed).
The metrics are computed here, self-contained, so the benchmark does not move when
the validation module is extended.

Run: ``python research/bench_generators.py`` (prints a Markdown table).

``--study`` instead gives the central rows of the issue's federated table: each
generator trained without DP on the pooled *training* rows of exactly the split that
``fedsynth simulate`` makes (same seed, same 20% held out per hospital), sampled to as
many rows, and scored by the project's validation module against the same holdout, so
its figures (TSTR AUROC, fidelity, correlation similarity) sit beside the federated
ones in ``DIR/summary.json``::

    python research/bench_generators.py --study --epochs 50 --sample-rate 0.1
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from fedsynth.common.generators import get_generator
from fedsynth.common.schema import Schema
from fedsynth.simulations.datasets import bundled_schema
from fedsynth.simulations.splits import pooled_split

MISSING_LABEL = "<missing>"


def _target(frame: pd.DataFrame, schema: Schema) -> np.ndarray:
    assert schema.outcome is not None
    positive = {str(v) for v in schema.outcome.positive}
    return np.array([str(v) in positive for v in frame[schema.outcome.column]], dtype=int)


def _features(frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Numbers as floats (NaN when missing), categories as strings with a missing label."""
    assert schema.outcome is not None
    out: dict[str, Any] = {}
    for column in schema.columns:
        if column.name == schema.outcome.column:
            continue
        values = frame[column.name]
        if column.is_numeric:
            out[column.name] = pd.to_numeric(values, errors="coerce").astype(float)
        else:
            out[column.name] = [MISSING_LABEL if pd.isna(v) else str(v) for v in values]
    return pd.DataFrame(out)


def tstr_auroc(train: pd.DataFrame, test: pd.DataFrame, schema: Schema) -> float:
    """Train on ``train`` (synthetic or real), test on the real holdout; AUROC."""
    y = _target(train, schema)
    if len(set(y)) < 2:
        return float("nan")
    x = _features(train, schema)
    numeric = [c.name for c in schema.columns if c.is_numeric]
    categorical = [c for c in x.columns if c not in numeric]
    prep = ColumnTransformer(
        [
            (
                "num",
                Pipeline(
                    [
                        ("impute", SimpleImputer(strategy="median", add_indicator=True,
                                                 keep_empty_features=True)),
                        ("scale", StandardScaler()),
                    ]
                ),
                numeric,
            ),
            ("cat", OneHotEncoder(handle_unknown="ignore"), categorical),
        ]
    )
    model = Pipeline([("prep", prep), ("lr", LogisticRegression(max_iter=2000, C=1.0))])
    model.fit(x, y)
    scores = model.predict_proba(_features(test, schema))[:, 1]
    return float(roc_auc_score(_target(test, schema), scores))


def column_fidelity(real: pd.DataFrame, synthetic: pd.DataFrame, schema: Schema) -> float:
    """Mean over columns of 1 - KS (numeric) and 1 - TVD (categorical)."""
    scores = []
    for column in schema.columns:
        if column.is_numeric:
            a = pd.to_numeric(real[column.name], errors="coerce").dropna().to_numpy(float)
            b = pd.to_numeric(synthetic[column.name], errors="coerce").dropna().to_numpy(float)
            if len(a) == 0 or len(b) == 0:
                scores.append(1.0 if len(a) == len(b) else 0.0)
                continue
            scores.append(1.0 - float(stats.ks_2samp(a, b).statistic))
        else:
            a = real[column.name].map(lambda v: MISSING_LABEL if pd.isna(v) else str(v))
            b = synthetic[column.name].map(lambda v: MISSING_LABEL if pd.isna(v) else str(v))
            pa, pb = a.value_counts(normalize=True), b.value_counts(normalize=True)
            keys = set(pa.index) | set(pb.index)
            tvd = 0.5 * sum(abs(pa.get(k, 0.0) - pb.get(k, 0.0)) for k in keys)
            scores.append(1.0 - float(tvd))
    return float(np.mean(scores))


def run_one(
    name: str,
    epsilon: float | None,
    train: pd.DataFrame,
    test: pd.DataFrame,
    schema: Schema,
    *,
    seed: int,
    epochs: int,
    sample_rate: float,
    params: dict[str, Any],
) -> dict[str, float]:
    model = get_generator(name)(schema, seed=seed, **params)
    start = time.perf_counter()
    model.fit(train, epochs=epochs, sample_rate=sample_rate, epsilon=epsilon)
    seconds = time.perf_counter() - start
    synthetic = model.sample(len(train), seed=seed + 1000)
    return {
        "seconds": seconds,
        "auroc": tstr_auroc(synthetic, test, schema),
        "fidelity": column_fidelity(test, synthetic, schema),
        "epsilon": float("nan") if model.fit_info["epsilon"] is None
        else float(model.fit_info["epsilon"]),
    }


def central_study(name: str, *, epochs: int, sample_rate: float, params: dict[str, Any],
                  seed: int = 42) -> dict[str, float]:
    """One generator, no DP, on the pooled training rows of ``fedsynth simulate``'s split."""
    import tempfile
    from pathlib import Path

    from fedsynth.common.study import StudyConfig
    from fedsynth.common.validation import validate
    from fedsynth.simulations.simulate import SimulationOptions, prepare_sites

    opts = SimulationOptions(dataset="heart_disease", dp=False, study=StudyConfig(seed=seed))
    with tempfile.TemporaryDirectory() as tmp:
        _, train, hold = prepare_sites(opts, Path(tmp))
    train, hold = train.drop(columns="site"), hold.drop(columns="site")
    schema = bundled_schema("heart_disease")
    model = get_generator(name)(schema, seed=seed, **params)
    start = time.perf_counter()
    model.fit(train, epochs=epochs, sample_rate=sample_rate)
    seconds = time.perf_counter() - start
    synthetic = model.sample(len(train), seed=seed)
    head = validate(train, hold, synthetic, schema, seed=seed).headline()
    return {"seconds": seconds, "auroc": head["tstr_auroc"], "fidelity": head["fidelity"],
            "correlation": head["correlation_similarity"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generators", default="tvae,ctgan,ddpm")
    parser.add_argument("--epsilons", default="none,10,3",
                        help="comma-separated; 'none' trains without DP")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--params", default="{}",
                        help='JSON hyperparameters by generator, e.g. {"ctgan": {"bins": 8}}')
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; 1 suits these tiny networks and keeps "
                        "timings stable on a shared machine")
    parser.add_argument("--study", action="store_true",
                        help="central no-DP rows on fedsynth simulate's split (see above)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = json.loads(args.params)
    if args.study:
        print(f"central, no DP, {args.epochs} epochs at q = {args.sample_rate}\n")
        print("| generator | TSTR AUROC | fidelity | correlation similarity | train seconds |")
        print("|---|---|---|---|---|")
        for name in args.generators.split(","):
            r = central_study(name, epochs=args.epochs, sample_rate=args.sample_rate,
                              params=params.get(name, {}))
            print(f"| {name} | {r['auroc']:.3f} | {r['fidelity']:.3f} | "
                  f"{r['correlation']:.3f} | {r['seconds']:.1f} |", flush=True)
        return 0
    schema = bundled_schema("heart_disease")
    train, test = pooled_split(schema)
    epsilons = [None if e == "none" else float(e) for e in args.epsilons.split(",")]

    print(f"heart disease, pooled: {len(train)} training rows, {len(test)} holdout rows; "
          f"{args.epochs} epochs at q = {args.sample_rate}, delta = 1e-5, "
          f"mean of {args.seeds} seed(s), {args.threads} torch thread(s)\n")
    print("| generator | DP epsilon | TSTR AUROC | fidelity | train seconds |")
    print("|---|---|---|---|---|")
    real_auc = tstr_auroc(train, test, schema)
    real_fid = column_fidelity(test, train, schema)
    print(f"| real 80% (reference) | - | {real_auc:.3f} | {real_fid:.3f} | - |")
    for name in args.generators.split(","):
        for eps in epsilons:
            runs = [
                run_one(name, eps, train, test, schema, seed=s, epochs=args.epochs,
                        sample_rate=args.sample_rate, params=params.get(name, {}))
                for s in range(args.seeds)
            ]
            mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
            spread = float(np.nanstd([r["auroc"] for r in runs]))
            label = "no DP" if eps is None else f"{eps:g} (spent {mean['epsilon']:.2f})"
            print(f"| {name} | {label} | {mean['auroc']:.3f} ± {spread:.3f} | "
                  f"{mean['fidelity']:.3f} | {mean['seconds']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
