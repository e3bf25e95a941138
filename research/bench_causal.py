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


def one(dataset: str, seed: int, causal: bool, epsilon: float, out: Path) -> dict[str, Any]:
    study = replace(StudyConfig(), generator="marginal", seed=seed,
                    generator_params={"causal": causal}, min_sites=2)
    opts = SimulationOptions(dataset=dataset, epsilon=epsilon, study=study)
    model, train, hold, info = run_inprocess(opts, out / f"{dataset}-{seed}-{causal}")
    syn = model.sample(len(train), seed=seed)
    schema = model.schema
    graph = Schema.load(Path(__file__).parent / "data" / dataset / "schema.yaml").graph
    # tests' power grows with rows: compare tables of the holdout's size
    rep = causal_report(hold, syn.iloc[:len(hold)], schema, graph)
    real_ref = causal_report(hold, train.iloc[:len(hold)], schema, graph)  # real vs real
    # within one hospital: the site attribute is a common cause of every column, so a
    # pooled table breaks independences that hold hospital by hospital
    by_site = [causal_report(hold, model.sample(len(hold), site=s, seed=seed), schema,
                             graph)["hold_synthetic"] for s in model.sites]
    return {
        "dataset": dataset, "seed": seed, "graph": causal,
        "hold_synthetic_within_site": float(np.median(by_site)) if by_site else float("nan"),
        "epsilon_max": info["epsilon_max"],
        "hold_real": rep["hold_real"], "hold_synthetic": rep["hold_synthetic"],
        "independence_agreement": rep["independence_agreement"],
        "edge_sign_agreement": rep["edge_sign_agreement"],
        "edges_significant_real": rep["edges_significant_real"],
        "edge_sign_agreement_train_vs_holdout": real_ref["edge_sign_agreement"],
        "hold_train": real_ref["hold_synthetic"],
        "column_fidelity": column_fidelity(hold, syn, schema),
        "pair_gap": pair_gap(hold, syn, schema),
        # AMLSG has no binary outcome in its schema (its utility is survival)
        "tstr_auroc": tstr_auroc(syn, hold, schema) if schema.outcome else float("nan"),
        "trtr_auroc": tstr_auroc(train, hold, schema) if schema.outcome else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="heart_disease")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epsilon", type=float, default=3.0)
    p.add_argument("--out", default="causal-bench")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for causal in (True, False):
            rows.append(one(args.dataset, seed, causal, args.epsilon, out))
            print(json.dumps(rows[-1]), flush=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(out / f"{args.dataset}.csv", index=False)
    print(frame.drop(columns=["dataset", "seed"]).groupby("graph").median().T.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
