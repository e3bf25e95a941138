"""Which survival links a marginal model of TCGA-BRCA must measure (issue 13, fourth pass).

A central fit on the pooled training rows of `fedsynth benchmark`'s split of each seed,
at EPSILON ('none': no DP, the method's ceiling; 1.116: the noise of 6 sites at 3 each,
see emulate_sites.py), with the workload order replaced by MODE, scored by the
validation suite's Cox C-index on the real holdout. Noise from
`DPRandomness.reproducible` (a benchmark, not a release).

MODE: default (engine.workload_order); surv (every survival pair before any other);
event (the (T, E) pair, then every covariate with E, then with T); oracle (the covariates
of the real Cox model's 8 smallest p-values first: NOT a DP choice, it reads the rows,
only to bound what a perfect public choice could give); tri / oracletri (triples
(covariate, T, E) instead of pairs, in the surv / oracle order).

Usage: python tcga_survival_probe.py EPSILON JSON_PARAMS SEEDS [MODE]
The fourth pass ran it at the defaults of the time: JSON_PARAMS '{"fine_bins": 64,
"decode_threshold": 0}' reproduces them (plus "rounds" where results.md says).
"""

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from central_fit import central_fit

from fedsynth.common.generators.marginal import engine
from fedsynth.common.validation import validate

warnings.simplefilter("ignore")
eps = None if sys.argv[1] == "none" else float(sys.argv[1])
params = json.loads(sys.argv[2])
seeds = [int(s) for s in sys.argv[3].split(",")]
mode = sys.argv[4] if len(sys.argv) > 4 else "default"
ORACLE = ["tumor_stage_stage i", "age_at_index", "treatment_or_therapy_yes",
          "treatment_or_therapy_not reported", "ajcc_pathologic_n_N0 (i-)",
          "ajcc_staging_system_edition_7th", "ajcc_staging_system_edition_6th",
          "ajcc_pathologic_n_N1a"]
SURVIVAL = ("T", "E")
public_order, public_candidates = engine.workload_order, engine.candidates


def order(every, spread, anchors, codes, prognostic=()):  # noqa: ANN001, ANN201
    base = public_order(every, spread, anchors, codes, prognostic)
    held = [i for i in base if set(every[i]) & set(anchors)]
    if mode in ("surv", "tri"):
        return held + [i for i in base if i not in set(held)]
    if mode in ("oracle", "oracletri"):
        def key(i: int) -> tuple[int, bool]:
            own = [a for a in every[i] if a not in anchors]
            if not set(every[i]) & set(anchors):
                return (9, False)
            if not own:
                return (-1, False)
            return (ORACLE.index(own[0]) if own[0] in ORACLE else 8,
                    "T" in every[i] and len(every[i]) == 2)
        return sorted(base, key=key)
    if mode == "event":
        pairs = [i for i in base if "E" in every[i] and len(every[i]) == 2]
        first = [i for i in pairs if "T" in every[i]] + [i for i in pairs if "T" not in every[i]]
        return first + [i for i in base if i not in set(first)]
    return base


def candidates(names, sizes, measured, max_way, max_clique_cells):  # noqa: ANN001, ANN201
    out = public_candidates(names, sizes, measured, max_way, max_clique_cells)
    if "tri" not in mode:
        return out
    covered = [set(c) for c in measured if len(c) > 1]
    triples = [(a, *SURVIVAL) for a in names if a not in SURVIVAL]
    triples = [c for c in triples if not any(set(c) <= m for m in covered)]
    return triples + [c for c in out if not set(c) & set(SURVIVAL)]


engine.workload_order, engine.candidates = order, candidates
found = []
for seed in seeds:
    start = time.time()
    fit = central_fit("tcga_brca", seed, eps, params,
                      Path(f"/tmp/marginal-datasets/tcga_brca{seed}"))
    data, train, hold, synthetic, model = (fit.data, fit.train, fit.hold, fit.synthetic,
                                           fit.model)
    res = validate(train, hold, synthetic, data.schema, seed=seed, areas=["survival"],
                   survival=SURVIVAL)
    c = {m.name: m for m in res.metrics}["cox_c_index"]
    found.append(c.value)
    print(json.dumps({"epsilon": eps, "seed": seed, "mode": mode, "params": params,
                      "seconds": round(time.time() - start), "c_index": round(c.value, 3),
                      "real": round(c.reference, 3),
                      "selected": [",".join(x) for x in model.fit_info["selected"]]}),
          flush=True)
print("MEDIAN", mode, eps, json.dumps(params), round(float(np.median(found)), 3))
