"""Heart disease is unchanged by the pair release (issue 13, fourth pass).

Heart disease has no code set, so its plan has no code histogram and no pair release.
This fits the marginal generator centrally on the pooled heart rows at epsilon 3 with
`DPRandomness.reproducible(0, "check")` (a test of the code path, not a release) and
prints the plan, the reported epsilon, the selected pairs and the SHA-256 of 500 sampled
rows. Run it at this branch and at its base (78de280, e.g. a `git archive` of it put
first on PYTHONPATH) and compare the hashes.

Usage: python heart_unchanged.py
"""

import hashlib
import warnings

import pandas as pd

import fedsynth
from fedsynth.common.generators import get_generator
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.simulations.datasets import load_site_frames

warnings.simplefilter("ignore")
schema, frames = load_site_frames("heart_disease")
pooled = pd.concat(list(frames.values()), ignore_index=True)
model = get_generator("marginal")(schema, seed=0)
model.fit(pooled, epsilon=3.0, randomness=DPRandomness.reproducible(0, "check"))
synthetic = model.sample(500, seed=1)
print(fedsynth.__file__, model.plan(), model.fit_info["epsilon"], model.fit_info["selected"],
      hashlib.sha256(synthetic.to_csv(index=False).encode()).hexdigest())
