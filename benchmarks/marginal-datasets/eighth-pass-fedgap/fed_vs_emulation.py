"""Federated study against its central emulation, scored alike, per seed.

For each seed of `fedsynth benchmark`'s split: (a) the federated setting (real
coordinator and site code, in process, in clear, epsilon EPS per site, SECRET noise:
the figure of record's mechanism); (b) a central fit on the same pooled training rows
at the epsilon whose one noise equals the sites' summed noise (solved from
``plan.budget_noise``, not rounded), reproducible noise (labelled: a benchmark, not a
release); (c) optionally (ARM 'fedcsv') the same central emulation on the rows read back
from the sites' files, as the sites read them (``read_table``), to test the data path.
Both are scored by `fedsynth benchmark`'s own ``score`` (the validation suite, same
holdout, same Cox rule). One JSON line per seed and a MEDIAN line per figure.

Usage: python fed_vs_emulation.py DATASET EPS SEEDS [JSON_PARAMS]
"""

import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import brentq

from fedsynth.common.generators.marginal import MarginalGenerator
from fedsynth.common.generators.marginal.plan import budget_noise
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.table import read_table
from fedsynth.simulations.benchmark import (
    BenchmarkOptions,
    Setting,
    prepare_seed,
    run_federated,
    score,
)

warnings.simplefilter("ignore")
WANTED = ("cox_c_index", "fidelity", "tstr_auroc", "detection_auroc")
ds, eps = sys.argv[1], float(sys.argv[2])
seeds = [int(s) for s in sys.argv[3].split(",")]
params = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
opts = BenchmarkOptions(dataset=ds, generators=("marginal",), epsilons=(eps,),
                        generator_params={"marginal": params},
                        areas=("fidelity", "utility", "survival", "detection"))
found: dict[str, list[float]] = {}


def figures(data, produced, seed) -> dict[str, float]:
    row, _ = score(opts, data, produced, seed)
    return {k: round(float(row[k]), 3) for k in WANTED
            if row.get(k) is not None and np.isfinite(row[k])}


for seed in seeds:
    work = Path(f"/tmp/s8fedgap/run-{ds}{seed}")
    shutil.rmtree(work, ignore_errors=True)  # the sites' ledgers of an earlier run
    data = prepare_seed(opts, seed, work / "split")
    n_sites = len(data.sites)
    target = math.sqrt(n_sites) * budget_noise(eps, opts.delta)
    eps_c = brentq(lambda e, t=target: budget_noise(e, opts.delta) - t,
                   eps / (2 * math.sqrt(n_sites)), eps)
    start = time.time()
    fed = run_federated(opts, Setting("federated", "marginal", dp=True, epsilon=eps), data,
                        seed, work / "fed")
    row: dict[str, float] = {f"fed_{k}": v for k, v in figures(data, fed, seed).items()}
    train = data.train.drop(columns="site")
    from_files = pd.concat([read_table(Path(s.data_path), data.schema) for s in data.sites],
                           ignore_index=True)
    for arm, rows in (("emu", train), ("emufiles", from_files)):
        model = MarginalGenerator(data.schema, seed=seed, **params)
        model.fit(rows, epsilon=eps_c, delta=opts.delta,
                  randomness=DPRandomness.reproducible(seed, "central"))
        syn = model.sample(len(train), seed=seed + 1)
        row.update({f"{arm}_{k}": v for k, v in
                    figures(data, replace(fed, synthetic=syn), seed).items()})
    for k, v in row.items():
        found.setdefault(k, []).append(v)
    print(json.dumps({"dataset": ds, "epsilon_site": eps, "sites": n_sites,
                      "epsilon_emulation": round(eps_c, 4), "seed": seed,
                      "seconds": round(time.time() - start), **row}), flush=True)
    shutil.rmtree(work, ignore_errors=True)  # real rows: not left behind
print("MEDIAN", ds, eps, json.dumps(params),
      json.dumps({k: round(float(np.median(v)), 3) for k, v in found.items()}))
