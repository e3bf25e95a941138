"""One emulated central fit, shared by this folder's probes: `fedsynth benchmark`'s
split of a seed, the marginal generator fitted on the pooled training rows at EPSILON
with reproducible noise (labelled: a benchmark, not a release), and a synthetic table of
the training size. Why one place: the probes compare hyperparameters and workloads, so
they must fit and sample exactly alike.

The split (real rows) is written under ``workdir``: the caller deletes it after.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fedsynth.common.generators.marginal import MarginalGenerator
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.simulations.benchmark import BenchmarkOptions, prepare_seed


@dataclass
class CentralFit:
    data: Any  # the benchmark's prepared seed (schema, train, holdout)
    train: pd.DataFrame
    hold: pd.DataFrame
    model: MarginalGenerator
    synthetic: pd.DataFrame
    seconds: float


def central_fit(dataset: str, seed: int, epsilon: float | None, params: dict[str, Any],
                workdir: Path) -> CentralFit:
    data = prepare_seed(BenchmarkOptions(dataset=dataset), seed, workdir)
    train, hold = data.train.drop(columns="site"), data.holdout.drop(columns="site")
    start = time.time()
    model = MarginalGenerator(data.schema, seed=seed, **params)
    model.fit(train, epsilon=epsilon, randomness=DPRandomness.reproducible(seed, "central"))
    synthetic = model.sample(len(train), seed=seed + 1)
    return CentralFit(data, train, hold, model, synthetic, time.time() - start)
