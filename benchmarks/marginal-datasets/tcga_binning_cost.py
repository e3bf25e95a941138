"""What discretizing TCGA-BRCA's time and age costs a Cox model by itself: the real
training rows with T (log scale) and age redrawn uniformly inside equal-mass bins of
their own values (an upper bound on the binning's cost: no DP, exact bins), scored by
the validation suite's C-index on the real holdout. Usage: python tcga_binning_cost.py"""

import warnings
from pathlib import Path

import numpy as np

from fedsynth.common.validation import validate
from fedsynth.simulations.benchmark import BenchmarkOptions, prepare_seed

warnings.simplefilter("ignore")


def c_index(train, hold, table, schema, seed):  # noqa: ANN001, ANN201
    res = validate(train, hold, table, schema, seed=seed, areas=["survival"],
                   survival=("T", "E"))
    return {m.name: m for m in res.metrics}["cox_c_index"].value


def redraw(values: np.ndarray, bins: int, rng: np.random.Generator) -> np.ndarray:
    edges = np.quantile(values, np.linspace(0, 1, bins + 1))
    edges[0], edges[-1] = edges[0] - 1e-9, edges[-1] + 1e-9
    idx = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, bins - 1)
    return rng.uniform(edges[idx], edges[idx + 1])


for seed in (0, 1, 2):
    data = prepare_seed(BenchmarkOptions(dataset="tcga_brca"), seed,
                        Path(f"/tmp/marginal-datasets/tcga_brca{seed}"))
    train, hold = data.train.drop(columns="site"), data.holdout.drop(columns="site")
    rng = np.random.default_rng(seed)
    out = {"real": c_index(train, hold, train, data.schema, seed)}
    for bins in (3, 6, 12):
        t = np.expm1(redraw(np.log1p(train["T"].to_numpy(float)), bins, rng))
        timed = train.assign(T=np.round(t).astype(int))
        out[f"T {bins} bins"] = c_index(train, hold, timed, data.schema, seed)
        age = np.round(redraw(train["age_at_index"].to_numpy(float), 6, rng)).astype(int)
        out[f"T {bins} + age 6"] = c_index(train, hold, timed.assign(age_at_index=age),
                                           data.schema, seed)
    print(seed, {k: round(v, 3) for k, v in out.items()}, flush=True)
