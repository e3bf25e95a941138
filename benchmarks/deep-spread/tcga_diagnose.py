"""What a TCGA-BRCA synthetic table keeps of the survival structure, next to the real
training rows: event share, median time by event, the Cox coefficients of the strongest
covariates, and the holdout C-index of a Cox model fitted on each. One seed, one setting.

Usage: python tcga_diagnose.py --setting tvae/federated/eps3 --seed 0 --params '{...}'
"""

import argparse
import json
import tempfile
import warnings
from pathlib import Path

from lifelines import CoxPHFitter
from lifelines.utils import concordance_index

from fedsynth.simulations.benchmark import (
    BenchmarkOptions,
    plan_settings,
    prepare_seed,
    run_central,
    run_federated,
)

warnings.simplefilter("ignore")
p = argparse.ArgumentParser()
p.add_argument("--setting", default="tvae/federated/eps3")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--params", default="{}")
a = p.parse_args()
gen = a.setting.split("/")[0]
opts = BenchmarkOptions(dataset="tcga_brca", only=(a.setting,),
                        generator_params={gen: json.loads(a.params)})


def cox(frame):
    keep = [c for c in frame.columns if frame[c].std() > 0]
    return CoxPHFitter(penalizer=0.01).fit(frame[keep], "T", "E")


with tempfile.TemporaryDirectory() as tmp:
    data = prepare_seed(opts, a.seed, Path(tmp) / "d")
    setting = plan_settings(opts, [s.name for s in data.sites])[0]
    run = run_federated if setting.kind == "federated" else run_central
    extra = (Path(tmp) / "w",) if setting.kind == "federated" else ()
    syn = run(opts, setting, data, a.seed, *extra).synthetic.astype(float)
real = data.train.drop(columns="site").astype(float)
hold = data.holdout.drop(columns="site").astype(float)
for name, t in (("real", real), ("synthetic", syn)):
    e = t["E"] == 1
    print(f"{name:9s} rows {len(t)} event share {e.mean():.3f} median T event "
          f"{t['T'][e].median():.0f} censored {t['T'][~e].median():.0f}  T sd {t['T'].std():.0f}")
cr, cs = cox(real), cox(syn)
for name, m in (("real", cr), ("synthetic", cs)):
    risk = m.predict_partial_hazard(hold[m.params_.index]).to_numpy()
    print(f"C-index on holdout, Cox fitted on {name}: "
          f"{concordance_index(hold['T'], -risk, hold['E']):.3f}")
top = ["age_at_index"] + list(cr.params_.abs().sort_values(ascending=False).index[:10])
print(f"{'covariate':45s} {'coef real':>9s} {'coef syn':>9s} {'corr(x,E) r/s':>14s} "
      f"{'corr(x,T) r/s':>14s}")
for c in top:
    cs_c = cs.params_.get(c, float("nan"))
    print(f"{c[:45]:45s} {cr.params_[c]:9.2f} {cs_c:9.2f} "
          f"{real[c].corr(real['E']):7.2f}{syn[c].corr(syn['E']):7.2f} "
          f"{real[c].corr(real['T']):7.2f}{syn[c].corr(syn['T']):7.2f}")
print("corr(T,E) real/syn", round(real["T"].corr(real["E"]), 3), round(syn["T"].corr(syn["E"]), 3))
