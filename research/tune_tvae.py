"""Tune the TVAE on the default heart-disease study, in process and over several seeds.

``fedsynth simulate`` starts Ray (25-50 s) for every run; this script runs the very
same study (the real coordinator and ClientApp, through ``research/inprocess.py``)
in one process, so a configuration can be judged on several seeds in the time one
simulation takes to start. Each seed changes everything a study
seed changes: the per-hospital 80/20 holdout split, the initial model, the DP noise and
the sampling. The synthetic table is scored against the real holdout by the project's
validation module (mean per-column fidelity and TSTR AUROC of logistic regression),
the figures ``fedsynth simulate`` writes to summary.json.

Run: ``python research/tune_tvae.py --epsilon 10 --seeds 42,43,44
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from inprocess import run_inprocess

from fedsynth.common.study import StudyConfig
from fedsynth.common.table import read_table
from fedsynth.common.validation import validate
from fedsynth.server.app import SYNTHETIC
from fedsynth.simulations.simulate import SimulationOptions


@dataclass
class RunResult:
    seed: int
    fidelity: float
    tstr: float
    trtr: float
    epsilon: float
    seconds: float
    columns: dict[str, float]  # per-column KS (numeric) or TVD (categorical)


def run_study(study: StudyConfig, epsilon: float | None, workdir: Path) -> RunResult:
    """One whole heart-disease study, in process; its validation figures."""
    start = time.perf_counter()
    opts = SimulationOptions(dataset="heart_disease", epsilon=epsilon or 3.0,
                             dp=epsilon is not None, study=study)
    model, train, hold, info = run_inprocess(opts, workdir)
    # the table the study released, as `fedsynth simulate` reads it
    synthetic = read_table(workdir / "study" / SYNTHETIC, replace(model.schema, header=True))
    result = validate(
        train,
        hold,
        synthetic,
        model.schema,
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
    eps = float(info["epsilon_max"]) if info["epsilon_max"] is not None else float("nan")
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
    parser.add_argument("--server-lr", type=float, default=StudyConfig.server_lr)
    parser.add_argument("--server-momentum", type=float, default=StudyConfig.server_momentum)
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
            server_lr=args.server_lr,
            server_momentum=args.server_momentum,
        )
        with tempfile.TemporaryDirectory(prefix="fedsynth-tune-") as tmp:
            res = run_study(study, epsilon, Path(tmp))
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
