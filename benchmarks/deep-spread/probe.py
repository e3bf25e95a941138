"""Probe one federated setting with chosen generator hyperparameters, seed by seed, through
the benchmark's own code (`run_setting`: real ServerApp + ClientApp in process, the
validation suite). For trying a change before a full `fedsynth benchmark`.

Usage: python probe.py --dataset tcga_brca --setting tvae/federated/eps3 --seeds 0,1,2 \
          --params '{"condition": "E"}' [--areas survival,fidelity,detection] \
          [--reproducible] [--keep DIR] [--grid-share 0.2]

``--reproducible``: the sites' noise and draws from the seed (``fedsynth benchmark
--reproducible-noise``; not a DP release), so two versions of the code compare seed for
seed. ``--keep DIR``: keep each seed's work folder (real rows: delete it afterwards).
"""

import argparse
import json
import statistics
import tempfile
import warnings
from pathlib import Path

import pandas as pd

from fedsynth.simulations.benchmark import (
    BenchmarkOptions,
    plan_settings,
    prepare_seed,
    run_setting,
)

warnings.simplefilter("ignore")
p = argparse.ArgumentParser()
p.add_argument("--dataset", default="heart_disease")
p.add_argument("--setting", default="tvae/federated/eps3")
p.add_argument("--seeds", default="0,1,2")
p.add_argument("--params", default="{}")
p.add_argument("--areas", default="")
p.add_argument("--reproducible", action="store_true")
p.add_argument("--keep", default="")
p.add_argument("--grid-share", type=float, default=None,
               help="the study's grid-share instead of the default (probing only)")
a = p.parse_args()
if a.grid_share is not None:
    from dataclasses import replace as _replace

    import fedsynth.simulations.benchmark as _bench
    _plain_study = _bench._study
    _bench._study = lambda *x, **k: _replace(_plain_study(*x, **k), grid_share=a.grid_share)
gen = a.setting.split("/")[0]
opts = BenchmarkOptions(dataset=a.dataset, only=(a.setting,),
                        generator_params={gen: json.loads(a.params)},
                        areas=tuple(a.areas.split(",")) if a.areas else None,
                        reproducible_noise=a.reproducible)
keys = ("fidelity", "tstr_auroc", "detection_auroc", "cox_c_index", "wall_s")
rows = []
with tempfile.TemporaryDirectory() as tmp:
    tmp = a.keep or tmp
    for seed in (int(s) for s in a.seeds.split(",")):
        data = prepare_seed(opts, seed, Path(tmp) / f"s{seed}")
        setting = plan_settings(opts, [s.name for s in data.sites])[0]
        row = run_setting(opts, setting, data, seed, Path(tmp) / f"w{seed}")
        syn = pd.read_csv(Path(tmp) / f"w{seed}" / setting.key.replace("/", "_")
                          / "synthetic.csv")
        real = data.train
        for col in [c.name for c in data.schema.columns if c.is_numeric]:
            row[f"sd_{col}"] = float(syn[col].astype(float).std() / real[col].astype(float).std())
        rows.append(row)
        print(f"seed {seed}: " + "  ".join(
            f"{k} {row[k]:.3f}" for k in keys if row.get(k) is not None) + "  sd " + " ".join(
            f"{row[k]:.2f}" for k in row if k.startswith("sd_")), flush=True)
print("median: " + "  ".join(
    f"{k} {statistics.median(r[k] for r in rows):.3f}" for k in keys
    if all(r.get(k) is not None for r in rows)))
