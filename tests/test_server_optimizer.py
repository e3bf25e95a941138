"""The coordinator's FedAvgM step: FedAvg when off, heavy-ball momentum when on."""

from __future__ import annotations

import numpy as np
import pytest

from fedsynth.common.generators import TVAE
from fedsynth.server.optimizer import ServerMomentum, buffer_keys


def test_plain_settings_are_fedavg() -> None:
    current = {"w": np.zeros(3, dtype=np.float32)}
    averaged = {"w": np.array([1.0, -2.0, 0.5], dtype=np.float32)}
    out = ServerMomentum().step(current, averaged)
    np.testing.assert_array_equal(out["w"], averaged["w"])
    assert out["w"].dtype == np.float32


def test_momentum_carries_the_last_update() -> None:
    opt = ServerMomentum(lr=1.0, momentum=0.5)
    w0 = {"w": np.zeros(2), "cond.freq": np.array([0.5, 0.5])}
    avg1 = {"w": np.array([1.0, 1.0]), "cond.freq": np.array([0.2, 0.8])}
    w1 = opt.step(w0, avg1, plain={"cond.freq"})
    np.testing.assert_allclose(w1["w"], [1.0, 1.0])
    avg2 = {"w": np.array([2.0, 1.0]), "cond.freq": np.array([0.3, 0.7])}
    w2 = opt.step(w1, avg2, plain={"cond.freq"})
    # velocity = 0.5 * (1, 1) + (1, 0); a frequency takes the sites' average as it is
    np.testing.assert_allclose(w2["w"], [2.5, 1.5])
    np.testing.assert_allclose(w2["cond.freq"], [0.3, 0.7])


def test_buffer_keys_of_the_tvae(heart_schema) -> None:
    assert buffer_keys(TVAE(heart_schema).networks()) == {"cond.freq"}


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="momentum"):
        ServerMomentum(momentum=1.0)
    with pytest.raises(ValueError, match="learning rate"):
        ServerMomentum(lr=0.0)


def test_velocity_survives_a_coordinator_restart(tmp_path) -> None:
    """A resumed study takes the same steps as an uninterrupted one; a stale or damaged
    velocity file means momentum restarts from zero, never a wrong step."""
    from fedsynth.server.optimizer import load_velocity, save_velocity

    opt = ServerMomentum(lr=1.0, momentum=0.5)
    w0 = {"w": np.zeros(2, dtype=np.float32)}
    w1 = opt.step(w0, {"w": np.ones(2, dtype=np.float32)})
    path = tmp_path / "momentum.npz"
    save_velocity(path, opt, server_round=3)
    resumed = ServerMomentum(lr=1.0, momentum=0.5, velocity=load_velocity(path, 3))
    avg = {"w": np.array([2.0, 0.0], dtype=np.float32)}
    np.testing.assert_array_equal(resumed.step(w1, avg)["w"], opt.step(w1, avg)["w"])
    assert load_velocity(path, 4) == {}
    path.write_bytes(b"not an npz")
    assert load_velocity(path, 3) == {}
