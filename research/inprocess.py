"""A federated study of ``fedsynth simulate``'s options, in one process, for sweeps.

Benchmarks sweep hyperparameters over many studies; with 18 AMLSG sites a Flower/Ray
simulation spends more time starting than training. This prepares the sites exactly
as ``fedsynth simulate`` does and runs the study through
:func:`benchmark_inprocess.run_inprocess`: the real coordinator (``run_study``: the
site-aware strategy, server momentum, checkpoints) and the real ClientApp, with no Ray.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from fedsynth.common.generators import Generator
from fedsynth.server.app import MODEL, final_site_privacy
from fedsynth.simulations.benchmark_inprocess import run_inprocess as run_study_inprocess
from fedsynth.simulations.datasets import bundled_schema_path
from fedsynth.simulations.simulate import SimulationOptions, prepare_sites


def run_inprocess(
    opts: SimulationOptions, out: Path, keep_site: bool = False
) -> tuple[Generator, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Train the study of ``opts`` in process; return the model, the train rows, the
    holdout (the split ``fedsynth simulate`` makes for the same seed) and info.
    ``keep_site``: the tables keep their ``site`` column (the hospital of each row)."""
    t0 = time.perf_counter()
    sites, train, hold = prepare_sites(opts, out)
    study = replace(
        opts.study,
        schema=str(bundled_schema_path(opts.dataset)),
        min_sites=min(opts.study.min_sites, len(sites)),
        output_dir=str(out / "study"),
    )
    result = run_study_inprocess(study, sites)
    model = Generator.load(Path(study.output_dir) / MODEL)
    spent = [
        s["epsilon"] for s in final_site_privacy(result.outcome.history).values()
        if s["epsilon"] is not None
    ]
    info = {"seconds": time.perf_counter() - t0, "epsilon_max": max(spent, default=None),
            "rows": len(train)}
    if keep_site:
        return model, train, hold, info
    return model, train.drop(columns="site"), hold.drop(columns="site", errors="ignore"), info
