"""The C-index convention on real TCGA-BRCA rows: lifelines' concordance_index wants
scores that are high for long survival, so the survival area passes -partial hazard.
Cross-checked with CoxPHFitter.score. Usage: python tcga_cindex_sign.py."""

import warnings
from pathlib import Path

from lifelines import CoxPHFitter
from lifelines.utils import concordance_index

from fedsynth.simulations.benchmark import BenchmarkOptions, prepare_seed

warnings.simplefilter("ignore")
for seed in (0, 1, 2):
    data = prepare_seed(BenchmarkOptions(dataset="tcga_brca"), seed,
                        Path(f"/tmp/marginal-datasets/tc{seed}"))
    tr = data.train.drop(columns="site").astype(float)
    ho = data.holdout.drop(columns="site").astype(float)
    keep = [c for c in tr.columns if tr[c].std() > 0]
    cox = CoxPHFitter(penalizer=0.01).fit(tr[keep], "T", "E")
    risk = cox.predict_partial_hazard(ho[keep]).to_numpy()
    minus = concordance_index(ho["T"], -risk, ho["E"])
    plus = concordance_index(ho["T"], risk, ho["E"])
    own = cox.score(ho[keep], scoring_method="concordance_index")
    print(f"seed {seed}: concordance_index(T, -hazard, E) {minus:.3f}  "
          f"(T, +hazard, E) {plus:.3f}  CoxPHFitter.score {own:.3f}")
