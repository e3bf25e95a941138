"""What limits the marginal generator's Cox C-index on TCGA-BRCA (issue 13, eighth pass).

A central fit on the pooled training rows of `fedsynth benchmark`'s split of each seed,
at EPSILON ('none': no DP; 1.116: the summed noise of 6 regions at epsilon 3 each, the
federated study's; 3: the central mode), with the model's parameters PARAMS (JSON) and,
optionally, CLIQUES: the rounds measure exactly these cliques (JSON list of lists, or a
name from STRUCTURES) in one round instead of the public workload. Noise from
`DPRandomness.reproducible` (a benchmark, not a release). Scored as the validation suite
does (Cox with the ridge penalty chosen by 5-fold CV on its own training table), on the
full synthetic table and with covariate groups left out of the synthetic Cox model.

PARAMS may set "prognostic" to "DOMAIN" (the list the bundled schema now carries) or
"LIST8" (a hand list holding 4 covariates the real Cox model found significant: a bound,
not a DP choice). Which list '{}' means depends on the schema at the time of the run
(probes.jsonl's "survival_links" says).

Each seed's split (real rows) is written under /tmp/s8t/split{seed}: delete it after.

Usage: python tcga_probe.py EPSILON PARAMS SEEDS [CLIQUES]
One JSON line per seed, then a MEDIAN line.
"""

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from fedsynth.common.bundled import bundled_schema
from fedsynth.common.generators.marginal import engine
from fedsynth.common.validation import survival
from fedsynth.common.validation.context import Context
from fedsynth.common.validation.data import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from central_fit import central_fit  # noqa: E402  (this folder's shared central fit)

warnings.simplefilter("ignore")
AGE = "age_at_index"
GROUPS = {
    "age": lambda c: c == AGE,
    "stage": lambda c: "stage" in c,
    "nodes": lambda c: c.startswith("ajcc_pathologic_n_"),
    "treatment": lambda c: c.startswith("treatment"),
    "edition": lambda c: c.startswith("ajcc_staging_system"),
}
PROGNOSTIC = [AGE, "tumor_stage_stage i", "treatment_or_therapy_yes",
              "treatment_or_therapy_not reported", "ajcc_pathologic_n_N0 (i-)",
              "ajcc_pathologic_stage_Stage IIIC", "ajcc_pathologic_n_N2a",
              "ajcc_pathologic_t_T3"]
# every indicator of the clinical groups breast-cancer staging names (age, AJCC stage,
# nodes, tumour size, metastasis) and treatment: domain knowledge, not read from rows
DOMAIN = [AGE] + [c for c in bundled_schema("tcga_brca").names
                  if any(k in c for k in ("stage", "_n_", "_t_", "_m_", "treatment"))
                  and "system" not in c]
STRUCTURES = {
    "domainTE": [["T", "E"]] + [x for c in DOMAIN for x in ([c, "E"], [c, "T"])],
    "domainE": [["T", "E"], [AGE, "T"]] + [[c, "E"] for c in DOMAIN],
    "pairsE": [["T", "E"]] + [[c, "E"] for c in PROGNOSTIC],
    "pairsTE": [["T", "E"]] + [x for c in PROGNOSTIC for x in ([c, "E"], [c, "T"])],
    "triples": [["T", "E"]] + [[c, "T", "E"] for c in PROGNOSTIC],
    "triples4": [["T", "E"]] + [[c, "T", "E"] for c in PROGNOSTIC[:4]],
}


def c_index(ctx: Context, table: str, covs: list[str]) -> float:
    frames = {k: survival.design(ctx, ctx.table(k), covs) for k in (table, "holdout")}
    te = {k: survival.time_event(ctx, ctx.table(k)) for k in frames}
    pen = survival.choose_penalizer(frames[table], *te[table], ctx.rng("cox-cv"))
    cox = survival.fit_cox(frames[table], *te[table], penalizer=pen)
    return survival._c_index(cox, frames["holdout"], *te["holdout"])


def main() -> None:
    eps = None if sys.argv[1] == "none" else float(sys.argv[1])
    params = json.loads(sys.argv[2])
    named = {"DOMAIN": DOMAIN, "LIST8": PROGNOSTIC}
    if isinstance(params.get("prognostic"), str):  # a list named here
        params["prognostic"] = named[params["prognostic"]]
    seeds = [int(s) for s in sys.argv[3].split(",")]
    cliques = None
    if len(sys.argv) > 4:
        raw = sys.argv[4]
        cliques = [tuple(c) for c in (STRUCTURES[raw] if raw in STRUCTURES else json.loads(raw))]
        params = {**params, "rounds": 1, "per_round": len(cliques), "workload": True}
        engine.candidates = lambda names, sizes, measured, *a: [  # noqa: E731
            c for c in cliques if c not in {tuple(m) for m in measured}]
        engine.workload_order = lambda every, *a: list(range(len(every)))  # noqa: E731
    found: dict[str, list[float]] = {}
    for seed in seeds:
        start = time.time()
        fit = central_fit("tcga_brca", seed, eps, params, Path(f"/tmp/s8t/split{seed}"))
        data, train, hold, syn, model = fit.data, fit.train, fit.hold, fit.synthetic, fit.model
        schema = data.schema
        ctx = Context(schema=schema, survival=("T", "E"), seed=seed,
                      train=Table.from_frame(train, schema),
                      holdout=Table.from_frame(hold, schema),
                      synthetic=Table.from_frame(syn, schema))
        covs = [c for c in schema.names if c not in ("T", "E")]
        row = {"syn": c_index(ctx, "synthetic", covs), "real": c_index(ctx, "train", covs)}
        for g, f in GROUPS.items():
            row[f"syn-{g}"] = c_index(ctx, "synthetic", [c for c in covs if not f(c)])
        row["syn-only-prog"] = c_index(ctx, "synthetic", PROGNOSTIC)
        row["real-only-prog"] = c_index(ctx, "train", PROGNOSTIC)
        for k, v in row.items():
            found.setdefault(k, []).append(v)
        print(json.dumps({"epsilon": eps, "seed": seed, "params": sys.argv[2],
                          "cliques": sys.argv[4] if len(sys.argv) > 4 else "default",
                          "seconds": round(time.time() - start),
                          **{k: round(v, 3) for k, v in row.items()},
                          "noise": {k: round(v, 2) for k, v in model.fit_info["noise"].items()
                                    if np.isfinite(v)},
                          "selected": [",".join(x) for x in model.fit_info["selected"]]}),
              flush=True)
    print("MEDIAN", sys.argv[1], sys.argv[2], sys.argv[4] if len(sys.argv) > 4 else
          "default", json.dumps({k: round(float(np.median(v)), 3) for k, v in found.items()}))


if __name__ == "__main__":
    main()
