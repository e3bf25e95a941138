"""Two side experiments of the marginal generator (docs/generators.md), on heart disease.

``python research/bench_marginal.py heterogeneity``: the federated study at
epsilon 3 per site without the site attribute (the sites' noisy vectors summed, as
under CKKS, but in clear), for comparison with ``fedsynth benchmark``'s
``marginal/federated/eps3`` (site attribute on, the default).

``python research/bench_marginal.py decoding``: one central fit per seed at
epsilon 3, sampled twice: values drawn on the column's recorded grid inside each bin
(the default) and uniformly in the bin then rounded; fidelity and detection AUROC.

Both use the benchmark's split and evaluator (``simulations/benchmark.py``), seeds 0-2.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from fedsynth.common.generators import get_generator
from fedsynth.common.generators.marginal import discretize
from fedsynth.simulations.benchmark import (
    BenchmarkOptions,
    Produced,
    Setting,
    prepare_seed,
    run_federated,
    score,
)


def _uniform_in_bin(self: discretize.Attribute, bins: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """The alternative decoder: uniform in the bin, rounded to the integer grid."""
    edges = self.edges()
    out = np.empty(len(bins))
    for b in np.unique(bins):
        rows = np.flatnonzero(bins == b)
        v = rng.uniform(edges[b], edges[b + 1], size=len(rows))
        out[rows] = np.expm1(v) if self._log else v
    if self._integer_grid():
        out = np.clip(np.round(out), float(self.column.min), float(self.column.max))
    return out


def heterogeneity(work: Path, seeds: list[int]) -> None:
    opts = BenchmarkOptions(generators=("marginal",),
                            areas=("fidelity", "utility", "detection", "privacy"),
                            generator_params={"marginal": {"site_attribute": False}})
    for seed in seeds:
        data = prepare_seed(opts, seed, work / f"s{seed}" / "data")
        setting = Setting("federated", "marginal", dp=True, epsilon=3.0)
        produced = run_federated(opts, setting, data, seed, work / f"s{seed}" / "study")
        fig, _ = score(opts, data, produced, seed)
        print(json.dumps({"seed": seed, "site_attribute": False, **{
            k: round(fig[k], 3) for k in ("fidelity", "tstr_auroc", "detection_auroc",
                                          "membership_inference_auroc")}}), flush=True)


def decoding(work: Path, seeds: list[int]) -> None:
    opts = BenchmarkOptions(generators=("marginal",), areas=("fidelity", "detection"))
    grid = discretize.Attribute._draw_in_bins
    for seed in seeds:
        data = prepare_seed(opts, seed, work / f"s{seed}")
        train = data.train.drop(columns="site")
        model = get_generator("marginal")(data.schema, seed=seed).fit(train, epsilon=3.0)
        result: dict[str, dict[str, float]] = {}
        for name, draw in (("grid", grid), ("uniform", _uniform_in_bin)):
            discretize.Attribute._draw_in_bins = draw  # type: ignore[method-assign]
            try:
                syn = model.sample(len(train), seed=seed + 1)
            finally:
                discretize.Attribute._draw_in_bins = grid  # type: ignore[method-assign]
            fig, _ = score(opts, data, Produced(synthetic=syn, real_train=train), seed)
            result[name] = {k: round(fig[k], 3) for k in ("fidelity", "detection_auroc")}
        print(json.dumps({"seed": seed, **result}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=("heterogeneity", "decoding"))
    parser.add_argument("--work", default="bench-marginal-work")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    {"heterogeneity": heterogeneity, "decoding": decoding}[args.experiment](
        Path(args.work), seeds)


if __name__ == "__main__":
    main()
