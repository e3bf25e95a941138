"""Heart disease, central fits at the epsilon whose noise equals 4 sites' summed noise
at 3 each (1.393, rdp, delta 1e-5; emulate_sites.py explains), on the pooled training
rows of `fedsynth benchmark`'s split of each seed: fidelity, TSTR and each numeric
column's 1-KS against the holdout. Noise from `DPRandomness.reproducible` (a benchmark,
not a release). Usage: python heart_emulate.py EPSILON|none JSON_PARAMS SEEDS"""

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from central_fit import central_fit

from fedsynth.common.validation import validate

warnings.simplefilter("ignore")
eps = None if sys.argv[1] == "none" else float(sys.argv[1])
params = json.loads(sys.argv[2])
seeds = [int(s) for s in sys.argv[3].split(",")]
found: dict[str, list[float]] = {}
for seed in seeds:
    start = time.time()
    fit = central_fit("heart_disease", seed, eps, params,
                      Path(f"/tmp/marginal-datasets/heart{seed}"))
    data, train, hold, synthetic = fit.data, fit.train, fit.hold, fit.synthetic
    res = validate(train, hold, synthetic, data.schema, seed=seed,
                   areas=["fidelity", "utility"])
    head = res.headline()
    row = {k: round(float(head[k]), 3) for k in ("fidelity", "tstr_auroc")}
    row.update({m.columns[0]: round(1 - m.value, 3) for m in res.metrics if m.name == "ks"})
    for k, v in row.items():
        found.setdefault(k, []).append(v)
    print(json.dumps({"seed": seed, "seconds": round(time.time() - start), **row}), flush=True)
print("MEDIAN", eps, json.dumps(params),
      {k: round(float(np.median(v)), 3) for k, v in found.items()})
