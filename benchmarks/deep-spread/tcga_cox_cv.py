"""The validator's Cox C-index on kept synthetic tables, with the penalty fixed at
``COX_PENALIZER`` (before the seventh pass) and chosen by cross-validation on each
training table (``survival.choose_penalizer``, now), for the synthetic rows and for the
real training rows (the reference). Issue 14, seventh pass.

Reads ``DIR/w{seed}/<setting>/synthetic.csv`` (``probe.py --keep DIR``) or
``DIR/seed-{seed}/<setting>/synthetic.csv`` (a benchmark's ``--keep-work`` folder,
``OUT/work``) and re-makes each seed's split. ``--jsonl FILE --tag TAG`` appends one line
with the per-seed figures and their medians (``tcga_runs.sh``).

Usage: python tcga_cox_cv.py DIR [--setting tvae_federated_eps3] [--dataset tcga_brca]
"""

import argparse
import json
import re
import statistics
import tempfile
import warnings
from pathlib import Path

import pandas as pd

from fedsynth.common.validation import survival
from fedsynth.common.validation.context import Context
from fedsynth.common.validation.data import Table
from fedsynth.simulations.benchmark import BenchmarkOptions, prepare_seed

warnings.simplefilter("ignore")
p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("--setting", default="tvae_federated_eps3")
p.add_argument("--dataset", default="tcga_brca")
p.add_argument("--jsonl", default="")
p.add_argument("--tag", default="")
a = p.parse_args()
root = Path(a.dir)
found = {int(m.group(1)): d for d in root.iterdir()
         if (m := re.fullmatch(r"(?:w|seed-)(\d+)", d.name)) and (d / a.setting).exists()}
seeds = sorted(found)
opts = BenchmarkOptions(dataset=a.dataset)
rows = []
with tempfile.TemporaryDirectory() as tmp:
    for seed in seeds:
        data = prepare_seed(opts, seed, Path(tmp) / f"s{seed}")
        schema = data.schema
        tables = {
            "train": Table.from_frame(data.train.drop(columns="site"), schema),
            "holdout": Table.from_frame(data.holdout.drop(columns="site"), schema),
            "synthetic": Table.from_frame(
                pd.read_csv(found[seed] / a.setting / "synthetic.csv"), schema),
        }
        pair = next(iter(schema.survival_pairs))
        ctx = Context(schema=schema, survival=pair, seed=seed, **tables)
        covs = [c for c in schema.names if c not in pair]
        frames = {k: survival.design(ctx, t, covs) for k, t in tables.items()}
        te = {k: survival.time_event(ctx, t) for k, t in tables.items()}
        fixed = {k: survival._c_index(survival.fit_cox(frames[k], *te[k]), frames["holdout"],
                                      *te["holdout"]) for k in ("synthetic", "train")}
        m = next(v for v in survival.run(ctx) if v.name == "cox_c_index")
        row = dict(seed=seed, syn_fixed=fixed["synthetic"], syn_cv=m.value,
                   pen_syn=m.details["penalizer"], real_fixed=fixed["train"],
                   real_cv=m.reference, pen_real=m.details["penalizer_ref"])
        rows.append(row)
        print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in row.items()), flush=True)
medians = {k: round(statistics.median(r[k] for r in rows), 4)
           for k in ("syn_fixed", "syn_cv", "real_fixed", "real_cv")}
print("medians: " + "  ".join(f"{k} {v:.3f}" for k, v in medians.items()))
if a.jsonl:
    with open(a.jsonl, "a") as f:
        f.write(json.dumps({"tag": a.tag, "setting": a.setting, "medians": medians,
                            "seeds": [{k: (round(v, 4) if isinstance(v, float) else v)
                                       for k, v in r.items()} for r in rows]}) + "\n")
