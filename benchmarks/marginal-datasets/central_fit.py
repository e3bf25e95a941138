"""One central marginal fit at epsilon 3 on a benchmark split (the pooled training rows
of `fedsynth benchmark`'s seed), scored by the validation suite's code-set and survival
areas. Usage: python central_fit.py DATASET SEED [JSON_HYPERPARAMETERS]."""

import json
import sys
import time
import warnings
from pathlib import Path

from fedsynth.common.generators.marginal import MarginalGenerator
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.validation import validate
from fedsynth.simulations.benchmark import BenchmarkOptions, prepare_seed

warnings.simplefilter("ignore")
WANTED = ("code_frequency_correlation", "codeset_sign_agreement", "cox_hr_sign_agreement",
          "cox_c_index")

ds, seed = sys.argv[1], int(sys.argv[2])
params = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
data = prepare_seed(BenchmarkOptions(dataset=ds), seed, Path(f"/tmp/marginal-datasets/{ds}{seed}"))
train, hold = data.train.drop(columns="site"), data.holdout.drop(columns="site")
start = time.time()
model = MarginalGenerator(data.schema, seed=seed, **params)
model.fit(train, epsilon=3.0, randomness=DPRandomness.reproducible(seed, "central"))
synthetic = model.sample(len(train), seed=seed + 1)
seconds = time.time() - start
pairs = data.schema.survival_pairs
result = validate(train, hold, synthetic, data.schema, seed=seed, areas=["fidelity", "survival"],
                  survival=pairs[0] if pairs else None)
figures: dict[str, tuple[float, float | None]] = {}
for m in result.metrics:
    if m.name in WANTED and m.name not in figures:  # (value, real train's reference)
        figures[m.name] = (round(float(m.value), 3),
                           None if m.reference is None else round(float(m.reference), 3))
print(ds, seed, params, f"fit+sample {seconds:.0f}s eps {model.fit_info['epsilon']:.4f}",
      figures, "selected", model.fit_info["selected"])
