"""Why the fitted model reads AMLSG's gene frequencies worse than the code histogram.

One central fit at 18 sites' summed noise (epsilon 0.615, as `emulate_sites.py`;
reproducible noise from `DPRandomness.reproducible`: a benchmark, not a release). Then,
on the same released measurements (post-processing only), the Pearson correlation of
the holdout's gene frequencies with: the training rows, the noisy code histogram
(clipped at 0), the fitted model's gene marginals, and the marginals of mbi refits on
subsets of the measurements or with more iterations. The residual column is the mean
of (model - histogram) / histogram noise std over genes: a converged least-squares fit
with no other measurement of the genes would have it near 0.

Usage: python gene_marginals.py SEED [JSON_HYPERPARAMETERS] [REFITS, e.g. codes,all:3000]
(a refit: a subset of the measurements, codes, codes+links, codes+pairs or all, and
optionally its mirror-descent iterations)
"""

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import stats

from fedsynth.common.generators.marginal import MarginalGenerator, fit
from fedsynth.common.generators.marginal.plan import LINKS, PAIRS
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.simulations.benchmark import BenchmarkOptions, prepare_seed

warnings.simplefilter("ignore")
seed = int(sys.argv[1])
params = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
variants = (sys.argv[3] if len(sys.argv) > 3 else "codes,all:3000").split(",")


class Kept(MarginalGenerator):
    """The generator, keeping the engine's result (its measurements) for refits."""

    def run_engine(self, plan, measurer, sites):  # noqa: ANN001, ANN201
        self.result = super().run_engine(plan, measurer, sites)
        return self.result


data = prepare_seed(BenchmarkOptions(dataset="amlsg"), seed,
                    Path(f"/tmp/marginal-datasets/amlsg{seed}"))
train, hold = data.train.drop(columns="site"), data.holdout.drop(columns="site")
genes = list(data.schema.codesets.values())[0]
real = hold[genes].to_numpy(float).clip(0, 1).mean(0)
model = Kept(data.schema, seed=seed, **params)
model.fit(train, epsilon=0.615, randomness=DPRandomness.reproducible(seed, "central"))
meas = model.result.measurements
hist = {m.clique[0]: m for m in model.result.codes}
y = np.array([float(np.ravel(hist[g].values)[0]) for g in genes])
sd = float(np.ravel(hist[genes[0]].stddev)[0])


def marginals(mrf) -> np.ndarray:  # noqa: ANN001
    return np.array([float(np.asarray(mrf.project((g,)).datavector())[1]) for g in genes])


def row(name: str, est: np.ndarray, seconds: float = 0.0) -> None:
    print(json.dumps({"seed": seed, "params": params, "estimate": name,
                      "corr_holdout": round(float(stats.pearsonr(real, est)[0]), 4),
                      "mean_resid_sd": round(float(np.mean((est - y) / sd)), 3),
                      "rms_resid_sd": round(float(np.sqrt(np.mean(((est - y) / sd) ** 2))), 3),
                      "seconds": round(seconds)}), flush=True)


print(json.dumps({"seed": seed, "codes_sd": round(sd, 2), "kinds": {
    k: sum(m.kind == k for m in meas) for k in {m.kind for m in meas}},
    "noise": model.fit_info["noise"]}), flush=True)
row("train rows", train[genes].to_numpy(float).clip(0, 1).sum(0))
row("code histogram", y.clip(0))
row("model (default fit)", marginals(model.mrf))
sizes = model.sizes
subsets = {
    "codes": [m for m in meas if m.kind not in (PAIRS, LINKS)],
    "codes+links": [m for m in meas if m.kind != PAIRS],
    "codes+pairs": [m for m in meas if m.kind != LINKS],
    "all": list(meas),
}
for v in variants:
    base, _, iters = v.partition(":")
    start = time.time()
    mrf = fit.estimate(sizes, subsets[base], [], int(iters or 1000))
    row(f"refit {base}, {iters or 1000} iters", marginals(mrf), time.time() - start)
