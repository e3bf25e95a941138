"""What a fair reference for AMLSG's Cox hazard-ratio sign agreement is (issue 13).

`cox_hr_sign_agreement` fits a Cox model on the training rows and one on the synthetic
rows, and counts the covariates significant in the training model (p < 0.05) whose
hazard ratio points the same way in the synthetic one. Its `_ref` puts the real holdout
(a fifth of the rows) where the synthetic table goes. A second real study is what the
synthetic table stands in for, so this script measures how often two *independent* real
samples agree, by the same metric code: the pooled real rows of `fedsynth benchmark`'s
split (training + holdout) cut at random into two disjoint halves A and B, the metric
with A as "train" and B as "synthetic" (and the other way round), 10 cuts per seed.

Usage: python cox_reference.py [SEEDS, e.g. 0,1,2] [CUTS]
"""

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from fedsynth.common.validation import validate
from fedsynth.simulations.benchmark import BenchmarkOptions, prepare_seed

warnings.simplefilter("ignore")
seeds = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "0,1,2").split(",")]
cuts = int(sys.argv[2]) if len(sys.argv) > 2 else 10


def agreement(train: pd.DataFrame, other: pd.DataFrame, schema, seed: int) -> float:
    pair = schema.survival_pairs[0]
    result = validate(train, train.iloc[:50], other, schema, seed=seed, areas=["survival"],
                      survival=pair)
    return next(float(m.value) for m in result.metrics if m.name == "cox_hr_sign_agreement")


for seed in seeds:
    data = prepare_seed(BenchmarkOptions(dataset="amlsg"), seed,
                        Path(f"/tmp/marginal-datasets/amlsg{seed}"))
    train, hold = data.train.drop(columns="site"), data.holdout.drop(columns="site")
    pooled = pd.concat([train, hold], ignore_index=True)
    rng = np.random.default_rng(seed)
    halves = []
    for _ in range(cuts):
        order = rng.permutation(len(pooled))
        a, b = pooled.iloc[order[: len(pooled) // 2]], pooled.iloc[order[len(pooled) // 2:]]
        halves += [agreement(a, b, data.schema, seed), agreement(b, a, data.schema, seed)]
    # a random real subsample of the holdout's size against the rest of the training rows
    small = []
    for _ in range(cuts):
        order = rng.permutation(len(train))
        k = len(hold)
        small.append(agreement(train.iloc[order[k:]], train.iloc[order[:k]], data.schema, seed))
    print(json.dumps({"seed": seed, "rows": len(pooled),
                      "holdout_vs_train": agreement(train, hold, data.schema, seed),
                      "half_vs_half_median": float(np.median(halves)),
                      "half_vs_half_range": [float(np.min(halves)), float(np.max(halves))],
                      "subsample_of_holdout_size_median": float(np.median(small))}),
          flush=True)
