"""`fedsynth benchmark`'s settings run with the marginal generator's hyperparameters set
(the CLI has no option for them): the "before" of the eighth pass is `{"prognostic": []}`
(the former workload exactly, tests/test_marginal_prognostic.py), secret noise.

Usage: python bench_params.py DATASET 'JSON' FIRST_SEED SEEDS ONLY OUT
"""

import json
import sys
from pathlib import Path

from fedsynth.simulations.benchmark import BenchmarkOptions, run_benchmark

dataset, params, first, seeds, only, out = sys.argv[1:7]
run_benchmark(BenchmarkOptions(
    dataset=dataset, generators=("marginal",), epsilons=(3.0,), seed=int(first),
    seeds=int(seeds), only=tuple(only.split(",")), out=Path(out),
    generator_params={"marginal": json.loads(params)}, baselines=(),
    command=" ".join(["python", *sys.argv])))
