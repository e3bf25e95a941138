"""How much of TCGA-BRCA's C-index spread is the evaluation itself (issue 14, seventh pass).

For each seed's split (the benchmark's own ``prepare_seed``): holdout rows and deaths,
the C-index on the holdout of a Cox model fitted on the real training rows (the
validator's own ``design`` / ``fit_cox`` / ``_c_index``), and the bootstrap standard
deviation of that C-index over resampled holdouts (the holdout's own noise, with the
model fixed). No generator runs; real rows only, in a temporary folder.

Usage: python tcga_eval_noise.py [--seeds 0,1,...] [--boot 200]
"""

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np

from fedsynth.common.schema import Schema
from fedsynth.common.validation import survival
from fedsynth.common.validation.context import Context
from fedsynth.common.validation.data import Table
from fedsynth.simulations.benchmark import BenchmarkOptions, prepare_seed

warnings.simplefilter("ignore")
p = argparse.ArgumentParser()
p.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8")
p.add_argument("--boot", type=int, default=200)
a = p.parse_args()
opts = BenchmarkOptions(dataset="tcga_brca", only=("tvae/federated/eps3",))
rows = []
with tempfile.TemporaryDirectory() as tmp:
    for seed in (int(s) for s in a.seeds.split(",")):
        data = prepare_seed(opts, seed, Path(tmp) / f"s{seed}")
        schema: Schema = data.schema
        train = Table.from_frame(data.train.drop(columns="site"), schema)
        hold = Table.from_frame(data.holdout.drop(columns="site"), schema)
        ctx = Context(schema=schema, train=train, holdout=hold, synthetic=train,
                      survival=("T", "E"))
        covs = [c for c in schema.names if c not in ("T", "E")]
        f_tr, f_ho = survival.design(ctx, train, covs), survival.design(ctx, hold, covs)
        te_tr, te_ho = survival.time_event(ctx, train), survival.time_event(ctx, hold)
        cox = survival.fit_cox(f_tr, *te_tr)
        c = survival._c_index(cox, f_ho, *te_ho)
        rng = np.random.default_rng(seed)
        boot = []
        n = len(te_ho[0])
        for _ in range(a.boot):
            i = rng.integers(0, n, n)
            boot.append(survival._c_index(cox, f_ho.iloc[i].reset_index(drop=True),
                                          te_ho[0][i], te_ho[1][i]))
        row = dict(seed=seed, hold_rows=n, hold_deaths=int(np.nansum(te_ho[1])),
                   train_deaths=int(np.nansum(te_tr[1])), c_real=c,
                   boot_sd=float(np.nanstd(boot)))
        rows.append(row)
        print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in row.items()), flush=True)
print(f"median real C-index {statistics.median(r['c_real'] for r in rows):.3f}, "
      f"median bootstrap sd {statistics.median(r['boot_sd'] for r in rows):.3f}")
