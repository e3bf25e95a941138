"""One federated marginal study (real ServerApp and ClientApp in process, 20% of every
site held out, epsilon 3 per site, secret noise) with chosen hyperparameters, scored
by the validation suite's code-set and survival areas: `fedsynth benchmark` has no
option for generator hyperparameters, and the "before" rows of results.md need the
previous defaults. Usage: python federated_params.py DATASET SEED [JSON] [TAG]"""

import json
import sys
import time
import warnings
from pathlib import Path

from fedsynth.common.validation import validate
from fedsynth.simulations.benchmark import (
    BenchmarkOptions,
    Setting,
    prepare_seed,
    run_federated,
)

warnings.simplefilter("ignore")
WANTED = ("code_frequency_correlation", "codeset_sign_agreement", "cox_hr_sign_agreement",
          "cox_c_index")


def study(ds: str, seed: int, params: dict, tag: str):  # noqa: ANN201
    """Run one study and score it: (the seed's prepared split, the study's output, its
    seconds, the WANTED figures). Shared with sixth-pass/federated_genes.py."""
    work = Path(f"/tmp/marginal-datasets/{ds}{seed}")
    opts = BenchmarkOptions(dataset=ds, generators=("marginal",),
                            generator_params={"marginal": params})
    data = prepare_seed(opts, seed, work / "data")
    start = time.time()
    produced = run_federated(opts, Setting("federated", "marginal", dp=True, epsilon=3.0),
                             data, seed, work / f"study-{tag}")
    seconds = time.time() - start
    train, hold = data.train.drop(columns="site"), data.holdout.drop(columns="site")
    pairs = data.schema.survival_pairs
    result = validate(train, hold, produced.synthetic, data.schema, seed=seed,
                      areas=["fidelity", "survival"], survival=pairs[0] if pairs else None)
    figures: dict[str, float] = {}
    for m in result.metrics:
        if m.name in WANTED and m.name not in figures:
            figures[m.name] = round(float(m.value), 3)
    return data, produced, seconds, figures


if __name__ == "__main__":
    ds, seed = sys.argv[1], int(sys.argv[2])
    params = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    tag = sys.argv[4] if len(sys.argv) > 4 else "run"
    _, produced, seconds, figures = study(ds, seed, params, tag)
    print(json.dumps({"dataset": ds, "seed": seed, "params": params,
                      "seconds": round(seconds),
                      "epsilon_max_site": max(produced.epsilon_sites.values()), **figures}),
          flush=True)
