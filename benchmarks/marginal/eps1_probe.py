"""Heart disease at epsilon 1: central fits at a given epsilon on the pooled training
rows of `fedsynth benchmark`'s split, printing what the plan selected and its noise.

4 sites at epsilon 1 each sum 4 noises: the same as one central release at epsilon
0.4718 (rdp, delta 1e-5; emulate_sites.py explains; 4 sites at 3: 1.393). The central
fit plans for its own noise (``plan.summed_noise`` of its budget), which then equals
the 4 sites' sum, so the emulation gets the federated study's plan too. Noise from
`DPRandomness.reproducible` (a benchmark, not a release).
Usage: python eps1_probe.py EPSILON JSON_PARAMS SEEDS"""

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from fedsynth.common.generators.marginal import MarginalGenerator
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.validation import validate
from fedsynth.simulations.benchmark import BenchmarkOptions, prepare_seed

warnings.simplefilter("ignore")
eps = float(sys.argv[1])
params = json.loads(sys.argv[2])
seeds = [int(s) for s in sys.argv[3].split(",")]
found: dict[str, list[float]] = {}
for seed in seeds:
    data = prepare_seed(BenchmarkOptions(dataset="heart_disease"), seed,
                        Path(f"/tmp/marginal-datasets/heart{seed}"))
    train, hold = data.train.drop(columns="site"), data.holdout.drop(columns="site")
    start = time.time()
    model = MarginalGenerator(data.schema, seed=seed, **params)
    model.fit(train, epsilon=eps, randomness=DPRandomness.reproducible(seed, "central"))
    synthetic = model.sample(len(train), seed=seed + 1)
    res = validate(train, hold, synthetic, data.schema, seed=seed,
                   areas=["fidelity", "utility"])
    head = res.headline()
    row = {k: round(float(head[k]), 3) for k in ("fidelity", "tstr_auroc")}
    row.update({m.columns[0]: round(1 - m.value, 3) for m in res.metrics  # per column
                if m.name in ("ks", "tvd") and len(m.columns) == 1})
    for k, v in row.items():
        found.setdefault(k, []).append(v)
    info = model.fit_info
    print(json.dumps({"seed": seed, "seconds": round(time.time() - start), **row,
                      "noise": {k: round(v, 1) for k, v in info["noise"].items()},
                      "plan": [info["plan"][k] for k in ("rounds", "per_round",
                                                         "select_share", "one_way_share")],
                      "selected": ["-".join(c) for c in info["selected"]]}), flush=True)
print("MEDIAN", eps, json.dumps(params),
      {k: round(float(np.median(v)), 3) for k, v in found.items()},
      {k: round(float(np.mean(v)), 3) for k, v in found.items()})
