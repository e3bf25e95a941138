"""Runs anonymeter's three attacks in anonymeter's own environment; prints JSON.

This file is executed *by path* with the Python of a separate virtual environment that
has anonymeter (which pins numpy < 2) installed; it must import nothing from fedsynth.
Usage: ``python _anonymeter_worker.py JOB.json``; the job names three CSV files
(``train``: the generator's training rows, anonymeter's "ori"; ``synthetic``;
``control``: the holdout) and the attack settings.
"""

from __future__ import annotations

import json
import random
import sys
import warnings
from typing import Any

import numpy as np
import pandas as pd
from anonymeter.evaluators import (
    InferenceEvaluator,
    LinkabilityEvaluator,
    SinglingOutEvaluator,
)


def _risk(evaluator: Any) -> dict[str, Any]:
    risk = evaluator.risk(confidence_level=0.95)
    res = evaluator.results()
    return {
        "risk": float(risk.value),
        "ci": [float(risk.ci[0]), float(risk.ci[1])],
        "attack_rate": float(res.attack_rate.value),
        "baseline_rate": float(res.baseline_rate.value),
        "control_rate": float(res.control_rate.value),
        "n_attacks": int(res.n_attacks_ori),
    }


def main(job_path: str) -> None:
    with open(job_path, encoding="utf-8") as handle:
        job = json.load(handle)
    random.seed(int(job["seed"]))
    np.random.seed(int(job["seed"]))  # anonymeter samples with numpy's global generator
    dtypes = {c: str for c in job["categorical"]}
    ori, syn, control = (
        pd.read_csv(job[k], dtype=dtypes, keep_default_na=False, na_values=[""])
        for k in ("train", "synthetic", "control")
    )
    n_attacks = int(job["n_attacks"])
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        so = SinglingOutEvaluator(
            ori=ori, syn=syn, control=control, n_attacks=n_attacks, seed=int(job["seed"])
        )
        so.evaluate(mode="univariate")
        out["singling_out"] = _risk(so)
        half = len(ori.columns) // 2
        aux = (list(ori.columns[:half]), list(ori.columns[half:]))
        link = LinkabilityEvaluator(
            ori=ori,
            syn=syn,
            control=control,
            n_attacks=min(n_attacks, len(control)),
            aux_cols=aux,
            n_neighbors=10,
        )
        link.evaluate(n_jobs=1)
        out["linkability"] = _risk(link)
        out["linkability"]["aux_cols"] = aux
        out["inference"] = {}
        for secret in job["secrets"]:
            inf = InferenceEvaluator(
                ori=ori,
                syn=syn,
                control=control,
                secret=secret,
                aux_cols=[c for c in ori.columns if c != secret],
                n_attacks=min(n_attacks, len(control)),
            )
            inf.evaluate(n_jobs=1)
            out["inference"][secret] = _risk(inf)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
