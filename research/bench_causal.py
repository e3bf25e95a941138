"""Causal figures of the marginal generator: with the schema's graph and without it.

For each seed, one federated study per arm (the real ServerApp and ClientApp in
process, every hospital at ``--epsilon`` per site, the same split), then on the
real holdout: the causal report (``common/validation/causal.py``: share of the graph's
implied independences that hold in real and synthetic data, both at the holdout's
size, edge-sign agreement),
column fidelity (1 - KS / TVD), pairwise fidelity (mean absolute difference of the
correlation matrices) and TSTR AUROC of the outcome. Medians over seeds are printed.

    OMP_NUM_THREADS=1 .venv/bin/python research/bench_causal.py \\
        --dataset heart_disease --seeds 0 1 2 --out causal-bench
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from bench_generators import column_fidelity, tstr_auroc
from inprocess import run_inprocess

from fedsynth.common.schema import Schema
from fedsynth.common.study import StudyConfig
from fedsynth.common.validation.causal import causal_report
from fedsynth.simulations.simulate import SimulationOptions


def pair_gap(real: pd.DataFrame, syn: pd.DataFrame, schema: Schema) -> float:
    """Mean |corr_real - corr_syn| over column pairs (categories by numeric code)."""
    cols = [c.name for c in schema.columns if c.is_numeric or c.numeric_categories]

    def corr(f: pd.DataFrame) -> np.ndarray:
        return f[cols].apply(pd.to_numeric, errors="coerce").astype(float).corr().to_numpy()

    a, b = corr(real), corr(syn)
    iu = np.triu_indices(len(cols), 1)
    return float(np.nanmean(np.abs(a[iu] - b[iu])))


def _stash_measurements() -> dict[str, Any]:
    """Keep the coordinator's noisy measurements of the next causal fit (in-process
    studies only), so several ``site_pooling`` values are scored on the same release."""
    from fedsynth.common.generators.marginal import causal as causal_module

    stash: dict[str, Any] = {}
    original = causal_module.from_measurements

    def keep(measurements, graph, order, sizes, sites, pooling=1.0):  # noqa: ANN001, ANN202
        stash.update(measurements=measurements, graph=graph, order=order, sizes=sizes,
                     sites=sites)
        return original(measurements, graph, order, sizes, sites, pooling)

    causal_module.from_measurements = keep
    stash["restore"] = lambda: setattr(causal_module, "from_measurements", original)
    return stash


def _by_site(model, n: int, seed: int) -> pd.DataFrame:  # noqa: ANN001
    """``n`` synthetic rows with a ``site`` column, each hospital at its model weight."""
    from fedsynth.common.generators.marginal.causal import SITE

    weights = next(m.table for m in model.mechanisms if m.node == SITE)
    counts = np.random.default_rng(seed).multinomial(n, weights)
    parts = [model.sample(int(k), site=s, seed=seed).assign(site=s)
             for s, k in zip(model.sites, counts, strict=True) if k]
    return pd.concat(parts, ignore_index=True)


def score(model, train: pd.DataFrame, hold: pd.DataFrame, graph, seed: int  # noqa: ANN001
          ) -> dict[str, Any]:
    schema = model.schema
    syn = model.sample(len(train), seed=seed)
    plain = hold.drop(columns="site")
    # tests' power grows with rows: compare tables of the holdout's size
    rep = causal_report(plain, syn.iloc[:len(hold)], schema, graph)
    real_ref = causal_report(plain, train.drop(columns="site").iloc[:len(hold)], schema, graph)
    out = {
        "hold_real": rep["hold_real"], "hold_synthetic": rep["hold_synthetic"],
        "independence_agreement": rep["independence_agreement"],
        "edge_sign_agreement": rep["edge_sign_agreement"],
        "edges_significant_real": rep["edges_significant_real"],
        "edge_sign_agreement_train_vs_holdout": real_ref["edge_sign_agreement"],
        "hold_train": real_ref["hold_synthetic"],
        "column_fidelity": column_fidelity(plain, syn, schema),
        "pair_gap": pair_gap(plain, syn, schema),
        # AMLSG has no binary outcome in its schema (its utility is survival)
        "tstr_auroc": tstr_auroc(syn, plain, schema) if schema.outcome else float("nan"),
        "trtr_auroc": (tstr_auroc(train.drop(columns="site"), plain, schema)
                       if schema.outcome else float("nan")),
    }
    if model.sites and getattr(model, "mechanisms", None):
        # within hospitals: the graph's independences given the site, on both tables
        syn_sites = _by_site(model, len(hold), seed)
        within = causal_report(hold, syn_sites, schema, graph, site_column="site")
        out["hold_real_given_site"] = within["hold_real"]
        out["hold_synthetic_given_site"] = within["hold_synthetic"]
    return out


def one(dataset: str, seed: int, causal: bool, epsilon: float, out: Path,
        poolings: list[float], params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    study = replace(StudyConfig(), generator="marginal", seed=seed,
                    generator_params={**(params or {}), "causal": causal}, min_sites=2)
    # reproducible noise (benchmark only, labelled in the output): the arms of one seed
    # then see the same sites' noise draws where their releases coincide
    opts = SimulationOptions(dataset=dataset, epsilon=epsilon, study=study,
                             reproducible_noise=True)
    stash = _stash_measurements()
    try:
        model, train, hold, info = run_inprocess(opts, out / f"{dataset}-{seed}-{causal}",
                                                 keep_site=True)
    finally:
        stash["restore"]()
    graph = Schema.load(Path(__file__).parent.parent / "simulations" / "data" / dataset
                        / "schema.yaml").graph
    base = {"dataset": dataset, "seed": seed, "graph": causal, "noise": "reproducible",
            "epsilon_max": info["epsilon_max"]}
    if not causal:
        return [base | {"pooling": float("nan")} | score(model, train, hold, graph, seed)]
    from fedsynth.common.generators.marginal import causal as causal_module

    rows = []
    for pooling in poolings:  # post-processing of one release: no extra budget
        model.mechanisms = causal_module.from_measurements(
            stash["measurements"], stash["graph"], stash["order"], stash["sizes"],
            stash["sites"], pooling)
        rows.append(base | {"pooling": pooling} | score(model, train, hold, graph, seed))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="heart_disease")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epsilon", type=float, default=3.0)
    p.add_argument("--out", default="causal-bench")
    p.add_argument("--pooling", type=float, nargs="+", default=[1.0],
                   help="site_pooling values scored on the graph arm's one release")
    p.add_argument("--arms", choices=["both", "graph", "no-graph"], default="both")
    p.add_argument("--params", default="{}",
                   help="extra generator hyperparameters (JSON), "
                   "e.g. '{\"site_attribute\": false}'")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        arms = {"both": (True, False), "graph": (True,), "no-graph": (False,)}[args.arms]
        for causal in arms:
            for row in one(args.dataset, seed, causal, args.epsilon, out, args.pooling,
                           json.loads(args.params)):
                rows.append(row)
                print(json.dumps(row), flush=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(out / f"{args.dataset}.csv", index=False)
    frame["arm"] = [f"graph, pooling {p:g}" if g else "no graph"
                    for g, p in zip(frame["graph"], frame["pooling"], strict=True)]
    print(frame.drop(columns=["dataset", "seed", "graph", "pooling", "noise"])
          .groupby("arm").median().T.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
