"""How many released code pairs and event links the AMLSG model reads (issue 13, fifth pass).

Both releases enter the model only while the junction tree stays within `max_cells`;
the links (c, death) of 40 covariates share the event, so they take room the gene pairs
had. Central fit at epsilon 0.615 (18 sites' summed noise, as emulate_sites.py), noise
from `DPRandomness.reproducible` (labelled: a benchmark, not a release); prints the
counts and the figures for each variant.

Usage: python model_room.py SEED '[JSON_HYPERPARAMETERS, ...]'
"""

import json
import sys
import warnings
from pathlib import Path

from fedsynth.common.generators.marginal import MarginalGenerator
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.validation import validate
from fedsynth.simulations.benchmark import BenchmarkOptions, prepare_seed

warnings.simplefilter("ignore")
seed = int(sys.argv[1])
variants = json.loads(sys.argv[2]) if len(sys.argv) > 2 else [{"link_bound": 0}, {}]
data = prepare_seed(BenchmarkOptions(dataset="amlsg"), seed,
                    Path(f"/tmp/marginal-datasets/amlsg{seed}"))
train, hold = data.train.drop(columns="site"), data.holdout.drop(columns="site")
for params in variants:
    model = MarginalGenerator(data.schema, seed=seed, **params)
    model.fit(train, epsilon=0.615, randomness=DPRandomness.reproducible(seed, "central"))
    synthetic = model.sample(len(train), seed=seed + 1)
    result = validate(train, hold, synthetic, data.schema, seed=seed,
                      areas=["fidelity", "survival"], survival=data.schema.survival_pairs[0])
    figures = {m.name: round(float(m.value), 3) for m in result.metrics
               if m.name in ("code_frequency_correlation", "codeset_sign_agreement",
                             "cox_hr_sign_agreement")}
    info = model.fit_info
    print(json.dumps({"seed": seed, "params": params,
                      "pairs_released": info["pairs_released"],
                      "pairs_in_model": len(info["pairs_in_model"]),
                      "links_in_model": len(info["links_in_model"]), **figures}), flush=True)
