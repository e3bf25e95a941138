"""Where a site's DP mechanisms draw their randomness: secret by default.

A DP guarantee is a statement about a random draw the adversary cannot see. The
coordinator is one of the adversaries, so nothing it sends or knows (the study seed,
the round number, the site's name) may determine a site's Gaussian noise or its Poisson
batches: a coordinator that can replay the draw subtracts the noise and reads the rows.

``DPRandomness.secret()`` (the default everywhere) seeds every generator from the
operating system's CSPRNG (``secrets``), fresh on every call, so two calls with the
same inputs draw different noise and different batches. Streams are kept apart by
name (``"sampler"``, ``"gradient-noise"``, ``"count-release"``, ``"loss-report"``,
``"measurement"``): in secret mode each is its own fresh seed; in reproducible mode
each is a distinct hash of the site-local seed, the stream and a call counter.

``DPRandomness.reproducible(seed)`` exists for tests and benchmarks that must compare
runs noise for noise. Its draws are *not* a DP release (anyone who learns the seed
replays them); every output that a reproducible run touches is labelled so, and a
real SuperNode refuses it (``client/app.py``, ``fedsynth preflight``). The seed is a
site-local setting, never read from a coordinator's message.

A release's Gaussian noise (marginals, scores, the count and grid histograms, the loss
report) is drawn through ``release(stream)``: in secret mode by OpenDP's exact sampler
from OS randomness (``release_noise.py``), not by these generators.

Generators are torch's (Mersenne Twister) and numpy's (PCG64). In secret mode a torch
generator's *whole* state (624 words, 19,937 bits) comes from the OS CSPRNG, not a seed:
torch's ``manual_seed`` keeps only a seed's low 32 bits, and 2**32 candidate streams
are few enough for a coordinator to try each against a returned update and, on the
right one, subtract the DP-SGD noise (found in the twelfth session's audit; the
correlation test it ran picks the true seed out of a round's weights). numpy's
generators get 128 bits. The adversary never sees the raw outputs (they are added to
sums it cannot see either). Neither is a cryptographic generator: Opacus' own
``secure_mode`` needs ``torchcsprng``, which no longer builds against current torch;
its floating-point hardening (each noise value the sum of four draws) is what the
trainer takes from it (``DPOptimizer(secure_mode=True)``). docs/privacy.md says this.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import torch

from .release_noise import ReleaseNoise

STREAMS = ("sampler", "gradient-noise", "count-release", "loss-report", "measurement", "model",
           "grid-release")

#: The words every label of outputs that are no DP release ends with: this module's
#: ``NOT_A_DP_RELEASE`` and ``generators.base.NO_DP_RELEASE``. What a reader-facing
#: output (report, console, benchmark table, ``fedsynth sample``) tests a label for.
NOT_A_RELEASE = "not a DP release"
NOT_A_DP_RELEASE = f"reproducible noise: {NOT_A_RELEASE}"


def is_not_a_release(label: str | None) -> bool:
    """Whether a ``privacy`` label (summary.json, a model file's metadata) says its
    outputs carry no DP guarantee: replayable noise or no DP at all.

    Every place that shows a study's epsilon asks this, so that a figure computed by an
    accountant for noise anyone can replay never reads as a guarantee. No label (a
    central DP fit with secret noise saves none) is a release.
    """
    return bool(label) and NOT_A_RELEASE in str(label)


@dataclass
class DPRandomness:
    """A factory of generators for a site's DP draws; secret unless made reproducible."""

    seed: int | None = None
    context: str = ""
    _calls: dict[str, int] = field(default_factory=dict, repr=False)

    @classmethod
    def secret(cls) -> DPRandomness:
        return cls(None)

    @classmethod
    def reproducible(cls, seed: int, context: str = "") -> DPRandomness:
        """Fixed draws from a site-local ``seed``; ``context`` (e.g. the round) keeps
        successive uses apart, so a reproducible study still draws new noise each round."""
        return cls(int(seed), str(context))

    @property
    def is_reproducible(self) -> bool:
        return self.seed is not None

    def _seed(self, stream: str) -> int:
        if stream not in STREAMS:
            raise ValueError(f"unknown randomness stream {stream!r}; known: {STREAMS}")
        if self.seed is None:
            return secrets.randbits(63)
        n = self._calls.get(stream, 0)
        self._calls[stream] = n + 1
        digest = hashlib.sha256(f"{self.seed}:{self.context}:{stream}:{n}".encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1

    def torch(self, stream: str) -> torch.Generator:
        """A fresh torch generator for one stream."""
        if self.seed is None:
            self._seed(stream)  # checks the stream's name
            return _secret_state(torch.Generator())
        return torch.Generator().manual_seed(self._seed(stream))

    def seed_global(self, stream: str) -> None:
        """Set torch's global generator for one stream: the draws a module makes inside a
        DP-SGD step (ddpm's timesteps, the VAE's reparametrisation) read it."""
        if self.seed is None:
            self._seed(stream)
            _secret_state(torch.random.default_generator)
        else:
            torch.manual_seed(self._seed(stream))

    def numpy(self, stream: str) -> np.random.Generator:
        """A fresh numpy generator for one stream."""
        if self.seed is None:
            self._seed(stream)
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng(self._seed(stream))

    def release(self, stream: str) -> ReleaseNoise:
        """The noise source of one release (``release_noise.py``): OpenDP's exact
        sampler in secret mode, the stream's seeded numpy draw in reproducible mode."""
        return ReleaseNoise(self.numpy(stream), exact=not self.is_reproducible)

    def int_seed(self, stream: str) -> int:
        """A seed for code that takes an integer (kept secret in secret mode)."""
        return self._seed(stream)


#: torch's CPU generator state (``Generator.get_state``): the seed (uint64), ``left`` and
#: ``seeded`` (int32 each), ``next`` (uint64), then the Mersenne Twister's 624 words,
#: each stored in a uint64 of which torch reads the low 32 bits.
_MT_OFFSET = 24
_MT_WORDS = 624


@cache
def _check_layout() -> None:
    """Refuse to run if torch's generator state is not the layout ``_secret_state``
    writes: a silent mismatch would leave the 32-bit seed in charge."""
    probe = torch.Generator().manual_seed(12345).get_state().numpy()
    words = probe[_MT_OFFSET:_MT_OFFSET + 8 * _MT_WORDS].view(np.uint64)
    expected = np.random.RandomState(12345).get_state()[1]  # the same MT19937 seeding
    if probe.size < _MT_OFFSET + 8 * _MT_WORDS or not np.array_equal(words, expected):
        raise RuntimeError(
            f"torch {torch.__version__}'s generator state is not the layout fedsynth fills "
            "from the OS CSPRNG; pin torch to the version in pyproject.toml"
        )


def _secret_state(generator: torch.Generator) -> torch.Generator:
    """``generator`` with all 624 words of its Mersenne Twister state from ``secrets``
    (19,937 bits), so no seed, 32- or 64-bit, replays its draws."""
    _check_layout()
    generator.manual_seed(secrets.randbits(63))  # a valid header: ``left`` 1, ``next`` 0
    state = generator.get_state().numpy().copy()
    words = state[_MT_OFFSET:_MT_OFFSET + 8 * _MT_WORDS].view(np.uint64)
    words[:] = np.frombuffer(secrets.token_bytes(4 * _MT_WORDS), dtype=np.uint32)
    generator.set_state(torch.from_numpy(state))
    return generator
