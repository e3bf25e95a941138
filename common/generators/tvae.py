"""A tabular VAE (TVAE-like) that trains under Opacus.

Why it is shaped this way:

- Both encoder and decoder read real rows (the encoder directly, the decoder through
  the reconstruction loss), so the whole network is the private module.
- Only ``nn.Linear`` and ReLU: Opacus computes exact per-sample gradients for them; no
  BatchNorm (mixes rows, so per-sample gradients do not exist).
- Each numeric column has a learned output scale (TVAE's sigma), and sampling adds
  that much Gaussian noise to the decoder's mean. Without it the decoder's mean is all
  a sample gets, and a VAE's mean carries only the part of a column's variation the
  latent code explains: synthetic standard deviations were 16-60% of the real ones
  (issue 14). The log-scales are the weights of an ``nn.Linear(1, k)`` applied to a
  column of ones, not a bare ``nn.Parameter``: Opacus computes exact per-sample
  gradients for a Linear in every grad-sample mode, so DP-SGD clips and noises the
  scales like every other weight of the private module.
- The numeric terms of the loss are Gaussian negative log-likelihoods with those
  scales, times ``numeric_weight``: the weight sets how much of each clipped per-row
  gradient the numeric columns take (the categorical structure, the outcome among it,
  drowns in the DP noise if they take most of it) without moving the scale each
  column converges to (the weight multiplies the whole NLL, whose minimum over sigma
  is the residual standard deviation whatever the weight).
- Numeric outputs go through tanh to stay in the schema's [-1, 1] scaling, and their
  loss is masked where the value is missing, so the missing slot and the value do not
  fight.
- Sampling draws categories from the decoder's softmax rather than taking the argmax,
  which keeps rare categories rare instead of erasing them.
- Code sets (diagnoses, mutated genes) are independent Bernoulli outputs given the
  latent code; their co-occurrence is carried by the latent space.
- The decoder is conditioned on one categorical column (by default the schema's
  outcome): a conditional VAE. Under DP the association between the outcome and the
  other columns is what the noise erases first when it has to travel through the
  latent code; fed to the decoder directly, it is learnt by one small weight matrix.
  At sampling the condition is drawn from the frequencies of the site's one DP
  histogram release (``set_statistics``), which every site makes anyway (its sum is
  the DP row count), so the conditioning costs no privacy.
- The condition also reaches every output through one linear map added to the
  decoder's output (``condition_skip``): a class-conditional offset for each column,
  the structure of naive Bayes. Under DP at epsilon 3 the path through the hidden
  layers carried almost none of the outcome's association (the synthetic rows'
  univariate outcome AUROC of chest pain 0.53 against 0.77 real, thal 0.49 against
  0.76): its signal is spread over thousands of noised weights, where the direct map
  has a few hundred that each row's gradient moves directly. TSTR AUROC of the
  federated study at epsilon 3 rose from 0.71 / 0.74 / 0.73 to 0.88 / 0.81 / 0.84
  (seeds 0-2, issue 14). The map's categorical outputs are multiplied by a gain
  (``condition_gain``: half the categorical columns it feeds, 1 to 20): a row's loss
  sums one term per column, so the more columns, the larger its gradient and the
  smaller each weight's share after clipping, while the noise per weight stays; the
  gain gives the map's weights their share back. Federated at epsilon 3, reproducible
  noise, seeds 0-5: TCGA-BRCA Cox C-index median 0.577 -> 0.667 (gain 19), heart
  disease TSTR 0.850 -> 0.885 (gain 4) at the same fidelity (0.907 / 0.908). On the
  numeric values the gain stays 1: there it widened the spread (noisy class offsets add
  to a column's variance).
- On a survival table the time gets the same kind of direct path (``survival_skip``):
  a linear map from the row's other columns (one per event value,
  ``survival_by_event``: a death's time and a censoring time follow different
  covariates, TCGA's censoring being administrative) added to the time's output, and
  the encoder does not read the time. Otherwise the VAE reconstructs the time from a
  latent code that encoded the time itself, so no gradient asks the time to follow
  the covariates, and under DP the sampled time kept the covariates' link but not the
  event's: a Cox model fitted on those rows ranked real patients backwards (TCGA-BRCA
  C-index 0.40). The map's output is multiplied by the gain ``survival_skip``, which
  raises its share of each clipped per-row gradient (gain 5: C-index median 0.59-0.60;
  gain 2: 0.55). At sampling the time is drawn last, from the sampled other columns.
  The map reads each input's deviation from what the decoder expects for the row's
  event value (``centre_time_path``), so its noisy weights do not set the times' level.
  A schema without a categorical outcome but with a survival outcome is conditioned
  on the event.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import NON_NEGATIVE, POSITIVE, SHARE, SIZE, Generator

#: Largest automatic gain of the condition's direct map (the largest measured: TCGA-BRCA's
#: 38 binary columns; docs/generators.md).
MAX_CONDITION_GAIN = 20.0

class _CondPrior(nn.Module):
    """The DP frequencies of the conditioning column, a buffer (no parameters).

    A buffer travels in the flat state, and FedAvg's weighted mean of the sites'
    frequencies (weights: their DP row counts) is the federation's pooled frequency.
    """

    freq: torch.Tensor

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("freq", torch.full((size,), 1.0 / size))


def frequencies(histogram: np.ndarray, size: int, who: str) -> np.ndarray:
    """A noisy histogram as frequencies: negatives clipped, uniform if it has no mass."""
    hist = np.clip(np.asarray(histogram, dtype=float), 0.0, None)
    if hist.shape != (size,):
        raise ValueError(f"{who}: the condition's histogram must have {size} cells, "
                         f"got shape {hist.shape}")
    total = float(hist.sum())
    return (hist / total if total > 0 else np.full(size, 1.0 / size)).astype(np.float32)


class OutcomeConditioned:
    """The DP statistics of a generator conditioned on the outcome column (TVAE, ddpm):
    the site's one noisy histogram of ``cond_column`` (``Generator.statistics_column``)
    kept as frequencies in ``cond_prior``, from which conditions are drawn. Mixed in
    before ``Generator``; the class calls ``_use_condition`` (which sets ``cond_column``
    and ``_cond``, the column's slots in the encoded row) and sets ``cond_prior``."""

    name: ClassVar[str]
    cond_column: str | None
    cond_prior: _CondPrior
    _cond: tuple[int, int]

    def _use_condition(self, wanted: str | None) -> None:
        """Set ``cond_column`` (the family's own ``_pick_condition``) and ``_cond``, its
        slots in the encoded row ((0, 0) without a condition)."""
        self.cond_column = self._pick_condition(wanted)  # type: ignore[attr-defined]
        self._cond = (0, 0)
        if self.cond_column is not None:
            block = self.encoder.block(self.cond_column, "onehot")  # type: ignore[attr-defined]
            self._cond = (block.start, block.stop)

    def statistics_column(self) -> str | None:
        return self.cond_column

    def automatic_gain(self, chosen: bool | float) -> float:
        """The gain of the condition's direct map on the categorical outputs: ``chosen``
        if a number, else (True) half the number of categorical columns the map feeds,
        between 1 and ``MAX_CONDITION_GAIN``. A row's loss sums one term per column, so
        the more columns, the larger its gradient and the smaller each weight's share
        after clipping, while the DP noise per weight stays: the gain gives the map's
        weights their share back (docs/generators.md)."""
        if chosen is not True:
            return float(chosen)
        fed = sum(1 for c in self.schema.columns  # type: ignore[attr-defined]
                  if c.is_categorical and not c.group and c.name != self.cond_column)
        return float(min(MAX_CONDITION_GAIN, max(1.0, fed / 2)))

    def set_statistics(self, histogram: np.ndarray) -> None:
        """Keep the site's noisy histogram as frequencies (uniform if it has no mass)."""
        if self.cond_column is None:
            return
        self.cond_prior.freq.copy_(torch.as_tensor(
            frequencies(histogram, self._cond[1] - self._cond[0], self.name)))


class _LogScale(nn.Module):
    """Per-column log output scales, as a Linear on a column of ones (see module doc).

    ``forward(n)`` gives an (n, k) tensor whose every row is the k log-scales: the
    per-sample gradient of row i is the gradient of row i's loss alone, which is what
    Opacus needs to clip it.
    """

    def __init__(self, columns: int, init_sigma: float) -> None:
        super().__init__()
        self.weight = nn.Linear(1, columns, bias=False)
        nn.init.constant_(self.weight.weight, float(np.log(init_sigma)))

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(like.shape[0], 1, dtype=like.dtype, device=like.device)
        return self.weight(ones).clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)

    def value(self) -> torch.Tensor:
        """The k log-scales, for sampling."""
        return self.weight.weight[:, 0].clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)


#: Starting scales (``numeric_sigma: None``): on the public-bounds scale, and on a
#: quantile grid's normal scores (marginal std 0.43 there).
BOUNDS_SIGMA, GRID_SIGMA = 0.15, 0.4

#: Bounds of a learned numeric scale on the [-1, 1] axis: 0.01 (TVAE's floor) to 1 (a
#: column spread over its whole public range).
LOG_SIGMA_MIN, LOG_SIGMA_MAX = float(np.log(0.01)), 0.0


class _VAENet(nn.Module):
    """Encoder reads the whole row; decoder reads the latent code and the condition."""

    def __init__(
        self, dim: int, hidden: int, latent: int, cond: tuple[int, int] = (0, 0),
        numeric: int = 0, init_sigma: float = 0.5, skip: bool = False,
        time_slots: tuple[int, ...] = (), time_inputs: tuple[int, ...] = (),
        time_gain: float = 1.0, time_split: tuple[int, int] = (0, 0),
        cond_gain: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.cond = cond
        self.register_buffer("cond_gain", torch.ones(dim) if cond_gain is None else cond_gain,
                             persistent=False)
        self.time_gain = time_gain
        # the event's one-hot slots: one time map per event value (empty: one map)
        self.time_split = time_split
        copies = max(time_split[1] - time_split[0], 1)
        # survival times' direct path from the row's other columns (see TVAE's
        # docstring): zero at the start, like the condition's
        self.time_skip: nn.Linear | None = None
        if time_slots and time_inputs:
            self.time_skip = nn.Linear(copies * len(time_inputs), len(time_slots), bias=False)
            nn.init.zeros_(self.time_skip.weight)
        self.register_buffer("time_slots", torch.tensor(time_slots, dtype=torch.long),
                             persistent=False)
        self.register_buffer("time_inputs", torch.tensor(time_inputs, dtype=torch.long),
                             persistent=False)
        # what the model expects of the time path's inputs, per event value (see
        # TVAE.centre_time_path); the path reads each input's deviation from it
        self.register_buffer("time_centre", torch.zeros(copies, len(time_inputs)),
                             persistent=False)
        # the condition's direct path to every output (see TVAE's docstring); zero at
        # the start, so an untrained model is the plain decoder
        self.skip: nn.Linear | None = None
        if skip and cond[1] > cond[0]:
            self.skip = nn.Linear(cond[1] - cond[0], dim, bias=False)
            nn.init.zeros_(self.skip.weight)
        self.encoder = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.mu = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(
            nn.Linear(latent + cond[1] - cond[0], hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, dim),
        )
        self.log_sigma = _LogScale(max(numeric, 1), init_sigma)

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.encoder(x if self.time_skip is None else x.index_fill(1, self.time_slots, 0.0))
        mu, logvar = self.mu(h), self.logvar(h).clamp(-10.0, 10.0)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        if self.cond[1] > self.cond[0]:
            z = torch.cat([z, x[:, self.cond[0] : self.cond[1]]], dim=1)
        return self.with_times(self.decode(z), x), mu, logvar, self.log_sigma(x)

    def with_times(self, out: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """Add to each survival time's output the linear map of the row's other columns
        (real ones in training, the sampled ones at sampling)."""
        if self.time_skip is None:
            return out
        feats = row[:, self.time_inputs]
        if self.time_split[1] > self.time_split[0]:
            c = row[:, self.time_split[0] : self.time_split[1]]
            feats = feats - c @ self.time_centre
            feats = (feats[:, None, :] * c[:, :, None]).reshape(
                row.shape[0], c.shape[1] * feats.shape[1])
        else:
            feats = feats - self.time_centre[0]
        return out.index_add(1, self.time_slots, self.time_gain * self.time_skip(feats))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder output for latent codes with the condition's one-hot appended."""
        out = self.decoder(z)
        if self.skip is not None:
            out = out + self.cond_gain * self.skip(
                z[:, z.shape[1] - (self.cond[1] - self.cond[0]) :])
        return out


class TVAE(OutcomeConditioned, Generator):
    """Tabular VAE; the default generator (robust under DP noise, fast on a CPU)."""

    name: ClassVar[str] = "tvae"
    # Defaults tuned for DP on hospital-sized tables (hundreds of rows per site), measured
    # on the four heart-disease hospitals (docs/generators.md has the runs):
    # - small networks: DP noise is added to every parameter, so its norm grows with
    #   sqrt(#parameters) while the clipped signal does not;
    # - numeric_sigma 0.5 (TVAE uses 0.1): every per-row gradient is clipped to the same
    #   norm, and with 0.1 the numeric reconstruction terms dominate its direction, so
    #   the categorical structure (the outcome among it) drowns in the noise;
    # - kl_weight 0.3: with the full KL term the decoder learned the marginals and
    #   ignored the latent code (posterior collapse), so associations between columns
    #   were lost even without DP (TSTR AUROC 0.41 without DP at kl_weight 1);
    # - iterate_ema 0.9: a round returns the moving average of its DP iterates (free
    #   post-processing that cancels part of the noise);
    # - a larger learning rate than TVAE's, as usual for DP training with large batches;
    # - condition "outcome": the decoder reads the schema's outcome (a conditional VAE);
    #   median TSTR AUROC over five seeds rose from 0.67 to 0.77 at epsilon 10 and from
    #   0.65 to 0.68 at epsilon 3, at the same fidelity.
    # - numeric_sigma is the learned scales' starting value, numeric_weight the share of
    #   the loss the numeric columns take (see the module docstring); started at 0.5
    #   the scales had not come down within a study's 200 noisy steps (synthetic
    #   standard deviations 1.3-2.4 times the real ones at weight 0.1-0.25);
    #   None picks it by encoding: 0.15 on the public-bounds scale, ``GRID_SIGMA`` on a
    #   quantile grid's normal scores, where each column's marginal std is 0.43;
    # - condition_skip: the condition's direct path to the outputs (module docstring):
    #   True is on at the automatic gain, a number that gain, False off;
    # - survival_skip (gain, 0 = off) and survival_by_event: the survival time's direct
    #   path (module docstring); no effect on a table without a survival time.
    # - federated_adam_eps 0.3 (a site's round without DP only; DP-SGD and a central
    #   fit keep torch's 1e-8): a default Adam step is about lr times the sign of each
    #   coordinate's gradient, whatever its size, so FedAvg of sites that each took 20
    #   such steps moves a weight by a row-weighted vote of the sites' gradient signs
    #   and lands near the weighted median of the sites' optima, not the pooled one.
    #   Heart disease's missing slots showed it: cholesterol is missing in all of
    #   Switzerland's rows and in 0-28% elsewhere (22% pooled); the federated no-DP
    #   model gave 8%, unrelated to the outcome, and a logistic regression fitted on it
    #   misread the real holdout's missing values (TSTR 0.804 on seed 1; 0.853 without
    #   the missing indicators). With epsilon 0.3 a gradient below 0.3 makes a step in
    #   proportion to its size, so the average follows the pooled gradient: seeds 0-5,
    #   reproducible noise, TSTR 0.872 -> 0.903, fidelity 0.899 -> 0.937. It also slows
    #   the small gradients of the hidden layers: on AMLSG a central fit (600 steps)
    #   lost the NPM1-FLT3 co-occurrence with it (gap 0.32 -> 0.02), hence sites only,
    #   where the vote is (docs/generators.md). Under DP the noise sets Adam's scale.
    defaults: ClassVar[dict[str, Any]] = {
        "hidden": 32,
        "latent": 8,
        "lr": 1e-2,
        "numeric_sigma": None,
        "numeric_weight": 0.25,
        "kl_weight": 0.3,
        "iterate_ema": 0.9,
        "loss_bound": 100.0,
        "condition": "outcome",
        "condition_skip": True,
        "survival_skip": 5.0,
        "survival_by_event": True,
        "federated_adam_eps": 0.3,
    }
    bounds: ClassVar[dict[str, Any]] = {
        "hidden": SIZE, "latent": SIZE, "lr": POSITIVE, "numeric_sigma": POSITIVE,
        "numeric_weight": NON_NEGATIVE, "kl_weight": NON_NEGATIVE, "iterate_ema": SHARE,
        "loss_bound": POSITIVE, "survival_skip": NON_NEGATIVE,
        "federated_adam_eps": POSITIVE,
    }

    def build(self) -> None:
        enc = self.encoder
        self._use_condition(self.hparams["condition"])
        cond = self._cond
        numeric = enc.numeric_blocks
        gain = float(self.hparams["survival_skip"])
        time_slots, time_inputs = self._time_path() if gain > 0 else ((), ())
        self.net = _VAENet(
            enc.dim, int(self.hparams["hidden"]), int(self.hparams["latent"]), cond,
            numeric=len(numeric), init_sigma=self._init_sigma(),
            skip=bool(self.hparams["condition_skip"]),
            cond_gain=self._cond_gain(),
            time_slots=time_slots, time_inputs=time_inputs,
            time_gain=gain, time_split=self._event_slots() if time_slots else (0, 0),
        )
        self.cond_prior = _CondPrior(max(cond[1] - cond[0], 1))

        self._num_idx = torch.tensor([b.start for b in numeric], dtype=torch.long)
        present = []
        for b in numeric:
            try:
                present.append(enc.block(b.column, "missing").start)
            except KeyError:
                present.append(-1)
        self._present_idx = torch.tensor(present, dtype=torch.long)
        # the condition is the decoder's input, not something it must reconstruct
        self._cat_blocks = [(b.start, b.stop) for b in enc.onehot_blocks
                            if (b.start, b.stop) != cond]
        self._multi_blocks = [(b.start, b.stop) for b in enc.multihot_blocks]

    def condition_gain(self) -> float:
        """The condition's direct map's gain on the categorical outputs (``condition_skip``:
        True the automatic gain, a number that gain)."""
        return self.automatic_gain(self.hparams["condition_skip"])

    def _cond_gain(self) -> torch.Tensor:
        """The gain per output slot: ``condition_gain`` on the categorical and code
        outputs, 1 on the numeric values (a gain there widened their spread: the noisy
        class offsets of a column add to its variance)."""
        gain = torch.full((self.encoder.dim,), self.condition_gain())
        gain[[b.start for b in self.encoder.numeric_blocks]] = 1.0
        return gain

    def begin_round(self, seed: int) -> None:
        self.centre_time_path()

    def after_private_step(self, private: nn.Module) -> None:
        self.centre_time_path()

    @torch.no_grad()
    def centre_time_path(self) -> None:
        """Set the time path's centre: for each event value, the row the decoder expects
        at the latent code 0 (category probabilities, numeric means), read at the
        path's inputs.

        The path then adds ``W (x - centre)``, which averages to about 0 over the rows
        of an event value, so the level of each event's times is the decoder's, not a
        sum of the path's DP-noised weights: with ``W x`` every weight of a common
        category, and the event's own slot, acted as a bias, and their noise moved the
        deaths' median time between 284 and 5,562 days (real 1,280) from run to run.
        A function of the current weights only (post-processing), recomputed after
        every step and before sampling."""
        net = self.net
        if net.time_skip is None:
            return
        if net.time_split[1] > net.time_split[0]:
            size = net.time_split[1] - net.time_split[0]
            events = torch.eye(size)
            rows = torch.zeros(size, self.encoder.dim)
            rows[:, net.time_split[0] : net.time_split[1]] = events
        else:
            rows = torch.zeros(1, self.encoder.dim)
        cond = None
        if self.cond_column is not None:
            cond = rows[:, self._cond[0] : self._cond[1]]
            if (self._cond[0], self._cond[1]) != tuple(net.time_split):
                cond = self.cond_prior.freq.expand(rows.shape[0], -1)
        z = torch.zeros(rows.shape[0], int(self.hparams["latent"]))
        out = net.decode(z if cond is None else torch.cat([z, cond], dim=1))
        expected = self._expected_row(out)
        if cond is not None:
            expected[:, self._cond[0] : self._cond[1]] = cond
        if net.time_split[1] > net.time_split[0]:
            expected[:, net.time_split[0] : net.time_split[1]] = rows[
                :, net.time_split[0] : net.time_split[1]]
        net.time_centre.copy_(expected[:, net.time_inputs])

    def _expected_row(self, out: torch.Tensor) -> torch.Tensor:
        """The encoded row's expectation under the decoder's output ``out``."""
        expected = torch.zeros_like(out)
        if len(self._num_idx):
            expected[:, self._num_idx] = torch.tanh(out[:, self._num_idx])
        for start, stop in self._cat_blocks:
            expected[:, start:stop] = F.softmax(out[:, start:stop], dim=1)
        for start, stop in self._multi_blocks:
            expected[:, start:stop] = torch.sigmoid(out[:, start:stop])
        return expected

    def _time_path(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(the survival times' value slots, the slots of every other column): what
        the times' direct path reads and writes. A time's missing slots are neither."""
        times = {t for t, _ in self.schema.survival_pairs}
        slots = tuple(b.start for b in self.encoder.numeric_blocks if b.column in times)
        inputs = tuple(i for b in self.encoder.blocks if b.column not in times
                       for i in range(b.start, b.stop))
        return slots, inputs

    def _event_slots(self) -> tuple[int, int]:
        """The first survival pair's event slots, if its time maps are split by event."""
        event = self._survival_event()
        if not self.hparams["survival_by_event"] or event is None:
            return (0, 0)
        block = self.encoder.block(event, "onehot")
        return (block.start, block.stop)

    def _init_sigma(self) -> float:
        """The learned scales' start (see ``defaults``)."""
        if self.hparams["numeric_sigma"] is not None:
            return float(self.hparams["numeric_sigma"])
        return GRID_SIGMA if self.encoder.grid else BOUNDS_SIGMA

    def _pick_condition(self, wanted: str | None) -> str | None:
        """The conditioning column: "outcome" (the schema's, if categorical), a name, or none."""
        if not wanted:
            return None
        if wanted == "outcome":
            outcome = self.schema.outcome
            if outcome is None:
                return self._survival_event()
            column = self.schema.column(outcome.column)
            return column.name if column.is_categorical and not column.group else None
        try:
            column = self.schema.column(wanted)
        except KeyError:
            raise ValueError(
                f"tvae: condition {wanted!r} is not a column of the schema; name a "
                "categorical column, \"outcome\" or null"
            ) from None
        if not column.is_categorical or column.group:
            raise ValueError(
                f"tvae: condition {wanted!r} must be a categorical or binary column "
                "(not numeric, not a code of a code set)"
            )
        return column.name

    def _survival_event(self) -> str | None:
        """A schema without a label but with a survival outcome: its event column (the
        first pair's), the outcome a survival analysis reads."""
        for _, event in self.schema.survival_pairs:
            column = self.schema.column(event)
            if column.is_categorical and not column.group:
                return column.name
        return None

    def networks(self) -> dict[str, nn.Module]:
        if self.cond_column is None:
            return {"vae": self.net}
        return {"vae": self.net, "cond": self.cond_prior}

    def _draw_condition(self, n: int, rng: torch.Generator) -> torch.Tensor:
        size = self._cond[1] - self._cond[0]
        if n == 0:
            return torch.zeros(0, size)
        freq = self.cond_prior.freq.clamp_min(0.0)
        if not bool(torch.isfinite(freq).all()) or float(freq.sum()) <= 0:
            freq = torch.ones_like(freq)
        idx = torch.multinomial(freq, n, replacement=True, generator=rng)
        return F.one_hot(idx, size).float()

    def private_module(self) -> nn.Module:
        return self.net

    def per_sample_loss(self, module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        out, mu, logvar, log_sigma = module(batch)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
        loss = float(self.hparams["kl_weight"]) * kl
        if len(self._num_idx):
            target = batch[:, self._num_idx]
            pred = torch.tanh(out[:, self._num_idx])
            mask = torch.ones_like(target)
            has = self._present_idx >= 0
            if bool(has.any()):
                mask[:, has] = batch[:, self._present_idx[has]]
            nll = (target - pred).pow(2) / (2 * torch.exp(2 * log_sigma)) + log_sigma
            loss = loss + float(self.hparams["numeric_weight"]) * (mask * nll).sum(dim=1)
        for start, stop in self._cat_blocks:
            logp = F.log_softmax(out[:, start:stop], dim=1)
            loss = loss - (batch[:, start:stop] * logp).sum(dim=1)
        for start, stop in self._multi_blocks:
            loss = loss + F.binary_cross_entropy_with_logits(
                out[:, start:stop], batch[:, start:stop], reduction="none"
            ).sum(dim=1)
        return loss

    @torch.no_grad()
    def generate_encoded(self, n: int, rng: torch.Generator) -> np.ndarray:
        self.centre_time_path()
        self.net.eval()
        z = torch.randn(n, int(self.hparams["latent"]), generator=rng)
        cond = None
        if self.cond_column is not None:
            cond = self._draw_condition(n, rng)
            z = torch.cat([z, cond], dim=1)
        out = self.net.decode(z)
        self.net.train()
        result = torch.zeros_like(out)
        if cond is not None:
            result[:, self._cond[0] : self._cond[1]] = cond
        noise = torch.zeros(n, len(self._num_idx))
        if len(self._num_idx):
            sigma = torch.exp(self.net.log_sigma.value())
            noise = torch.randn(n, len(self._num_idx), generator=rng) * sigma
            # the decoder's clip to [-1, 1] keeps samples inside the public bounds
            result[:, self._num_idx] = torch.tanh(out[:, self._num_idx]) + noise
        for start, stop in self._cat_blocks:
            probs = F.softmax(out[:, start:stop], dim=1)
            picks = torch.multinomial(probs, 1, generator=rng).squeeze(1)
            result[torch.arange(n), start + picks] = 1.0
        for start, stop in self._multi_blocks:
            result[:, start:stop] = torch.bernoulli(torch.sigmoid(out[:, start:stop]),
                                                    generator=rng)
        if len(self._num_idx) and self.net.time_skip is not None:
            # the times last: their direct path reads the row's sampled other columns
            out = self.net.with_times(out, result)
            result[:, self._num_idx] = torch.tanh(out[:, self._num_idx]) + noise
        return result.numpy()
