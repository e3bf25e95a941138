"""A central marginal fit at the epsilon whose noise equals many sites' summed noise.

S sites at epsilon 3 each add independent Gaussian noise, so the coordinator's sums
carry sqrt(S) times one site's noise std: the same as one central release at the
epsilon of a Gaussian with sqrt(S) times the noise multiplier (18 sites: 0.615, 6 sites:
1.116, rdp accountant, delta 1e-5). A central fit at that epsilon on the pooled training
rows of `fedsynth benchmark`'s split is a quick stand-in for the federated study (no
site attribute, as the federated default), used to compare hyperparameters; the
figures of record are the federated `fedsynth benchmark` rows in results.md. Noise from
`DPRandomness.reproducible` (labelled: a benchmark, not a release).

Usage: python emulate_sites.py DATASET EPSILON [JSON_HYPERPARAMETERS] [SEEDS, e.g. 0,1,2,3]
"""

import json
import sys
import warnings
from pathlib import Path

from central_fit import central_fit

from fedsynth.common.validation import validate

warnings.simplefilter("ignore")
WANTED = ("code_frequency_correlation", "codeset_sign_agreement", "cox_hr_sign_agreement",
          "cox_c_index")

ds, eps = sys.argv[1], float(sys.argv[2])
params = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
seeds = [int(s) for s in (sys.argv[4] if len(sys.argv) > 4 else "0").split(",")]
for seed in seeds:
    fit = central_fit(ds, seed, eps, params, Path(f"/tmp/marginal-datasets/{ds}{seed}"))
    data, train, hold, synthetic, model = (fit.data, fit.train, fit.hold, fit.synthetic,
                                           fit.model)
    seconds = fit.seconds
    pairs = data.schema.survival_pairs
    result = validate(train, hold, synthetic, data.schema, seed=seed,
                      areas=["fidelity", "survival"], survival=pairs[0] if pairs else None)
    figures: dict[str, float] = {}
    for m in result.metrics:
        if m.name in WANTED and m.name not in figures:
            figures[m.name] = round(float(m.value), 3)
    print(json.dumps({"dataset": ds, "epsilon": eps, "seed": seed, "params": params,
                      "seconds": round(seconds), **figures,
                      "selected": [",".join(c) for c in model.fit_info["selected"]]}),
          flush=True)
