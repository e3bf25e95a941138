"""Federated study against its central emulation, one seed: do they run the same plan?

Runs `fedsynth benchmark`'s federated setting (real coordinator and site code, in
process, epsilon EPS per site, in clear) and a central fit on the same pooled training
rows at the epsilon whose single noise equals the sites' summed noise
(``plan.summed_noise``, solved here, not rounded), then prints what each ran: the plan,
per-release noise (sites' std x sqrt(S) against the central std), the binning cut from
the fine release, the rounds' cliques, the links and pairs the model reads, the noisy
total, and the Cox C-index / fidelity. Both use reproducible noise (labelled: a
benchmark, not a release), so this compares the plan, not one draw against another.

Usage: python compare_plan.py DATASET EPS SEED [JSON_PARAMS]
"""

import json
import math
import shutil
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.optimize import brentq

from fedsynth.common.generators.base import Generator
from fedsynth.common.generators.marginal import MarginalGenerator
from fedsynth.common.generators.marginal.plan import MarginalPlan, budget_noise, calibrate
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.simulations.benchmark import (
    BenchmarkOptions,
    Setting,
    prepare_seed,
    run_federated,
    score,
)

warnings.simplefilter("ignore")
ds, eps, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
params = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
opts = BenchmarkOptions(dataset=ds, generators=("marginal",), epsilons=(eps,),
                        reproducible_noise=True, generator_params={"marginal": params},
                        areas=("fidelity", "utility", "survival"))
work = Path(f"/tmp/s8fedgap/{ds}{seed}")
shutil.rmtree(work, ignore_errors=True)  # the sites' ledgers of an earlier run
data = prepare_seed(opts, seed, work / "split")
n_sites = len(data.sites)
target = math.sqrt(n_sites) * budget_noise(eps, opts.delta)
eps_c = brentq(lambda e: budget_noise(e, opts.delta) - target, eps / (2 * math.sqrt(n_sites)), eps)
print(f"{ds} seed {seed}: {n_sites} sites at epsilon {eps}; central emulation at {eps_c:.4f}")

fed = run_federated(opts, Setting("federated", "marginal", dp=True, epsilon=eps), data,
                    seed, work / "fed")
full = json.loads((work / "fed" / "summary.json").read_text())
summary = full["marginal"]
answers = [e["status"] for r in full["rounds"] for e in r["sites"]]
print(f"- federated releases: {len(full['rounds'])} requests, {len(answers)} site replies, "
      f"not released: {sum(a != 'trained' for a in answers)}; epsilon spent per site: "
      f"{ {k: round(v['epsilon'], 4) for k, v in full['sites'].items()} }")
fed_model = Generator.load(work / "fed" / "model.fsg")

train = data.train.drop(columns="site")
cen = MarginalGenerator(data.schema, seed=seed, **params)
cen.fit(train, epsilon=eps_c, delta=opts.delta,
        randomness=DPRandomness.reproducible(seed, "central"))
info = cen.fit_info


def show(name, a, b):
    same = a == b
    print(f"- {name}: {'SAME' if same else 'DIFFERENT'}")
    if not same:
        print(f"    federated: {a}\n    central:   {b}")


show("plan", summary["plan"], info["plan"])
plan = MarginalPlan.from_dict(summary["plan"])
site = calibrate(plan, eps, opts.delta)  # what each site calibrated (client/measure.py)
for k, c in info["noise"].items():
    s = getattr(site, k)
    if np.isfinite(c):
        print(f"- noise {k}: site {s:.3f} x sqrt({n_sites}) = {s * math.sqrt(n_sites):.3f}; "
              f"central {c:.3f}")
print("- sites' reported last sigma:", {n: round(m["sigma"], 3)
                                        for n, m in summary["noise"].items()})
show("selected cliques", summary["selected"], info["selected"])
show("links in model", summary["links_in_model"], info["links_in_model"])
show("pairs in model", summary["pairs_in_model"], info["pairs_in_model"])
show("site attribute", summary["site_attribute"], [])
fb, cb = json.loads(fed_model.binning or "{}"), json.loads(cen.binning or "{}")
show("binning keys", sorted(fb), sorted(cb))
print("  fed binning:", json.dumps(fb)[:400])
print("  cen binning:", json.dumps(cb)[:400])
fed_syn = fed.synthetic
cen_syn = cen.sample(len(train), seed=seed + 1)
for name, syn in (("federated", fed_syn), ("central", cen_syn)):
    prod = replace(fed, synthetic=syn)
    row, _ = score(opts, data, prod, seed)
    print(f"- {name}: " + json.dumps({k: round(float(v), 3) for k, v in row.items()
                                      if v is not None and np.isfinite(v)
                                      and any(w in k for w in ("c_index", "fidelity",
                                                                "tstr"))}))

shutil.rmtree(work, ignore_errors=True)  # real rows: not left behind
