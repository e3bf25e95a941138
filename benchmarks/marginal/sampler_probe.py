"""Heart disease: the marginal generator's two ways of drawing rows, paired on one fit.

Each seed fits one model centrally at EPSILON on the benchmark's pooled training rows
(reproducible noise from `DPRandomness.reproducible`: a benchmark, not a release; 4 sites
at epsilon 1 / 3 sum the noise of one central release at 0.4718 / 1.393, rdp, delta
1e-5), then draws the same number of rows with mbi's independent sampler ("sample") and
with its randomized rounding ("round"), and validates both against the holdout with the
benchmark's evaluator. Drawing is post-processing: both tables come from the same
release. Prints one JSON line per (seed, sampler) and the paired medians.
Usage: python sampler_probe.py EPSILON SEEDS"""

import json
import sys
import warnings
from pathlib import Path

import numpy as np

from fedsynth.common.generators.marginal import MarginalGenerator
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.validation import validate
from fedsynth.simulations.benchmark import BenchmarkOptions, prepare_seed

warnings.simplefilter("ignore")
eps = float(sys.argv[1])
seeds = [int(s) for s in sys.argv[2].split(",")]
KEYS = ("fidelity", "tstr_auroc", "detection_auroc", "membership_inference_auroc")
rows: dict[str, list[dict[str, float]]] = {"sample": [], "round": []}
for seed in seeds:
    data = prepare_seed(BenchmarkOptions(dataset="heart_disease"), seed,
                        Path(f"/tmp/marginal-datasets/heart{seed}"))
    train, hold = data.train.drop(columns="site"), data.holdout.drop(columns="site")
    model = MarginalGenerator(data.schema, seed=seed)
    model.fit(train, epsilon=eps, randomness=DPRandomness.reproducible(seed, "central"))
    for sampler in ("sample", "round"):
        model.hparams["sampler"] = sampler
        synthetic = model.sample(len(train), seed=seed + 1)
        res = validate(train, hold, synthetic, data.schema, seed=seed,
                       areas=["fidelity", "utility", "detection", "privacy"])
        head = res.headline()
        row = {k: round(float(head[k]), 4) for k in KEYS if k in head}
        rows[sampler].append(row)
        print(json.dumps({"seed": seed, "sampler": sampler, **row}), flush=True)
for k in KEYS:
    a = np.array([r.get(k, np.nan) for r in rows["sample"]])
    b = np.array([r.get(k, np.nan) for r in rows["round"]])
    d = b - a
    print(f"MEDIAN eps {eps} {k}: sample {np.nanmedian(a):.3f} round {np.nanmedian(b):.3f} "
          f"paired round-sample mean {np.nanmean(d):+.4f} +- {np.nanstd(d) / np.sqrt(len(d)):.4f}"
          f" (round higher in {int((d > 0).sum())} of {len(d)})")
