"""Rows drawn by independent sampling against mbi's randomized rounding, one fit each.

One central fit of AMLSG at 18 sites' summed noise (epsilon 0.615, as
`emulate_sites.py`; reproducible noise from `DPRandomness.reproducible`: a benchmark,
not a release), then len(train) rows drawn from the same fitted model with each
`sampler` (post-processing: no privacy cost) and the sampling seed `emulate_sites.py`
uses (seed + 1), scored by the validation suite (fidelity and survival, as
`emulate_sites.py`). Also printed: the gene-frequency correlation of the released code
histogram itself (clipped at 0) and of the model's own gene marginals, on the same
noise draw, and of four more draws (seeds + 2..5) per sampler.

Usage: python sampler.py SEEDS [JSON_HYPERPARAMETERS] [SAMPLERS, default sample,round]
"""

import json
import sys
import warnings
from pathlib import Path

import numpy as np
from scipy import stats

from fedsynth.common.generators.marginal import MarginalGenerator
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.validation import validate
from fedsynth.simulations.benchmark import BenchmarkOptions, prepare_seed

warnings.simplefilter("ignore")
WANTED = ("code_frequency_correlation", "codeset_sign_agreement", "cox_hr_sign_agreement",
          "cox_c_index")
seeds = [int(s) for s in sys.argv[1].split(",")]
params = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
samplers = (sys.argv[3] if len(sys.argv) > 3 else "sample,round").split(",")


class Kept(MarginalGenerator):
    """The generator, keeping the engine's result (the released code histogram)."""

    def run_engine(self, plan, measurer, sites):  # noqa: ANN001, ANN201
        self.result = super().run_engine(plan, measurer, sites)
        return self.result


for seed in seeds:
    data = prepare_seed(BenchmarkOptions(dataset="amlsg"), seed,
                        Path(f"/tmp/marginal-datasets/amlsg{seed}"))
    train, hold = data.train.drop(columns="site"), data.holdout.drop(columns="site")
    genes = list(data.schema.codesets.values())[0]
    real = hold[genes].to_numpy(float).clip(0, 1).mean(0)

    def corr(counts: np.ndarray, real: np.ndarray = real) -> float:
        return round(float(stats.pearsonr(real, counts)[0]), 4)

    model = Kept(data.schema, seed=seed, **params)
    model.fit(train, epsilon=0.615, randomness=DPRandomness.reproducible(seed, "central"))
    hist = {m.clique[0]: float(np.ravel(m.values)[0]) for m in model.result.codes}
    marg = [float(np.asarray(model.mrf.project((g,)).datavector())[1]) for g in genes]
    out = {"seed": seed, "params": params,
           "histogram": corr(np.clip([hist[g] for g in genes], 0, None)),
           "model_marginals": corr(np.array(marg))}
    for sampler in samplers:
        model.hparams["sampler"] = sampler
        synthetic = model.sample(len(train), seed=seed + 1)
        result = validate(train, hold, synthetic, data.schema, seed=seed,
                          areas=["fidelity", "survival"], survival=data.schema.survival_pairs[0])
        figures: dict[str, float] = {}
        for m in result.metrics:
            if m.name in WANTED and m.name not in figures:
                figures[m.name] = round(float(m.value), 3)
        more = [corr(model.sample(len(train), seed=s)[genes].to_numpy(float).clip(0, 1).sum(0))
                for s in range(seed + 2, seed + 6)]
        out[sampler] = {**figures, "gene_corr_more_draws": more}
    print(json.dumps(out), flush=True)
