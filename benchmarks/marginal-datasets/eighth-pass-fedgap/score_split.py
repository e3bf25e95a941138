"""The one plan difference a scored study has: what its selection score adds up.

A central fit scores a candidate marginal by ``|| M(D) - n p ||_1`` on the pooled rows.
A federated study can only add what each site releases: ``sum_s || M(D_s) - n_s p ||_1``
(an L1 norm of a sum is not a sum of L1 norms), which is never smaller and also counts
each site's case mix and sampling scatter around the pooled model. This runs the
central emulation (pooled rows, the epsilon whose noise equals S sites' summed noise,
same plan, same reproducible noise stream: labelled, a benchmark, not a release) twice
per seed: scoring as a central holder ('pooled') and as the sites' sum ('per-site',
each site normalised by its own row count; the sites' noisy counts' scatter left out),
with the summed score noise of the same std. Scored by `fedsynth benchmark`'s ``score``.

Usage: python score_split.py DATASET EPS SEEDS [JSON_PARAMS]
"""

import json
import math
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import brentq

from fedsynth.common.generators.marginal import MarginalGenerator
from fedsynth.common.generators.marginal.measure import noisy_scores
from fedsynth.common.generators.marginal.model import LocalMeasurer
from fedsynth.common.generators.marginal.outcome_split import outcome_split
from fedsynth.common.generators.marginal.plan import budget_noise, calibrate, summed_noise
from fedsynth.common.privacy.accountant import PrivacyLedger
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.simulations.benchmark import BenchmarkOptions, Produced, prepare_seed, score

warnings.simplefilter("ignore")
WANTED = ("fidelity", "tstr_auroc", "detection_auroc", "cox_c_index")


class PerSiteScores(LocalMeasurer):
    """The pooled holder, but its scores are the sites' summed per-site L1 errors."""

    def __init__(self, data: pd.DataFrame, sites: np.ndarray, *args, **kw) -> None:
        super().__init__(data, *args, **kw)
        self.site_of = sites

    def score(self, cliques, model_marginals):
        if self.ledger is not None:
            self.ledger.record(self.noise.score, 1.0, len(cliques))
        zero = _NoNoise()
        total = np.zeros(len(cliques))
        for s in np.unique(self.site_of):
            rows = self.cells[self.site_of == s]
            total += noisy_scores(rows, self.names, self.sizes, cliques, model_marginals[""],
                                  float(len(rows)), 0.0, zero)
        noisy = self.randomness.release("measurement").add(total, self.noise.score,
                                                            integral=False)
        return noisy, self.noise.score


class _NoNoise:
    def add(self, values, std, *, integral):
        return np.asarray(values, dtype=float)


def fit(schema, train: pd.DataFrame, eps: float, delta: float, seed: int, per_site: bool,
        params: dict) -> MarginalGenerator:
    model = MarginalGenerator(schema, seed=seed, **params)
    plan = model.plan(noise=summed_noise([(eps, delta)]))
    noise = calibrate(plan, eps, delta)
    rows = train.drop(columns="site")
    args = (model.discretizer, noise, PrivacyLedger("rdp"),
            DPRandomness.reproducible(seed, "central"))
    kw = dict(code_bound=plan.code_bound, pair_bound=plan.pair_bound,
              link_bound=plan.link_bound, split=outcome_split(schema, model.discretizer))
    holder = (PerSiteScores(rows, train["site"].to_numpy(), *args, **kw) if per_site
              else LocalMeasurer(rows, *args, **kw))
    result = model.run_engine(plan, holder, sites=[])
    model.fit_info = {"plan": plan.to_dict(),
                      "selected": [",".join(c) for lg in result.log for c in lg.chosen]}
    return model


def main() -> None:
    ds, eps = sys.argv[1], float(sys.argv[2])
    seeds = [int(s) for s in sys.argv[3].split(",")]
    params = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    opts = BenchmarkOptions(dataset=ds, areas=("fidelity", "utility", "survival",
                                                "detection"))
    found: dict[str, list[float]] = {}
    for seed in seeds:
        work = Path(f"/tmp/s8fedgap/split-{ds}{seed}")
        data = prepare_seed(opts, seed, work)
        n_sites = len(data.sites)
        target = math.sqrt(n_sites) * budget_noise(eps, opts.delta)
        eps_c = brentq(lambda e, t=target: budget_noise(e, opts.delta) - t,
                   eps / (2 * math.sqrt(n_sites)), eps)
        train = data.train.drop(columns="site")
        row: dict[str, float] = {}
        chosen: dict[str, list[str]] = {}
        for arm in ("pooled", "per-site"):
            model = fit(data.schema, data.train, eps_c, opts.delta, seed, arm == "per-site",
                        params)
            syn = model.sample(len(train), seed=seed + 1)
            got, _ = score(opts, data, Produced(synthetic=syn, real_train=train), seed)
            row.update({f"{arm}_{k}": round(float(got[k]), 3) for k in WANTED
                        if got.get(k) is not None and np.isfinite(got[k])})
            chosen[arm] = model.fit_info["selected"]
        row["selected_same"] = len(set(chosen["pooled"]) & set(chosen["per-site"]))
        row["selected_of"] = len(chosen["pooled"])
        for k, v in row.items():
            found.setdefault(k, []).append(v)
        print(json.dumps({"dataset": ds, "epsilon_site": eps, "sites": n_sites,
                          "epsilon_emulation": round(eps_c, 4), "seed": seed, **row}),
              flush=True)
        shutil.rmtree(work, ignore_errors=True)  # real rows: not left behind
    print("MEDIAN", ds, eps, json.dumps(params),
          json.dumps({k: round(float(np.median(v)), 3) for k, v in found.items()}))


if __name__ == "__main__":
    main()
