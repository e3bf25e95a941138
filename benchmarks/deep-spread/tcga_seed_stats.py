"""Per-seed statistics of kept TCGA-BRCA synthetic tables against the real rows (issue 14,
seventh pass): what tells a seed at C-index 0.50 from one at 0.70.

Reads the work folders ``probe.py --keep DIR`` leaves (``DIR/w{seed}/<setting>/synthetic.csv``)
and re-makes each seed's split with the benchmark's ``prepare_seed``. Per seed: event share,
deaths' and censored median time (days), time std ratio, the validator's C-index on the
holdout and on the real training rows (about 120 deaths against 30: a less noisy read of
the same model), the same with the synthetic time shuffled within each event value (what
the event-covariate link alone gives), the correlation of the synthetic Cox coefficients
with the real ones (and the sign agreement of those over 0.3), age's Cox coefficient,
the holdout C-index of age alone (real, synthetic) and of every covariate but age
(synthetic), and the correlation of age with log(1 + time) among deaths and among the
censored (real, synthetic).

Usage: python tcga_seed_stats.py DIR [--setting tvae_federated_eps3] [--seeds 0,1,...]
"""

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from fedsynth.common.validation import survival
from fedsynth.common.validation.context import Context
from fedsynth.common.validation.data import Table
from fedsynth.simulations.benchmark import BenchmarkOptions, prepare_seed

warnings.simplefilter("ignore")
p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("--setting", default="tvae_federated_eps3")
p.add_argument("--seeds", default="")
a = p.parse_args()
root = Path(a.dir)
seeds = ([int(s) for s in a.seeds.split(",")] if a.seeds else
         sorted(int(d.name[1:]) for d in root.glob("w*") if (d / a.setting).exists()))
opts = BenchmarkOptions(dataset="tcga_brca", only=("tvae/federated/eps3",))


def c_on(ctx, tables, key, covs):
    """Holdout C-index of a Cox model (penalty 0.01) fitted on ``tables[key]`` with ``covs``."""
    cox = survival.fit_cox(survival.design(ctx, tables[key], covs),
                           *survival.time_event(ctx, tables[key]))
    return survival._c_index(cox, survival.design(ctx, tables["hold"], covs),
                             *survival.time_event(ctx, tables["hold"]))


def age_time_corr(frame, event):
    """Correlation of age with log(1 + time) among the rows with this event value."""
    f = frame[frame["E"] == event]
    return float(f["age_at_index"].corr(np.log1p(f["T"])))


def c_of(ctx, cox, table):
    covs = list(cox.params_.index) if cox is not None else []
    frame = survival.design(ctx, table, [c for c in ctx.schema.names if c not in ("T", "E")])
    return survival._c_index(cox, frame, *survival.time_event(ctx, table)) if covs else np.nan


rows = []
with tempfile.TemporaryDirectory() as tmp:
    for seed in seeds:
        data = prepare_seed(opts, seed, Path(tmp) / f"s{seed}")
        schema = data.schema
        real = data.train.drop(columns="site")
        syn = pd.read_csv(root / f"w{seed}" / a.setting / "synthetic.csv")
        tables = {k: Table.from_frame(f, schema) for k, f in
                  (("train", real), ("hold", data.holdout.drop(columns="site")), ("syn", syn))}
        shuffled = syn.copy()
        rng = np.random.default_rng(seed)
        for ev in (0, 1):
            idx = np.flatnonzero(shuffled["E"].astype(float).to_numpy() == ev)
            shuffled.loc[idx, "T"] = shuffled.loc[rng.permutation(idx), "T"].to_numpy()
        tables["shuf"] = Table.from_frame(shuffled, schema)
        ctx = Context(schema=schema, train=tables["train"], holdout=tables["hold"],
                      synthetic=tables["syn"], survival=("T", "E"))
        covs = [c for c in schema.names if c not in ("T", "E")]
        cox = {k: survival.fit_cox(survival.design(ctx, tables[k], covs),
                                   *survival.time_event(ctx, tables[k]))
               for k in ("train", "syn", "shuf")}
        r, s = real.astype(float), syn.astype(float)
        common = [c for c in cox["train"].params_.index
                  if cox["syn"] is not None and c in cox["syn"].params_.index]
        coef_r = cox["train"].params_[common]
        coef_s = cox["syn"].params_[common] if common else coef_r * np.nan
        big = coef_r.abs() > 0.3
        row = dict(
            seed=seed,
            ev_real=r["E"].mean(), ev_syn=s["E"].mean(),
            tmed_d_real=r["T"][r["E"] == 1].median(), tmed_d_syn=s["T"][s["E"] == 1].median(),
            tmed_c_real=r["T"][r["E"] == 0].median(), tmed_c_syn=s["T"][s["E"] == 0].median(),
            t_sd_ratio=s["T"].std() / r["T"].std(),
            c_hold=c_of(ctx, cox["syn"], tables["hold"]),
            c_train=c_of(ctx, cox["syn"], tables["train"]),
            c_hold_shuf=c_of(ctx, cox["shuf"], tables["hold"]),
            c_real_hold=c_of(ctx, cox["train"], tables["hold"]),
            coef_corr=float(np.corrcoef(coef_r, coef_s)[0, 1]) if len(common) > 2 else np.nan,
            sign_big=float((np.sign(coef_r[big]) == np.sign(coef_s[big])).mean()),
            age_coef_r=float(cox["train"].params_.get("age_at_index", np.nan)),
            age_coef_s=float(cox["syn"].params_.get("age_at_index", np.nan))
            if cox["syn"] is not None else np.nan,
            c_age_only_r=c_on(ctx, tables, "train", ["age_at_index"]),
            c_age_only_s=c_on(ctx, tables, "syn", ["age_at_index"]),
            c_no_age_s=c_on(ctx, tables, "syn", [c for c in covs if c != "age_at_index"]),
            age_logt_d_r=age_time_corr(r, 1), age_logt_d_s=age_time_corr(s, 1),
            age_logt_c_r=age_time_corr(r, 0), age_logt_c_s=age_time_corr(s, 0),
        )
        rows.append(row)
        print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in row.items()), flush=True)
out = pd.DataFrame(rows)
print(out.round(3).to_string(index=False))
print("correlation with c_hold:")
print(out.drop(columns="seed").corr()["c_hold"].round(2).to_string())
