"""A federated study in one process: the Flower app's site code, without Flower.

Benchmarks sweep hyperparameters over many studies; with 18 AMLSG sites a Flower/Ray
simulation spends more time starting than training. This runs the same thing in a
loop: every site trains with ``client.site.train_site`` (its own ledger, DP count,
noise calibrated to the whole plan), the coordinator averages the replies weighted by
the sites' (noisy) counts exactly as FedAvg does, and the synthetic table has as many
rows as the study trained on. Final figures still come from ``fedsynth simulate``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..client.site import TRAINED, SiteState, train_site
from ..common.generators import Generator, get_generator
from ..common.schema import Schema
from ..common.study import StudyConfig, schema_fingerprint
from .datasets import bundled_schema_path
from .simulate import SimulationOptions, prepare_sites


def fedavg(replies: list[tuple[float, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """Weighted mean of the sites' flat states (weights: their reported counts)."""
    total = sum(w for w, _ in replies)
    keys = replies[0][1].keys()
    return {
        k: (sum(w * s[k].astype(np.float64) for w, s in replies) / total).astype(
            replies[0][1][k].dtype
        )
        for k in keys
    }


def run_inprocess(opts: SimulationOptions, out: Path) -> tuple[Generator, pd.DataFrame,
                                                                 dict[str, Any]]:
    """Train the study of ``opts`` in process; return the model, train rows and info."""
    t0 = time.perf_counter()
    sites, train, _ = prepare_sites(opts, out)
    schema = Schema.load(bundled_schema_path(opts.dataset))
    study: StudyConfig = replace(opts.study, schema=str(bundled_schema_path(opts.dataset)))
    fp = schema_fingerprint(schema)
    model = get_generator(study.generator)(schema, seed=study.seed, **study.generator_params)
    states = {s.name: SiteState() for s in sites}
    epsilons: dict[str, float] = {}
    for r in range(1, study.num_server_rounds + 1):
        replies = []
        for site in sites:
            reply = train_site(site, study, fp, model.state_dict(), states[site.name], r)
            if reply.status == TRAINED and reply.arrays is not None:
                replies.append((reply.metrics["num-examples"], reply.arrays))
            epsilons[site.name] = reply.metrics["epsilon"]
        if replies:
            model.load_state_dict(fedavg(replies))
    info = {"seconds": time.perf_counter() - t0, "epsilon_max": max(epsilons.values()),
            "rows": len(train)}
    return model, train.drop(columns="site"), info
