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

from fedsynth.simulations.benchmark import BenchmarkOptions, prepare_seed
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
