"""One federated AMLSG marginal study (as `federated_params.py`: real ServerApp and
ClientApps in process, 18 centres, epsilon 3 per site, SECRET noise), printing next to
the validation figures the gene-frequency correlation of what the coordinator holds:
the summed noisy code histogram (clipped at 0), the fitted model's gene marginals, and
the released rows. Why: to compare the model with the one release that measures the
gene counts directly, on the same (secret) draw. The coordinator's engine result is
kept by wrapping `MarginalGenerator.run_engine` in this process (nothing is sent
anywhere else).

Usage: python federated_genes.py SEED [JSON_HYPERPARAMETERS] [TAG]
"""

import json
import sys
import warnings
from pathlib import Path

import numpy as np
from scipy import stats

from fedsynth.common.generators.marginal import MarginalGenerator
from fedsynth.common.generators.marginal.codes import pooled_counts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from federated_params import study  # noqa: E402  (the study and its scoring, shared)

warnings.simplefilter("ignore")
seed = int(sys.argv[1])
params = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
tag = sys.argv[3] if len(sys.argv) > 3 else "run"
kept: dict = {}
engine = MarginalGenerator.run_engine


def keeping(self, plan, measurer, sites):  # noqa: ANN001, ANN201
    result = engine(self, plan, measurer, sites)
    kept.setdefault("calls", []).append(type(measurer).__name__)
    kept["hist"] = {m.clique[0]: float(np.ravel(pooled_counts(m)[0])[0]) for m in result.codes}
    kept["model"] = self.mrf
    return result


MarginalGenerator.run_engine = keeping
data, produced, seconds, figures = study("amlsg", seed, params, tag)
hold = data.holdout.drop(columns="site")
genes = list(data.schema.codesets.values())[0]
real = hold[genes].to_numpy(float).clip(0, 1).mean(0)
marg = [float(np.asarray(kept["model"].project((g,)).datavector())[1]) for g in genes]
print(json.dumps({
    "seed": seed, "params": params, "seconds": round(seconds),
    "epsilon_max_site": max(produced.epsilon_sites.values()),
    "histogram": round(float(stats.pearsonr(real, np.clip(
        [kept["hist"][g] for g in genes], 0, None))[0]), 4),
    "model_marginals": round(float(stats.pearsonr(real, marg)[0]), 4),
    "engine_calls": kept["calls"], "first_counts": [round(kept["hist"][g], 2) for g in genes[:3]],
    **figures}),
    flush=True)
