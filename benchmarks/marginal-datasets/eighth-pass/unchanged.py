"""The tables without a `prognostic` list are unchanged by the eighth pass (issue 13).

Fits the marginal generator centrally on the pooled rows of DATASET at epsilon 3 with
`DPRandomness.reproducible(0, "check")` (a test of the code path, not a release) and
prints the selected cliques, the reported epsilon and the SHA-256 of 500 sampled rows.
Run at this branch and at its base (9b5bfb2: a `git archive` of it extracted as
`fedsynth/` in a folder put first on PYTHONPATH) and compare (unchanged.txt).

Usage: python unchanged.py DATASET
"""

import hashlib
import sys
import warnings

import pandas as pd

import fedsynth
from fedsynth.common.generators import get_generator
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.simulations.datasets import load_site_frames

warnings.simplefilter("ignore")
schema, frames = load_site_frames(sys.argv[1])
pooled = pd.concat(list(frames.values()), ignore_index=True)
model = get_generator("marginal")(schema, seed=0)
model.fit(pooled, epsilon=3.0, randomness=DPRandomness.reproducible(0, "check"))
synthetic = model.sample(500, seed=1)
print(sys.argv[1], fedsynth.__file__, model.fit_info["epsilon"],
      len(model.fit_info["selected"]), model.fit_info["selected"][:6],
      hashlib.sha256(synthetic.to_csv(index=False).encode()).hexdigest())
