"""A conditional tabular GAN (CTGAN-like) whose discriminator alone is privatised.

Why it is shaped this way:

- **Only the discriminator reads real rows**, so ``private_module()`` is the
  discriminator and DP-SGD (Opacus, through the shared trainer) privatises only its
  updates. The generator learns from the discriminator's output on the generator's own
  samples; that is post-processing of a DP output, so it costs no privacy. The
  generator's step runs in ``after_private_step`` with the discriminator's Opacus hooks
  off and through ``torch.autograd.grad`` on the generator's parameters only, so it
  neither leaves per-sample gradients behind nor touches the discriminator's ``.grad``.
- **Loss**: the non-saturating GAN loss on logits (BCE-with-logits). CTGAN's WGAN-GP
  needs the gradient of a gradient (double backward) through the discriminator, which
  Opacus' per-sample gradient hooks do not support; a per-row BCE is also exactly the
  per-sample loss Opacus clips.
- **pac = 1**: CTGAN packs ``pac`` rows into one discriminator input. Poisson batches
  (what Opacus' accountant assumes) have a random size, not a multiple of ``pac``, and
  a packed input would mix several patients into one "sample", so one patient's
  gradient could no longer be clipped alone.
- **Fixed, public number of fake rows**: every discriminator step scores the Poisson
  batch of real rows *and* ``fake_batch`` generated rows in ONE forward pass, and each
  row's loss is returned separately, so Opacus clips each row's gradient to the same
  bound. The fake rows depend only on the generator (public to the mechanism); their
  number is a hyperparameter, not derived from the site's size or the batch size,
  because a count that moves with N or |batch| would let one patient change how many
  clipped gradients enter the sum (doubling the sensitivity). An empty Poisson batch
  still makes a valid step: the fake rows keep the forward pass non-empty.
- **Training-by-sampling is not used**: CTGAN draws real rows per category of the
  conditional column, which is not the Poisson sampling Opacus accounts for. Real rows
  come only from the trainer's Poisson batches; the condition of a real row is read
  from the row itself. The generator's conditions are drawn from the frequencies of
  the conditional column that the site released once as a DP histogram
  (``set_statistics``), never from the rows. Those frequencies live in a buffer of the
  ``cond`` network, so they travel in the flat state and FedAvg averages them.
- **Mode-aware numbers from the public domain**: CTGAN fits a Gaussian mixture to each
  numeric column, i.e. to private rows (its modes would leak, and fitting it privately
  would cost budget). Here each numeric value (already scaled to [-1, 1] by the
  schema's public bounds) is represented as a one-hot bin of a fixed grid of ``bins``
  equal-width bins over the public range plus an offset within the bin in [-1, 1].
  The generator picks a bin categorically (so spikes such as oldpeak = 0 and several
  modes are as easy as a categorical column) and refines it with a tanh offset. The
  grid depends on nothing but the schema. Decoding maps bin and offset back to the
  encoder's scale and goes through the project's ``TabularEncoder``, so samples always
  conform to the schema.
- **No BatchNorm anywhere**: it mixes rows (no per-sample gradient in the
  discriminator; batch-dependent samples in the generator). The generator uses
  LayerNorm, which is per row; the discriminator is Linear + LeakyReLU + Dropout, all
  supported by Opacus.
- **Gumbel-softmax with a low temperature** (``tau``) for generated categories, bins
  and code bits, as in CTGAN: nearly one-hot samples with a useful gradient. (A
  straight-through hard sample was measured too and was not better.)
- **Code sets** (a multi-hot block: mutated genes, diagnoses) are one Bernoulli per
  code: the generator emits one logit per code, relaxed with the binary Concrete at
  ``tau`` in training and sampled as independent Bernoullis given the row's noise and
  condition, so their co-occurrence can only come from the shared hidden layers. The
  discriminator reads the block as 0/1 inputs beside the rest of the row. On the real
  AMLSG genes (54 codes, tests/test_generators_families.py) this learns the code
  frequencies; it did not learn the NPM1-FLT3 co-occurrence within 600 steps even
  without DP, and a straight-through hard sample for the codes was no better (two
  seeds). A code cannot be the conditional column: conditions on codes are met by
  rejection in ``sample``.
- **An exponential moving average of the generator** (``ema_decay``) is what samples.
  A GAN's generator oscillates around the discriminator's moving target, and under DP
  the discriminator moves noisily; averaging the generator's recent weights (Polyak
  averaging) is the cheapest stabiliser there is and costs no privacy (it is
  post-processing). On the heart data it raised the mean column fidelity from about
  0.73 to 0.88 without DP and from 0.63 to 0.86 at epsilon 10. The average lives in its
  own network (``gen_ema``) with its update count as a buffer, so it travels in the
  flat state; its decay is warmed up (``min(decay, (1 + t) / (10 + t))``) so a short
  study is not dominated by the random initial weights.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from opacus import GradSampleModule
from torch import nn
from torch.nn import functional as F

from ..encoding import MISSING
from ..schema import Schema
from .base import NON_NEGATIVE, POSITIVE, SHARE, SIZE, Generator, TrainingSpec


class _CondPrior(nn.Module):
    """Holds the DP frequencies of the conditional column as a buffer (no parameters).

    A buffer, not a parameter: it is data of the model (it travels in the flat state and
    FedAvg averages it, weighted by the sites' noisy counts) but no optimizer moves it.
    """

    freq: torch.Tensor

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("freq", torch.full((max(size, 1),), 1.0 / max(size, 1)))


class _GenNet(nn.Module):
    def __init__(self, z_dim: int, cond_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(z_dim + cond_dim, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, cond], dim=1))


class _GenEMA(nn.Module):
    """The moving average of the generator's weights and how many updates it has had.

    The count is a buffer so it travels with the weights (and FedAvg averages it: every
    site of a study makes the same number of steps per round, so it stays exact).
    """

    updates: torch.Tensor

    def __init__(self, net: _GenNet) -> None:
        super().__init__()
        self.net = copy.deepcopy(net)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.register_buffer("updates", torch.zeros(1))

    @torch.no_grad()
    def update(self, live: _GenNet, decay: float) -> None:
        t = float(self.updates[0])
        d = min(decay, (1.0 + t) / (10.0 + t))
        for avg, p in zip(self.net.parameters(), live.parameters(), strict=True):
            avg.mul_(d).add_(p.detach(), alpha=1.0 - d)
        self.updates += 1.0


class _DiscNet(nn.Module):
    def __init__(self, in_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.LeakyReLU(0.2),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.net(rows).squeeze(1)


class CTGAN(Generator):
    """Conditional tabular GAN; the discriminator is the DP-trained module."""

    name: ClassVar[str] = "ctgan"
    # Defaults chosen on the heart-disease data under DP (research/bench_generators.py,
    # pooled hospitals, 500 DP steps at q = 0.1, mean of 2 seeds; "AUROC / fidelity"):
    # - small networks (64 hidden units): DP noise is added to every parameter's
    #   gradient, so its norm grows with sqrt(#parameters) while the clipped signal does
    #   not; 128 units were no better at epsilon 3 and twice as slow;
    # - lr 2e-3 (the discriminator's, used by the shared trainer) and g_lr 1e-3: a noisy
    #   discriminator needs large steps to learn anything in a few hundred DP steps
    #   (lr 1e-3: fidelity 0.68 vs 0.77 at epsilon 3); a generator as fast as the
    #   discriminator chases its noise (g_lr 2e-3: 0.61 / 0.74 vs 0.85 / 0.83 at eps 10);
    # - fake_batch 64: about the expected real batch of the pooled data at q = 0.1 and
    #   within a small factor of a hospital's; 32 and 128 were both worse (128: 0.81 /
    #   0.80 vs 0.85 / 0.83 at epsilon 10): more fakes tilt each clipped sum towards
    #   "fake", fewer give the discriminator too little to compare;
    # - g_steps 1: two generator steps per private step overshot the noisy
    #   discriminator (0.67 / 0.76 at epsilon 10);
    # - bins 10: a tenth of the public range resolves the spikes (oldpeak 0) and modes of
    #   clinical numbers; 5 bins lost fidelity (0.80 vs 0.83 at epsilon 10);
    # - dropout 0: under DP the gradient noise already regularises the discriminator;
    #   0.25 cost 0.14 AUROC at epsilon 10;
    # - ema_decay 0.99: the cap of the warmed-up average (module docstring); in runs of
    #   a few hundred steps the warm-up, not the cap, sets the horizon.
    # No server momentum: the coordinator's FedAvgM step (study default 0.5) pushes the
    # averaged generator and discriminator past the average along last round's
    # direction, and a GAN's two networks are a game, not one loss going down. On the
    # four heart hospitals without DP (10 rounds x 20 epochs, seeds 0-1) federated
    # ctgan reached fidelity 0.74 / 0.72 and TSTR AUROC 0.40 / 0.70 with momentum 0.5,
    # 0.86 / 0.85 and 0.85 / 0.80 with plain FedAvg. Keeping each site's discriminator
    # local and averaging only the generators (MD-GAN, FedGAN) was no better than
    # averaging both (TSTR 0.84 / 0.75 / 0.76 against 0.87 / 0.84 / 0.84, seeds 0-2,
    # without momentum), so both are averaged.
    server_momentum: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {
        "cond_column": None,  # None: the schema's outcome if categorical, else the first
        "bins": 10,
        "z_dim": 32,
        "g_hidden": 64,
        "d_hidden": 64,
        "dropout": 0.0,
        "lr": 2e-3,
        "g_lr": 1e-3,
        "fake_batch": 64,
        "g_steps": 1,
        "ce_weight": 1.0,
        "tau": 0.2,
        "ema_decay": 0.99,
        "loss_bound": 10.0,
    }
    bounds: ClassVar[dict[str, Any]] = {
        "bins": SIZE, "z_dim": SIZE, "g_hidden": SIZE, "d_hidden": SIZE, "dropout": SHARE,
        "lr": POSITIVE, "g_lr": POSITIVE, "fake_batch": SIZE, "g_steps": SIZE,
        "ce_weight": NON_NEGATIVE, "tau": POSITIVE, "ema_decay": SHARE,
        "loss_bound": POSITIVE,
    }

    # -- construction ------------------------------------------------------------------
    def build(self) -> None:
        enc = self.encoder
        self._bins = int(self.hparams["bins"])
        self._num_idx = torch.tensor([b.start for b in enc.numeric_blocks], dtype=torch.long)
        self._cat_blocks = [(b.start, b.size) for b in enc.onehot_blocks]
        self._cat_idx = torch.tensor(
            [i for start, size in self._cat_blocks for i in range(start, start + size)],
            dtype=torch.long,
        )
        self._multi_idx = torch.tensor(
            [i for b in enc.multihot_blocks for i in range(b.start, b.stop)], dtype=torch.long
        )
        n_num, n_cat, n_multi = len(self._num_idx), len(self._cat_idx), len(self._multi_idx)
        # GAN-space layout: [offsets | bins (n_num x K) | categorical blocks | code bits]
        self._off = slice(0, n_num)
        self._bin = slice(n_num, n_num + n_num * self._bins)
        self._cat = slice(self._bin.stop, self._bin.stop + n_cat)
        self._mul = slice(self._cat.stop, self._cat.stop + n_multi)
        self._gan_dim = self._mul.stop

        self.cond_column = self._pick_cond_column(self.schema, self.hparams["cond_column"])
        if self.cond_column is None:
            self._cond_start, self._cond_size = 0, 0
            self._cond_local = 0  # offset of the cond block inside the GAN-space cat part
        else:
            block = enc.block(self.cond_column, "onehot")
            self._cond_start, self._cond_size = block.start, block.size
            self._cond_local = self._cat.start + sum(
                size for start, size in self._cat_blocks if start < block.start
            )
        cond_dim = self._cond_size
        self.generator_net = _GenNet(
            int(self.hparams["z_dim"]), cond_dim, int(self.hparams["g_hidden"]), self._gan_dim
        )
        self.generator_ema = _GenEMA(self.generator_net)
        self.discriminator = _DiscNet(
            self._gan_dim + cond_dim, int(self.hparams["d_hidden"]), float(self.hparams["dropout"])
        )
        self.cond_prior = _CondPrior(cond_dim)
        self._g_optimizer: torch.optim.Optimizer | None = None
        self._forced_cond: int | None = None

    @staticmethod
    def _pick_cond_column(schema: Schema, wanted: str | None) -> str | None:
        """The conditional column: asked for, else the outcome, else the first category."""
        if wanted is not None:
            column = schema.column(wanted)
            if not column.is_categorical or column.group:
                raise ValueError(
                    f"ctgan: cond_column {wanted!r} must be a categorical or binary column "
                    "(not numeric, not a code of a code set)"
                )
            return wanted
        if schema.outcome is not None:
            column = schema.column(schema.outcome.column)
            if column.is_categorical and not column.group:
                return column.name
        for column in schema.columns:
            if column.is_categorical and not column.group:
                return column.name
        return None

    def networks(self) -> dict[str, nn.Module]:
        return {
            "gen": self.generator_net,
            "gen_ema": self.generator_ema,
            "disc": self.discriminator,
            "cond": self.cond_prior,
        }

    def private_module(self) -> nn.Module:
        return self.discriminator

    # -- the DP statistics of the conditional column -----------------------------------
    def statistics_column(self) -> str | None:
        return self.cond_column

    def set_statistics(self, histogram: np.ndarray) -> None:
        """Store the noisy histogram as frequencies (uniform if it carries no mass)."""
        if self.cond_column is None:
            return
        hist = np.clip(np.asarray(histogram, dtype=float), 0.0, None)
        if hist.shape != (self._cond_size,):
            raise ValueError(
                f"ctgan: histogram of {self.cond_column!r} must have {self._cond_size} "
                f"cells, got shape {hist.shape}"
            )
        total = float(hist.sum())
        freq = hist / total if total > 0 else np.full(self._cond_size, 1.0 / self._cond_size)
        self.cond_prior.freq.copy_(torch.as_tensor(freq, dtype=torch.float32))

    def _draw_cond(self, n: int, rng: torch.Generator | None = None) -> torch.Tensor:
        """One-hot conditions drawn from the stored DP frequencies (or forced)."""
        if self._cond_size == 0:
            return torch.zeros(n, 0)
        if self._forced_cond is not None:
            idx = torch.full((n,), self._forced_cond, dtype=torch.long)
        elif n == 0:
            idx = torch.zeros(0, dtype=torch.long)
        else:
            freq = self.cond_prior.freq.clamp_min(0.0)
            if not bool(torch.isfinite(freq).all()) or float(freq.sum()) <= 0:
                freq = torch.ones_like(freq)
            idx = torch.multinomial(freq, n, replacement=True, generator=rng)
        return F.one_hot(idx, self._cond_size).float()

    # -- representation ----------------------------------------------------------------
    def _to_gan(self, encoded: torch.Tensor) -> torch.Tensor:
        """Encoded real rows -> GAN space (public bin grid + offset); no parameters."""
        n, k = encoded.shape[0], self._bins
        parts = []
        if len(self._num_idx):
            v = encoded[:, self._num_idx].clamp(-1.0, 1.0)
            b = ((v + 1.0) / 2.0 * k).floor().clamp(0, k - 1).long()
            center = -1.0 + (2.0 * b.float() + 1.0) / k
            parts.append(((v - center) * k).clamp(-1.0, 1.0))
            parts.append(F.one_hot(b, k).float().reshape(n, len(self._num_idx) * k))
        parts.append(encoded[:, self._cat_idx])
        parts.append(encoded[:, self._multi_idx])
        return torch.cat(parts, dim=1)

    def _activate(self, raw: torch.Tensor) -> torch.Tensor:
        """Generator output -> GAN space rows the discriminator reads (differentiable).

        Categories (bins, categorical blocks, code bits) are relaxed samples
        (Gumbel-softmax, binary Concrete) at temperature ``tau``.
        """
        n, k, tau = raw.shape[0], self._bins, float(self.hparams["tau"])
        parts = [torch.tanh(raw[:, self._off])]
        if len(self._num_idx):
            bins = raw[:, self._bin].reshape(n, len(self._num_idx), k)
            parts.append(
                F.gumbel_softmax(bins, tau=tau, hard=False, dim=-1).reshape(n, self._bin.stop
                                                                          - self._bin.start)
            )
        pos = self._cat.start
        for _, size in self._cat_blocks:
            parts.append(F.gumbel_softmax(raw[:, pos : pos + size], tau=tau, hard=False, dim=1))
            pos += size
        if len(self._multi_idx):
            logits = raw[:, self._mul]
            u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
            parts.append(torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau))
        return torch.cat(parts, dim=1)

    def _fake(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n generated rows in GAN space, their conditions and the raw output."""
        z = torch.randn(n, int(self.hparams["z_dim"]))
        cond = self._draw_cond(n)
        raw = self.generator_net(z, cond)
        return self._activate(raw), cond, raw

    def _real_cond(self, encoded: torch.Tensor) -> torch.Tensor:
        """A real row's condition is its own category of the conditional column."""
        return encoded[:, self._cond_start : self._cond_start + self._cond_size]

    # -- training ----------------------------------------------------------------------
    def per_sample_loss(self, module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Per-row BCE of real rows (label 1) then ``fake_batch`` fake rows (label 0).

        One forward pass over the concatenation, so Opacus sees one sample per row and
        clips each row's gradient; the fake rows are made without gradient to the
        generator (this is the discriminator's step).
        """
        n_fake = int(self.hparams["fake_batch"])
        with torch.no_grad():
            fake, fake_cond, _ = self._fake(n_fake)
        real = torch.cat([self._to_gan(batch), self._real_cond(batch)], dim=1)
        rows = torch.cat([real, torch.cat([fake, fake_cond], dim=1)], dim=0)
        logits = module(rows)
        labels = torch.cat([torch.ones(batch.shape[0]), torch.zeros(n_fake)])
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="none")

    def training_spec(self) -> TrainingSpec:
        """The discriminator trains privately at ``lr``; the generator takes ``g_steps``
        Adam steps at ``g_lr`` after each private step."""
        return TrainingSpec(
            lr=float(self.hparams["lr"]),
            learning_rates=(float(self.hparams["g_lr"]),),
            steps_per_batch=int(self.hparams["g_steps"]),
        )

    def begin_round(self, seed: int) -> None:
        """A fresh Adam for the generator each round (its moments are not in the state).

        Optimizer moments are not part of the flat state that FedAvg averages; a site
        restarting them each round is what every other weight-only federated optimizer
        does too.
        """
        self._g_optimizer = torch.optim.Adam(
            self.generator_net.parameters(), lr=float(self.hparams["g_lr"]), betas=(0.5, 0.9)
        )

    def after_private_step(self, private: nn.Module) -> None:
        """The generator's update(s): post-processing of the privatised discriminator.

        Uses only the generator's own samples and the discriminator; gradients are taken
        with ``torch.autograd.grad`` on the generator's parameters only, with Opacus'
        hooks disabled, so the discriminator's ``.grad`` and ``.grad_sample`` are left
        as the private step made them and no activations are recorded.
        """
        if self._g_optimizer is None:
            self.begin_round(self.seed)
        assert self._g_optimizer is not None
        params = [p for p in self.generator_net.parameters() if p.requires_grad]
        gsm = private if isinstance(private, GradSampleModule) else None
        if gsm is not None:
            gsm.disable_hooks()
        try:
            for _ in range(int(self.hparams["g_steps"])):
                n = int(self.hparams["fake_batch"])
                fake, cond, raw = self._fake(n)
                logits = private(torch.cat([fake, cond], dim=1))
                loss = F.binary_cross_entropy_with_logits(logits, torch.ones(n))
                if self._cond_size:
                    block = raw[:, self._cond_local : self._cond_local + self._cond_size]
                    loss = loss + float(self.hparams["ce_weight"]) * F.cross_entropy(
                        block, cond.argmax(dim=1)
                    )
                grads = torch.autograd.grad(loss, params)
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                self._g_optimizer.step()
                self._g_optimizer.zero_grad(set_to_none=True)
            self.generator_ema.update(self.generator_net, float(self.hparams["ema_decay"]))
        finally:
            if gsm is not None:
                gsm.enable_hooks()

    # -- sampling ----------------------------------------------------------------------
    @torch.no_grad()
    def generate_encoded(self, n: int, rng: torch.Generator) -> np.ndarray:
        k = self._bins
        z = torch.randn(n, int(self.hparams["z_dim"]), generator=rng)
        cond = self._draw_cond(n, rng)
        raw = self.generator_ema.net(z, cond)
        out = torch.zeros(n, self.encoder.dim)
        rows = torch.arange(n)
        if len(self._num_idx) and n:
            probs = F.softmax(raw[:, self._bin].reshape(n, -1, k), dim=-1).reshape(-1, k)
            b = torch.multinomial(probs, 1, generator=rng).reshape(n, -1).float()
            center = -1.0 + (2.0 * b + 1.0) / k
            value = center + torch.tanh(raw[:, self._off]) / k
            out[:, self._num_idx] = value.clamp(-1.0, 1.0)
        pos = self._cat.start
        for start, size in self._cat_blocks:
            if n:
                probs = F.softmax(raw[:, pos : pos + size], dim=1)
                picks = torch.multinomial(probs, 1, generator=rng).squeeze(1)
                out[rows, start + picks] = 1.0
            pos += size
        if len(self._multi_idx):
            out[:, self._multi_idx] = torch.bernoulli(
                torch.sigmoid(raw[:, self._mul]), generator=rng
            )
        return out.numpy()

    def sample(
        self,
        n: int,
        conditions: dict[str, Any] | None = None,
        seed: int | None = None,
        max_tries: int = 200,
        interventions: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Like the base ``sample``, but a condition on the conditional column is fed to
        the generator as its condition vector (so rare categories come at once rather
        than by rejection); the other conditions, and the generator's rare slips from its
        condition, are handled by the base class's rejection and its checks.
        """
        if interventions:  # the base class says why a GAN without a graph cannot
            return super().sample(n, seed=seed, interventions=interventions)
        conditions = conditions or {}
        forced: int | None = None
        if self.cond_column is not None and self.cond_column in conditions:
            value = self._parse_conditions({self.cond_column: conditions[self.cond_column]})[
                self.cond_column
            ]
            column = self.schema.column(self.cond_column)
            slots = [str(c) for c in self.encoder.categories(column)]
            forced = slots.index(MISSING if value is None else str(value))
        self._forced_cond = forced
        try:
            return super().sample(n, conditions=conditions, seed=seed, max_tries=max_tries)
        finally:
            self._forced_cond = None

