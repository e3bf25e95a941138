"""A server learning rate and momentum on the coordinator (FedAvgM-style).

The coordinator sees only the sites' DP releases, so whatever it computes from their
average is post-processing: a server step ``w <- w + lr * m`` with heavy-ball momentum
``m <- beta * m + (avg - w)`` costs no privacy and changes no site's epsilon (Hsu et al.
2019, "Measuring the effects of non-identical data distribution", FedAvgM). Momentum
averages the round updates over time, which cancels part of the independent DP noise
each round carries; ``lr = 1, beta = 0`` is plain FedAvg.

It needs the aggregate in clear, so it cannot run under CKKS secure aggregation.
Buffers that are statistics rather than weights (the TVAE's and the GAN's condition
frequencies, ``cond.freq``) must take the sites' average as it is: momentum would
overshoot a frequency past its pooled value. ``buffer_keys`` lists them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class ServerMomentum:
    """Heavy-ball momentum on the global model's round updates."""

    lr: float = 1.0
    momentum: float = 0.0
    velocity: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError("server learning rate must be > 0")
        if not 0 <= self.momentum < 1:
            raise ValueError("server momentum must be in [0, 1)")

    def step(
        self,
        current: dict[str, np.ndarray],
        averaged: dict[str, np.ndarray],
        plain: Iterable[str] = (),
    ) -> dict[str, np.ndarray]:
        """The next global state from the current one and the sites' weighted average.

        Keys in ``plain`` (and integer arrays) take the average unchanged.
        """
        skip = set(plain)
        out: dict[str, np.ndarray] = {}
        for key, value in current.items():
            if key in skip or not np.issubdtype(np.asarray(value).dtype, np.floating):
                out[key] = averaged[key]
                continue
            delta = np.asarray(averaged[key], dtype=np.float64) - value
            vel = self.momentum * self.velocity.get(key, 0.0) + delta
            self.velocity[key] = vel
            out[key] = (value + self.lr * vel).astype(np.asarray(value).dtype)
        return out


def buffer_keys(networks: dict[str, torch.nn.Module]) -> set[str]:
    """The flat-state keys of a generator's buffers (``Generator.networks()``): the
    persistent ones, those in its state; a non-persistent buffer (TVAE's time-path
    column indices) is rebuilt from the schema and never sent."""
    return {
        f"{prefix}.{name}" for prefix, net in networks.items()
        for name in set(dict(net.named_buffers())) & set(net.state_dict())
    }


def save_velocity(path: Path, opt: ServerMomentum, server_round: int) -> None:
    """Keep the velocity with the round it belongs to, written atomically.

    The velocity is a function of the global models only (post-processing), so it may
    sit with the checkpoint; a resumed study needs it to take the same steps as an
    uninterrupted one.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **{f"v/{k}": v for k, v in opt.velocity.items()},
                 round=np.int64(server_round))
    tmp.replace(path)


def load_velocity(path: Path, server_round: int) -> dict[str, np.ndarray]:
    """The velocity saved after ``server_round``; empty when missing, stale or unreadable
    (momentum then restarts from zero: slower, never wrong)."""
    try:
        with np.load(path) as data:
            if int(data["round"]) != server_round:
                return {}
            return {k[2:]: data[k] for k in data.files if k.startswith("v/")}
    except (OSError, ValueError, KeyError):
        return {}
