"""AMLSG figures of a finished study: genes, co-occurrence and survival, real vs synthetic.

Run after ``fedsynth simulate --dataset amlsg --out DIR``::

    python research/bench_amlsg.py --out DIR

It reads DIR/real/train.csv (the real rows the sites trained on), DIR/synthetic.csv
and prints (and writes DIR/amlsg_figures.json). For sweeps of hyperparameters, where a
Flower/Ray start per run would cost more than the training, ``--train`` runs the same
study in process instead (``inprocess.py``: the site code of the Flower app, FedAvg
weighted by the sites' DP counts, the same splits) or, with ``--central``, one model
on the pooled training rows::

    python research/bench_amlsg.py --train --generator ddpm --epsilon 3 \
        --out DIR [--no-dp] [--central] [--generator-params JSON] [--local-epochs 20]

The figures:

- gene mutation frequencies: Pearson correlation, real vs synthetic;
- pairwise co-occurrence / mutual exclusivity: log odds ratio per gene pair (Haldane's
  0.5 correction), Fisher's exact test on the real table; for the pairs significant in
  the real data (p < 0.05), the share whose synthetic log odds ratio has the same sign;
- overall survival: a Cox model (lifelines) of OS on age, white cell count and the
  most frequent genes, fitted on real and on synthetic rows; hazard-ratio sign agreement
  over the covariates significant in the real fit.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter
from scipy.stats import fisher_exact

from fedsynth.common.generators import REGISTRY
from fedsynth.common.table import read_table
from fedsynth.simulations.datasets import bundled_schema

MIN_CARRIERS = 10  # genes mutated in fewer real patients carry no usable pair statistics


def _log_odds(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
    table = np.array(
        [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]], dtype=float
    )
    t = table + 0.5
    return float(math.log(t[0, 0] * t[1, 1] / (t[0, 1] * t[1, 0]))), table


def gene_figures(real: pd.DataFrame, syn: pd.DataFrame, genes: list[str]) -> dict[str, Any]:
    r = real[genes].astype(int).to_numpy().astype(bool)
    s = syn[genes].astype(int).to_numpy().astype(bool)
    freq_r, freq_s = r.mean(axis=0), s.mean(axis=0)
    corr = float(np.corrcoef(freq_r, freq_s)[0, 1])
    common = [i for i in range(len(genes)) if r[:, i].sum() >= MIN_CARRIERS]
    pairs, agree = 0, 0
    for i, j in combinations(common, 2):
        lor_r, table = _log_odds(r[:, i], r[:, j])
        p = fisher_exact(table.astype(int))[1]
        if p >= 0.05:
            continue
        lor_s, _ = _log_odds(s[:, i], s[:, j])
        pairs += 1
        agree += int(np.sign(lor_r) == np.sign(lor_s))
    return {
        "gene_frequency_correlation": corr,
        "genes_with_10_or_more_carriers": len(common),
        "significant_pairs_real": pairs,
        "pair_sign_agreement": agree / pairs if pairs else None,
    }


def cox_figures(real: pd.DataFrame, syn: pd.DataFrame, genes: list[str]) -> dict[str, Any]:
    top = (
        real[genes].astype(int).mean().sort_values(ascending=False).index[:8].tolist()
    )

    def design(frame: pd.DataFrame) -> pd.DataFrame:
        out = pd.DataFrame(
            {
                "age": pd.to_numeric(frame["age"], errors="coerce"),
                "log_wbc": np.log1p(pd.to_numeric(frame["wbc"], errors="coerce")),
                "OS": pd.to_numeric(frame["OS"], errors="coerce"),
                "death": pd.to_numeric(frame["death"], errors="coerce"),
            }
        )
        for g in top:
            out[g] = frame[g].astype(int)
        out = out.dropna()
        return out[out["OS"] > 0]

    fits = {}
    for name, frame in (("real", real), ("synthetic", syn)):
        cph = CoxPHFitter(penalizer=0.01)
        cph.fit(design(frame), duration_col="OS", event_col="death")
        fits[name] = cph.summary
    sig = fits["real"][fits["real"]["p"] < 0.05].index
    same = [
        bool(np.sign(fits["real"].loc[c, "coef"]) == np.sign(fits["synthetic"].loc[c, "coef"]))
        for c in sig
    ]
    return {
        "cox_covariates": list(fits["real"].index),
        "cox_significant_in_real": list(sig),
        "hazard_ratio_sign_agreement": (sum(same) / len(same)) if same else None,
        "hazard_ratios_real": fits["real"]["exp(coef)"].round(3).to_dict(),
        "hazard_ratios_synthetic": fits["synthetic"]["exp(coef)"].round(3).to_dict(),
    }


def _train(args: argparse.Namespace, out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Train in process (federated, or ``--central`` on the pooled rows); write the table."""
    from inprocess import run_inprocess

    from fedsynth.common.generators import get_generator
    from fedsynth.common.study import StudyConfig
    from fedsynth.simulations.simulate import SimulationOptions, prepare_sites

    params = json.loads(args.generator_params)
    study = StudyConfig(generator=args.generator, generator_params=params,
                        num_server_rounds=args.rounds, local_epochs=args.local_epochs,
                        sample_rate=args.sample_rate, seed=args.seed, output_dir=str(out))
    opts = SimulationOptions(dataset="amlsg", epsilon=args.epsilon, dp=not args.no_dp,
                             study=study)
    if args.central:
        _, train, _ = prepare_sites(opts, out)
        train = train.drop(columns="site")
        t0 = time.perf_counter()
        model = get_generator(args.generator)(bundled_schema("amlsg"), seed=args.seed, **params)
        model.fit(train, epochs=args.local_epochs * args.rounds, sample_rate=args.sample_rate,
                  epsilon=None if args.no_dp else args.epsilon)
        info = {"seconds": time.perf_counter() - t0, "epsilon_max": model.fit_info["epsilon"],
                "rows": len(train)}
    else:
        model, train, _, info = run_inprocess(opts, out)
    syn = model.sample(len(train), seed=args.seed)
    syn.to_csv(out / "synthetic.csv", index=False)
    return train, syn, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder of an AMLSG simulation")
    parser.add_argument("--train", action="store_true",
                        help="train in process first (see the module docstring)")
    parser.add_argument("--central", action="store_true", help="with --train: pooled rows")
    parser.add_argument("--generator", choices=sorted(REGISTRY), default="tvae")
    parser.add_argument("--generator-params", default="{}")
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--no-dp", action="store_true")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=20)
    parser.add_argument("--sample-rate", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    try:
        if not isinstance(json.loads(args.generator_params), dict):
            raise ValueError("not an object")
    except ValueError as exc:
        parser.error(f"--generator-params must be a JSON object, e.g. '{{\"hidden\": 64}}' "
                     f"({exc})")
    out = Path(args.out)
    schema = bundled_schema("amlsg")
    info: dict[str, Any] = {}
    if args.train:
        out.mkdir(parents=True, exist_ok=True)
        real, syn, info = _train(args, out)
        syn = read_table(out / "synthetic.csv", replace(schema, header=True))
    else:
        if not (out / "real" / "train.csv").is_file() or not (out / "synthetic.csv").is_file():
            parser.error(f"{out} is not the output of an AMLSG study (no real/train.csv or "
                         "synthetic.csv): run `fedsynth simulate --dataset amlsg --out DIR` "
                         "first, or pass --train")
        real = read_table(out / "real" / "train.csv", schema)
        syn = read_table(out / "synthetic.csv", replace(schema, header=True))
    genes = schema.codesets["mut"]
    figures = {**info, **gene_figures(real, syn, genes), **cox_figures(real, syn, genes)}
    (out / "amlsg_figures.json").write_text(json.dumps(figures, indent=1))
    for key, value in figures.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
