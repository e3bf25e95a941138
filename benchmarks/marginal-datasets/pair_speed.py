"""Where an AMLSG marginal fit's time goes with and without the pair release (issue 13).

A central fit on the training rows of `fedsynth benchmark`'s split (seed 0) at epsilon
0.615 (the noise of 18 sites at 3 each), `DPRandomness.reproducible` (a benchmark, not
a release), then 1,232 sampled rows; it times mbi's estimation, the pairs' reading
(`engine._model_pairs`, junction-tree checks included) and the sampling, and counts the
pairs the model reads and its junction tree's cells.

Usage: python pair_speed.py [JSON_HYPERPARAMETERS, e.g. '{"pair_bound": 0}']
"""

import json
import sys
import time
import warnings
from pathlib import Path

from fedsynth.common.generators.marginal import MarginalGenerator, engine, fit
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.simulations.benchmark import BenchmarkOptions, prepare_seed

warnings.simplefilter("ignore")
seconds: dict[str, float] = {}


def timed(module, name: str) -> None:  # noqa: ANN001
    inner = getattr(module, name)

    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start

    setattr(module, name, wrapper)


timed(engine, "_model_pairs")
timed(fit, "estimate")
data = prepare_seed(BenchmarkOptions(dataset="amlsg"), 0, Path("/tmp/marginal-datasets/amlsg0"))
train = data.train.drop(columns="site")
params = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
model = MarginalGenerator(data.schema, seed=0, **params)
start = time.perf_counter()
model.fit(train, epsilon=0.615, randomness=DPRandomness.reproducible(0, "central"))
seconds["fit"] = time.perf_counter() - start
start = time.perf_counter()
model.sample(len(train), seed=1)
seconds["sample"] = time.perf_counter() - start
cells = fit.model_cells(model.sizes, [tuple(c) for c in model.mrf.cliques], [])
print(json.dumps({"params": params, **{k: round(v, 1) for k, v in seconds.items()},
                  "pairs_in_model": len(model.fit_info["pairs_in_model"]),
                  "tree_cells": cells}))
