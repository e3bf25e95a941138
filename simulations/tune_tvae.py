"""Tune the TVAE on the default heart-disease study, in process and over several seeds.

``fedsynth simulate`` starts Ray (25-50 s) for every run; this script runs the very
same site code (``client.site.train_site``: DP-SGD, the ledger, the count release, the
loss report) and Flower's FedAvg arithmetic (the weighted mean of the replies by
their DP row counts) in one process, so a configuration can be judged on several
seeds in the time one simulation takes to start. Each seed changes everything a study
seed changes: the per-hospital 80/20 holdout split, the initial model, the DP noise and
the sampling. The synthetic table is scored against the real holdout by the project's
validation module (mean per-column fidelity and TSTR AUROC of logistic regression),
the figures ``fedsynth simulate`` writes to summary.json.

Run: ``python -m fedsynth.simulations.tune_tvae --epsilon 10 --seeds 42,43,44
--params '{"kl_weight": 0.3}'``; prints one line per seed and the median, min, max.
``--server-lr`` / ``--server-momentum`` try a FedAvgM step on the coordinator
(``server/optimizer.py``; post-processing, free privacy-wise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..client.site import TRAINED, SiteState, train_site
from ..common.generators import get_generator
from ..common.study import SiteConfig, StudyConfig, schema_fingerprint
from ..common.validation import validate
from ..server.optimizer import ServerMomentum, buffer_keys
from .datasets import bundled_schema_path, load_site_frames
from .splits import holdout_split, write_site_table


@dataclass
class RunResult:
    seed: int
    fidelity: float
    tstr: float
    trtr: float
    epsilon: float
    seconds: float
    columns: dict[str, float]  # per-column KS (numeric) or TVD (categorical)


def weighted_mean(replies: list[tuple[float, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """FedAvg's aggregate: the replies' arrays averaged with their row-count weights."""
    total = sum(w for w, _ in replies)
    keys = replies[0][1].keys()
    return {
        k: (sum(w * a[k].astype(np.float64) for w, a in replies) / total).astype(
            replies[0][1][k].dtype
        )
        for k in keys
    }


def run_study(
    study: StudyConfig,
    epsilon: float | None,
    workdir: Path,
    server: ServerMomentum | None = None,
) -> RunResult:
    """One whole study on the bundled heart-disease hospitals; its validation figures."""
    start = time.perf_counter()
    schema_path = bundled_schema_path("heart_disease")
    schema, frames = load_site_frames("heart_disease")
    fingerprint = schema_fingerprint(schema)
    sites, trains, holds = [], [], []
    for i, (name, frame) in enumerate(frames.items()):  # as simulate.prepare_sites
        train, hold = holdout_split(frame, schema, 0.2, seed=study.seed + i)
        path = workdir / f"site-{name}.csv"
        write_site_table(train, schema, str(path))
        sites.append(SiteConfig(name=name, data_path=str(path), schema_path=str(schema_path),
                                epsilon=epsilon or 3.0, dp=epsilon is not None))
        trains.append(train)
        holds.append(hold)
    model = get_generator(study.generator)(schema, seed=study.seed, **study.generator_params)
    global_state = model.state_dict()
    states = {s.name: SiteState() for s in sites}
    weights: list[float] = []
    for rnd in range(1, study.num_server_rounds + 1):
        replies = []
        for site in sites:
            reply = train_site(site, study, fingerprint, global_state, states[site.name], rnd)
            if reply.status == TRAINED and reply.arrays is not None:
                replies.append((reply.metrics["num-examples"], reply.arrays))
        if not replies:
            break
        weights = [w for w, _ in replies]
        averaged = weighted_mean(replies)
        if server is None:
            global_state = averaged
        else:
            global_state = server.step(global_state, averaged, buffer_keys(model.networks()))
    model.load_state_dict(global_state)
    synthetic = model.sample(max(1, int(round(sum(weights)))), seed=study.seed)
    result = validate(
        pd.concat(trains, ignore_index=True),
        pd.concat(holds, ignore_index=True),
        synthetic,
        schema,
        seed=study.seed,
        areas=("fidelity", "utility"),
        models=("logistic_regression",),
    )
    head = result.headline()
    columns = {
        m.columns[0]: float(m.value)
        for m in result.metrics
        if m.name in ("ks", "tvd") and m.columns
    }
    eps = max(s.ledger.epsilon(1e-5) for s in states.values()) if epsilon else float("nan")
    return RunResult(study.seed, float(head["fidelity"]), float(head["tstr_auroc"]),
                     float(head["trtr_auroc"]), eps, time.perf_counter() - start, columns)


def summarise(results: list[RunResult]) -> str:
    def stat(values: list[float]) -> str:
        return (f"median {statistics.median(values):.3f} "
                f"[{min(values):.3f}, {max(values):.3f}]")

    return (f"TSTR {stat([r.tstr for r in results])} | "
            f"fidelity {stat([r.fidelity for r in results])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", default="10", help="per-site budget, or 'none' (no DP)")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--params", default="{}", help="TVAE hyperparameters (JSON)")
    parser.add_argument("--rounds", type=int, default=StudyConfig.num_server_rounds)
    parser.add_argument("--local-epochs", type=int, default=StudyConfig.local_epochs)
    parser.add_argument("--sample-rate", type=float, default=StudyConfig.sample_rate)
    parser.add_argument("--max-grad-norm", type=float, default=StudyConfig.max_grad_norm)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--server-momentum", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--columns", action="store_true",
                        help="also print each column's KS / TVD distance per seed")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    epsilon = None if args.epsilon == "none" else float(args.epsilon)
    params: dict[str, Any] = json.loads(args.params)
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        study = StudyConfig(
            seed=seed,
            num_server_rounds=args.rounds,
            local_epochs=args.local_epochs,
            sample_rate=args.sample_rate,
            max_grad_norm=args.max_grad_norm,
            generator_params=params,
        )
        server = None
        if args.server_lr != 1.0 or args.server_momentum != 0.0:
            server = ServerMomentum(lr=args.server_lr, momentum=args.server_momentum)
        with tempfile.TemporaryDirectory(prefix="fedsynth-tune-") as tmp:
            res = run_study(study, epsilon, Path(tmp), server)
        results.append(res)
        print(f"seed {res.seed}: TSTR {res.tstr:.3f} (TRTR {res.trtr:.3f}) fidelity "
              f"{res.fidelity:.3f} eps {res.epsilon:.3f} {res.seconds:.0f} s", flush=True)
        if args.columns:
            print("  distance by column: " + ", ".join(
                f"{k} {v:.2f}" for k, v in sorted(res.columns.items(), key=lambda kv: -kv[1])))
    print(f"eps {args.epsilon} params {json.dumps(params)} server lr {args.server_lr} "
          f"momentum {args.server_momentum}: {summarise(results)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
