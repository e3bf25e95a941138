"""What a synthetic table must keep for the C-index: the validation suite's survival area
on real training rows with one link cut at a time. Usage: python tcga_cindex_variants.py."""

import warnings
from pathlib import Path

import numpy as np

from fedsynth.common.validation import validate
from fedsynth.simulations.benchmark import BenchmarkOptions, prepare_seed

warnings.simplefilter("ignore")
data = prepare_seed(BenchmarkOptions(dataset="tcga_brca"), 0, Path("/tmp/marginal-datasets/tc0"))
train, hold = data.train.drop(columns="site"), data.holdout.drop(columns="site")
rng = np.random.default_rng(0)
t_within_e = train["T"].to_numpy().copy()
for e in (0, 1):
    idx = np.flatnonzero(train["E"].to_numpy() == e)
    t_within_e[idx] = rng.permutation(t_within_e[idx])
pair = train[["T", "E"]].sample(frac=1, random_state=0).to_numpy()
variants = {
    "real train rows": train,
    "T shuffled (T independent of all)": train.assign(T=rng.permutation(train["T"].to_numpy())),
    "E shuffled (E independent of all)": train.assign(E=rng.permutation(train["E"].to_numpy())),
    "(T,E) shuffled together": train.assign(T=pair[:, 0], E=pair[:, 1]),
    "T shuffled within E": train.assign(T=t_within_e),
}
for name, table in variants.items():
    res = validate(train, hold, table, data.schema, seed=0, areas=["survival"],
                   survival=("T", "E"))
    m = {x.name: x for x in res.metrics}
    print(f"{name:40s} C-index {m['cox_c_index'].value:.3f} "
          f"(real {m['cox_c_index'].reference:.3f}) "
          f"HR sign {m['cox_hr_sign_agreement'].value:.2f}")
t, e = train["T"].astype(float), train["E"].astype(float)
print("events", int(e.sum()), "of", len(train), "; median T event / censored",
      t[e == 1].median(), t[e == 0].median())
