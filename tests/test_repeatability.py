"""A study with reproducible noise repeats byte for byte; with secret noise it does not.

Benchmarks compare code changes on the same seeds; with the sites' draws secret (as a
real site's are) two runs of one seed differ by the DP noise and by the draws made
inside each DP-SGD step (ddpm's timesteps, the VAE's reparametrisation), so a 3-seed
median moves between runs of the same code. ``--reproducible-noise`` (tests and
benchmarks only; not a DP release) derives all of them from the seed. Two things had
to hold for that to repeat exactly: every draw of a site comes from its
``DPRandomness``, and the coordinator averages the replies in node order (Flower
samples each round's nodes in a random order, and float sums depend on the order).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedsynth.simulations.benchmark import BenchmarkOptions, Setting, prepare_seed
from fedsynth.simulations.datasets import bundled_schema_path, load_site_frames
from fedsynth.simulations.study_api import run_study


def _study(tmp_path, name: str, reproducible: bool):
    _, frames = load_site_frames("heart_disease")
    return run_study(frames, bundled_schema_path("heart_disease"), generator="ddpm",
                     rounds=2, local_epochs=2, seed=5, reproducible_noise=reproducible,
                     out=tmp_path / name)


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_reproducible_noise_repeats_the_study_exactly(tmp_path):
    first = _study(tmp_path, "a", True)
    again = _study(tmp_path, "b", True)
    assert _same(first.model.state_dict(), again.model.state_dict())
    assert first.synthetic.equals(again.synthetic)
    assert first.summary["sites"] and all(
        s["reproducible_noise"] for s in first.summary["sites"].values())
    # secret noise (the default): the same seed gives another model
    secret = _study(tmp_path, "c", False)
    assert not _same(first.model.state_dict(), secret.model.state_dict())


def test_benchmark_option_seeds_every_site(tmp_path):
    """``fedsynth benchmark --reproducible-noise`` gives each site its own seed; the
    default leaves every site's noise secret."""
    seeded = prepare_seed(BenchmarkOptions(reproducible_noise=True), 3, tmp_path / "r")
    seeds = [s.reproducible_noise_seed for s in seeded.sites]
    assert None not in seeds and len(set(seeds)) == len(seeds)
    secret = prepare_seed(BenchmarkOptions(), 3, tmp_path / "s")
    assert all(s.reproducible_noise_seed is None for s in secret.sites)


def _bench_row(setting: str, kind: str, dp: bool, privacy: str, fidelity: float) -> dict:
    """One results.csv row as ``benchmark.run_setting`` writes it (figures made up)."""
    return {"dataset": "heart_disease", "seed": 0, "setting": setting, "kind": kind,
            "generator": setting.split("/")[0], "dp": dp,
            "epsilon_target": 3.0 if dp else None, "secure": False, "honest_sites": 0,
            "site": "", "engine": "inprocess", "privacy": privacy,
            "epsilon_max_site": 2.999 if dp else None, "fidelity": fidelity,
            "tstr_auroc": 0.8, "detection_auroc": 0.7, "correlation_similarity": 0.9,
            "wall_s": 1.0, "peak_rss_mb": 100.0}


def test_a_reproducible_benchmark_row_says_it_is_no_release(tmp_path):
    """results.csv, results.md's rows and the quality-vs-epsilon plot say which rows
    drew replayable noise: on the old code only results.md's preamble did, so a seeded
    row of results.csv could not be told from a DP one."""
    import csv

    from fedsynth.common.generators.base import NO_DP_RELEASE
    from fedsynth.common.privacy.randomness import NOT_A_DP_RELEASE
    from fedsynth.simulations import benchmark, benchmark_report

    seeded = f"{NOT_A_DP_RELEASE} (sites cleveland, va)"
    rows = [_bench_row("tvae/federated/eps3", "federated", True, seeded, 0.9),
            _bench_row("tvae/central/nodp", "central", False, NO_DP_RELEASE, 0.95),
            _bench_row("independent", "baseline", False, NO_DP_RELEASE, 0.8)]
    # each row's label is what the mechanism that ran says (here a central fit's file
    # label and a baseline's), as a federated row's is its study's summary.json
    opts = BenchmarkOptions(reproducible_noise=True, areas=("fidelity",), generator_params={
        "marginal": {"bins": 6, "rounds": 1, "per_round": 2, "candidates": 6, "iters": 60}})
    data = prepare_seed(opts, 3, tmp_path / "split")
    ran = [benchmark.run_setting(opts, setting, data, 3, tmp_path / "work") for setting in
           (Setting("central", "marginal", dp=True, epsilon=3.0),
            Setting("baseline", "independent"))]
    assert [r["privacy"] for r in ran] == [NOT_A_DP_RELEASE, NO_DP_RELEASE]
    machine = {"cpus": 1, "processor": "x", "torch": "2", "torch_threads": 1,
               "load_average": [0.0]}
    options = {"dataset": "heart_disease", "dirichlet_alpha": None, "areas": None,
               "seeds": 1, "anonymeter_python": "", "baseline_epochs": None, "seed": 0,
               "rounds": 1, "local_epochs": 1, "sample_rate": 1.0, "delta": 1e-5,
               "central_epsilon": 3.0, "baselines": ["independent"],
               "reproducible_noise": True}
    info = {"command": "pytest", "commit": "c", "seconds_total": 1.0,
            "machine_start": machine, "machine_end": machine, "options": options,
            "sites": {"cleveland": 1}, "holdout_rows": 1, "sdv": "installed"}
    benchmark_report.write_outputs(rows, info, tmp_path)
    with (tmp_path / "results.csv").open() as fh:
        saved = {r["setting"]: r["privacy"] for r in csv.DictReader(fh)}
    assert saved["tvae/federated/eps3"] == seeded
    assert saved["tvae/central/nodp"] == NO_DP_RELEASE
    table = [line for line in (tmp_path / "results.md").read_text().splitlines()
             if line.startswith("| `tvae/federated")]
    assert len(table) == 1 and NOT_A_DP_RELEASE in table[0], table
    summary = benchmark_report.summarise(rows)
    assert NOT_A_DP_RELEASE in benchmark_report.quality_title(summary)
    # a DP row's title does not say so
    dp = [dict(rows[0], privacy="DP release: post-processing"), *rows[1:]]
    assert "not a DP release" not in benchmark_report.quality_title(
        benchmark_report.summarise(dp))
