"""A tabular diffusion model (TabDDPM-like) that trains under Opacus.

Why it is shaped this way:

- **Two diffusions, one denoiser.** Numeric columns (already scaled to [-1, 1] by the
  schema's public bounds) get Gaussian diffusion; every categorical block (categories,
  the missing slots of nullable columns, and each code of a code set as a two-way
  category) gets multinomial diffusion, which noises towards the uniform distribution
  over the block's own slots, so a noisy row is always a valid one-hot row. One MLP
  reads the noisy row and the timestep and predicts the Gaussian noise of the numeric
  part and the clean category of each block.
- **The denoiser is the private module**: it is the only network, and it reads real
  rows. Only ``nn.Linear`` and SiLU, for which Opacus computes exact per-sample
  gradients; no BatchNorm (it mixes rows). The timestep enters through a sinusoidal
  embedding computed outside any parameter, then Linear layers, so each row's
  gradient depends on that row alone.
- **One timestep per row**, drawn uniformly: the per-row loss is the MSE of the
  predicted noise (summed over numeric columns) plus, for the categories, the KL
  divergence between the true posterior q(x_{t-1} | x_t, x_0) and the model's
  q(x_{t-1} | x_t, x0_hat) (at t = 0 this is the negative log-likelihood of x_0), plus
  a cross-entropy on x0_hat. The cross-entropy is the hybrid loss of D3PM: under
  DP a few hundred noisy steps is all there is, and a direct x_0 target gives the
  categorical head a signal at every timestep, where the KL is tiny at large t.
- **Missing numeric values** keep the encoder's value (0, the midpoint) and are
  diffused like any other; the missing slot decides at decoding. Masking their loss
  would leave the denoiser untrained on a part of the state that sampling visits.
- **Short chain**: T = 100 with a cosine schedule; it keeps sampling of a thousand
  rows to well under a second on a CPU and is what the heart-disease benchmark found
  enough; the cosine schedule spends fewer steps near pure noise than a linear one,
  which matters with a short chain.
- Sampling clips the predicted clean numeric values to [-1, 1] (the public domain) at
  every step and samples each category from the model's posterior, so the returned
  rows are one-hot and conform to the schema once the ``TabularEncoder`` decodes them.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..encoding import _Z as GRID_Z
from .base import NON_NEGATIVE, POSITIVE, SHARE, SIZE, SMALL_SIZE, Bound, Generator
from .tvae import OutcomeConditioned, _CondPrior

_LOG_EPS = 1e-12


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (float) timesteps, shape [*t.shape, dim]; no parameters."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros(*t.shape, 1)], dim=-1)
    return emb


class _Denoiser(nn.Module):
    """MLP denoiser: noisy row + condition + timestep embedding -> noise and logits.

    ``cond`` one-hot columns at the end of the input are the clean condition (the
    outcome); besides entering the MLP they reach every output through ``skip``, a
    bias-free linear map started at zero (the TVAE's ``condition_skip``): a
    class-conditional offset per output that each row's gradient moves directly.
    """

    def __init__(self, dim: int, hidden: int, depth: int, t_dim: int, cond: int = 0) -> None:
        super().__init__()
        self.t_dim = t_dim
        self.cond = cond
        self.time = nn.Sequential(nn.Linear(t_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim + cond, hidden)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.SiLU(), nn.Linear(hidden, hidden)]
        layers.append(nn.SiLU())
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, dim)
        self.skip: nn.Linear | None = None
        if cond:
            self.skip = nn.Linear(cond, dim, bias=False)
            nn.init.zeros_(self.skip.weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(network output, the condition's direct offset), both [n, dim] (or [n, k,
        dim] for an input of k noisy copies of each row: one row's gradient still comes
        from its own slice, which is what per-sample clipping needs)."""
        h = self.inp(x) + self.time(timestep_embedding(t, self.t_dim))
        out = self.out(self.body(h))
        if self.skip is None:
            return out, torch.zeros_like(out)
        return out, self.skip(x[..., x.shape[-1] - self.cond :])


def _cosine_alpha_bar(steps: int, s: float = 0.008) -> torch.Tensor:
    """Cumulative signal level after each of ``steps`` steps (Nichol & Dhariwal)."""
    grid = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((grid + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f[1:] / f[0]
    betas = (1 - alpha_bar / torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]]))
    return torch.cumprod(1 - betas.clamp(max=0.999), dim=0)


def _linear_alpha_bar(steps: int) -> torch.Tensor:
    betas = torch.linspace(1e-4 * 1000 / steps, 0.02 * 1000 / steps, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas.clamp(max=0.999), dim=0)


class TabDDPM(OutcomeConditioned, Generator):
    """Gaussian + multinomial diffusion over encoded rows, with an MLP denoiser."""

    name: ClassVar[str] = "ddpm"
    # Defaults chosen on the heart-disease data under DP (research/bench_generators.py,
    # pooled hospitals, 500 DP steps at q = 0.1, mean of 2-4 seeds, and the federated
    # study of 4 hospitals):
    # - hidden 64, depth 2: DP noise is added to every parameter's gradient, so its norm
    #   grows with sqrt(#parameters) while the clipped signal does not; 64 units matched
    #   128 and 256 at epsilon 10, were no worse at epsilon 3, and train several times
    #   faster;
    # - lr 1e-2: a few hundred noisy DP steps need large Adam steps (1e-3 stalled at a
    #   column fidelity of 0.65-0.67; 2e-2 diverged); in the federated heart study
    #   (4 hospitals, 10 rounds of 20 full-batch steps) 1e-2 beat 5e-3 at epsilon 3
    #   (TSTR AUROC 0.58 vs 0.50, fidelity 0.79 vs 0.69): a site's full-batch steps get
    #   no amplification by subsampling, so each carries several times more noise than
    #   a central step at q = 0.1, and Adam's steps must be larger to get anywhere;
    # - ce_weight 1.0: the per-row gradient is clipped as a whole, so the weights of the
    #   loss terms set its direction; with 0.1 the numeric MSE dominated and the
    #   categorical columns (the outcome among them) drowned in the noise (TSTR AUROC at
    #   epsilon 3: 0.57 -> 0.70); with 0 (KL only) fidelity fell to 0.66-0.73;
    # - iterate_ema 0.9: the shared trainer returns the moving average of a round's DP
    #   iterates (free post-processing). It starts from the round's initial weights, so a
    #   decay near 1 freezes a short federated round (0.99 over a site's 20 steps keeps 82% of
    #   the start; federated AUROC fell to 0.45); 0.9 forgets the start within a round;
    # - code_weight 3.0: the loss terms (KL and cross-entropy) of each code of a code set
    #   are weighted 3x against the other columns'. A code is a rare bit whose loss is
    #   small, so in the clipped per-row gradient the numeric and categorical columns
    #   set the direction and the codes drown in the DP noise. On AMLSG (54 genes, 18
    #   sites, epsilon 3) 3.0 raised the gene frequency correlation from 0.81 / 0.92 to
    #   0.94 / 0.96 (two splits, in process) and from 0.82 to 0.95 in the real Flower
    #   study (five draws each: 0.95-0.96 vs 0.80-0.83); the co-occurrence sign
    #   agreement did not move (mean 0.58 over five draws either way); 6.0 was no
    #   better. Tables without codes are unaffected (docs/generators.md, "Code sets");
    # - steps 100, cosine: see the module docstring (speed of sampling, short chain).
    # - multiplicity 8: each row's loss is the mean over 8 draws of its timestep and
    #   noise (the copies enter the denoiser as [rows, 8, features], so one row's
    #   gradient is still its own, clipped once). One draw per row made the clipped
    #   per-row gradient mostly the noise of that draw; at epsilon 3 (heart, 4 sites,
    #   seeds 0-2) the worst seed's TSTR AUROC rose from 0.69 to 0.83 (1 -> 8), at 2x
    #   the training time; the run-to-run spread of the median stays about 0.04;
    # - numeric_scale: the numeric part is diffused as ``scale * encoded``; None picks
    #   it by encoding: 1 on the public-bounds scale, ``encoding._Z`` (2.33) on a
    #   quantile grid, whose normal scores then have unit variance, as the chain's
    #   terminal N(0, 1) has; there the denoiser predicts the noise beyond the prior's
    #   (``_eps_hat``; see "Spread" in docs/generators.md).
    # - condition_gain True: the condition's offsets on the categorical logits are
    #   multiplied by the TVAE's automatic gain (``OutcomeConditioned.automatic_gain``:
    #   half the categorical columns they feed, 1-20; a number sets it). Heart, 4
    #   sites, epsilon 3, reproducible noise, seeds 0-5: fidelity 0.901 -> 0.912, TSTR
    #   0.863 -> 0.885, detection 0.905 -> 0.887 (gain 1 -> 4).
    defaults: ClassVar[dict[str, Any]] = {
        "hidden": 64,
        "depth": 2,
        "t_dim": 32,
        "steps": 100,
        "schedule": "cosine",
        "lr": 1e-2,
        "ce_weight": 1.0,
        "code_weight": 3.0,
        "iterate_ema": 0.9,
        "loss_bound": 50.0,
        "numeric_scale": None,
        "condition": "outcome",
        "multiplicity": 8,
        "condition_gain": True,
    }
    bounds: ClassVar[dict[str, Any]] = {
        "hidden": SIZE, "depth": SMALL_SIZE, "t_dim": SIZE, "steps": Bound(2, 4097, integer=True),
        "lr": POSITIVE, "ce_weight": NON_NEGATIVE, "code_weight": NON_NEGATIVE,
        "iterate_ema": SHARE, "loss_bound": POSITIVE, "numeric_scale": POSITIVE,
        "multiplicity": SMALL_SIZE,
    }

    def build(self) -> None:
        enc = self.encoder
        T = int(self.hparams["steps"])
        schedule = str(self.hparams["schedule"])
        if schedule == "cosine":
            alpha_bar = _cosine_alpha_bar(T)
        elif schedule == "linear":
            alpha_bar = _linear_alpha_bar(T)
        else:
            raise ValueError(f"ddpm: schedule must be 'cosine' or 'linear', not {schedule!r}")
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        alpha = alpha_bar / prev
        beta = 1 - alpha
        self._T = T
        self._ab = alpha_bar.float()
        self._ab_prev = prev.float()
        self._alpha = alpha.float()
        # Gaussian posterior q(x_{t-1} | x_t, x_0): mean = c0 * x_0 + ct * x_t, var.
        self._c0 = (beta * prev.sqrt() / (1 - alpha_bar)).float()
        self._ct = ((1 - prev) * alpha.sqrt() / (1 - alpha_bar)).float()
        self._post_var = (beta * (1 - prev) / (1 - alpha_bar)).clamp(min=1e-20).float()

        self._num_idx = torch.tensor([b.start for b in enc.numeric_blocks], dtype=torch.long)
        scale = self.hparams["numeric_scale"]
        self._scale = float(scale) if scale is not None else (GRID_Z if enc.grid else 1.0)
        # On a grid the numeric part is ~N(0, 1), whose best noise prediction is
        # sqrt(1 - alpha_bar) * x_t: the denoiser predicts the rest (see defaults).
        self._prior_eps = bool(enc.grid)
        # the missing slot of each nullable numeric column (-1: never missing); on a grid
        # a missing value is diffused as a fresh N(0, 1) draw (see per_sample_loss)
        missing = []
        for b in enc.numeric_blocks:
            try:
                missing.append(enc.block(b.column, "missing").start + 1)
            except KeyError:
                missing.append(-1)
        self._missing_idx = torch.tensor(missing, dtype=torch.long)
        self._use_condition(self.hparams["condition"])
        cond = self._cond
        self.cond_prior = _CondPrior(max(cond[1] - cond[0], 1))
        # the condition is an input, not diffused
        self._onehot = [(b.start, b.size) for b in enc.onehot_blocks
                        if (b.start, b.stop) != cond]
        self._onehot_idx = torch.tensor(
            [i for start, size in self._onehot for i in range(start, start + size)],
            dtype=torch.long,
        )
        self._multi_idx = torch.tensor(
            [i for b in enc.multihot_blocks for i in range(b.start, b.stop)], dtype=torch.long
        )
        # Categorical groups: each one-hot block, then each code bit as a 2-way group.
        sizes = [size for _, size in self._onehot] + [2] * len(self._multi_idx)
        self._n_num = len(self._num_idx)
        self._n_cat = sum(sizes)
        self._kmax = max(sizes) if sizes else 1
        index = torch.zeros(len(sizes), self._kmax, dtype=torch.long)
        mask = torch.zeros(len(sizes), self._kmax, dtype=torch.bool)
        pos = 0
        for g, size in enumerate(sizes):
            index[g, :size] = torch.arange(pos, pos + size)
            mask[g, :size] = True
            pos += size
        self._gidx, self._gmask = index, mask
        self._gsize = torch.tensor(sizes, dtype=torch.float32).reshape(-1, 1)
        # Loss weight of each group: code bits get ``code_weight`` (see defaults).
        self._gweight = torch.tensor(
            [1.0] * len(self._onehot) + [float(self.hparams["code_weight"])] * len(
                self._multi_idx), dtype=torch.float32)
        self.denoiser = _Denoiser(
            self._n_num + self._n_cat,
            int(self.hparams["hidden"]),
            int(self.hparams["depth"]),
            int(self.hparams["t_dim"]),
            cond=cond[1] - cond[0],
        )

    def networks(self) -> dict[str, nn.Module]:
        if self.cond_column is None:
            return {"denoiser": self.denoiser}
        return {"denoiser": self.denoiser, "cond": self.cond_prior}

    # -- the condition (as the TVAE's: the outcome, drawn from its DP histogram) ------
    def _pick_condition(self, wanted: str | None) -> str | None:
        if wanted != "outcome" or self.schema.outcome is None:
            if wanted not in (None, "outcome"):
                raise ValueError("ddpm: condition must be 'outcome' or null")
            return None
        column = self.schema.column(self.schema.outcome.column)
        return column.name if column.is_categorical and not column.group else None

    def _condition(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[:, self._cond[0] : self._cond[1]]

    def private_module(self) -> nn.Module:
        return self.denoiser

    # -- layout helpers -----------------------------------------------------------------
    def _split(self, encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoded rows -> (numeric values, flat one-hot of all categorical groups)."""
        n = encoded.shape[0]
        bits = encoded[:, self._multi_idx]
        two_way = torch.stack([1 - bits, bits], dim=2).reshape(n, 2 * bits.shape[1])
        return encoded[:, self._num_idx], torch.cat([encoded[:, self._onehot_idx], two_way], 1)

    def _padded(self, flat: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[n, n_cat] -> [n, groups, kmax], pad slots set to ``fill``."""
        out = flat[:, self._gidx]
        return out.masked_fill(~self._gmask, fill)

    def _flat(self, padded: torch.Tensor) -> torch.Tensor:
        return padded[:, self._gmask]

    def _q_xt(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) for padded one-hot or probability ``x0``: mix with uniform."""
        ab = self._ab[t].reshape(-1, 1, 1)
        return (ab * x0 + (1 - ab) / self._gsize) * self._gmask

    def _posterior(self, xt: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_{t-1} | x_t, x_0) on padded groups, normalised; at t = 0 it is x_0 itself."""
        a = self._alpha[t].reshape(-1, 1, 1)
        abp = self._ab_prev[t].reshape(-1, 1, 1)
        like = a * xt + (1 - a) / self._gsize
        prior = abp * x0 + (1 - abp) / self._gsize
        unnorm = like * prior * self._gmask
        return unnorm / unnorm.sum(dim=2, keepdim=True).clamp_min(_LOG_EPS)

    def _x0_probs(self, logits_flat: torch.Tensor) -> torch.Tensor:
        return F.softmax(self._padded(logits_flat, fill=-1e9), dim=2) * self._gmask

    @staticmethod
    def _sample_groups(probs: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
        """One category per padded group (Gumbel-max on log probabilities)."""
        u = torch.rand(probs.shape, generator=rng).clamp(1e-10, 1 - 1e-10)
        scores = torch.log(probs.clamp_min(_LOG_EPS)) - torch.log(-torch.log(u))
        scores = scores.masked_fill(probs <= 0, -math.inf)
        return F.one_hot(scores.argmax(dim=2), probs.shape[2]).float()

    # -- training -----------------------------------------------------------------------
    def per_sample_loss(self, module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Each row's loss, averaged over ``multiplicity`` draws of its timestep and
        noise (see defaults); the denoiser reads the copies as [n, k, features]."""
        rows, k = batch.shape[0], int(self.hparams["multiplicity"])
        batch = batch.repeat_interleave(k, dim=0)
        n = batch.shape[0]
        t = torch.randint(0, self._T, (n,))
        x_num, x_cat = self._split(batch)
        x_num = x_num * self._scale
        if self._prior_eps and bool((self._missing_idx >= 0).any()):
            # A missing value's slot holds 0, a point mass at the median's score that
            # the denoiser would also pull present values towards (chol: 20% missing,
            # std ratio 0.79); a N(0, 1) draw is the prior's own and carries no signal.
            has = self._missing_idx >= 0
            miss = torch.zeros_like(x_num, dtype=torch.bool)
            miss[:, has] = batch[:, self._missing_idx[has]] > 0.5
            x_num = torch.where(miss, torch.randn_like(x_num), x_num)
        ab = self._ab[t].reshape(-1, 1)
        noise = torch.randn_like(x_num)
        num_t = ab.sqrt() * x_num + (1 - ab).sqrt() * noise
        x0 = self._padded(x_cat)
        xt = self._sample_groups(self._q_xt(x0, t), None) * self._gmask
        inputs = torch.cat([num_t, self._flat(xt), self._condition(batch)], 1)
        out, offset = module(inputs.reshape(rows, k, inputs.shape[1]),
                             t.float().reshape(rows, k))
        out, offset = out.reshape(n, out.shape[-1]), offset.reshape(n, offset.shape[-1])
        out = self._with_offset(out, offset)
        loss = (self._eps_hat(out, offset, num_t, t) - noise).pow(2).sum(dim=1)
        if self._n_cat:
            x0_hat = self._x0_probs(out[:, self._n_num :])
            q = self._posterior(xt, x0, t)
            p = self._posterior(xt, x0_hat, t)
            log_q = torch.log(q.clamp_min(_LOG_EPS))
            log_p = torch.log(p.clamp_min(_LOG_EPS))
            kl = ((q * (log_q - log_p)).sum(dim=2) * self._gweight).sum(dim=1)
            ce = -((x0 * torch.log(x0_hat.clamp_min(_LOG_EPS))).sum(dim=2)
                   * self._gweight).sum(dim=1)
            loss = loss + kl + float(self.hparams["ce_weight"]) * ce
        return loss.reshape(rows, k).mean(dim=1)

    def _with_offset(self, out: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The categorical logits get the condition's offset directly."""
        gain = self.automatic_gain(self.hparams["condition_gain"])
        return torch.cat([out[:, : self._n_num], out[:, self._n_num :]
                          + gain * offset[:, self._n_num :]], dim=1)

    def _eps_hat(self, out: torch.Tensor, offset: torch.Tensor, num_t: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
        """The predicted noise of the numeric part: the network's output, plus on a grid
        the noise prediction of the prior N(m_c, 1), ``sqrt(1 - ab) (x_t - sqrt(ab)
        m_c)`` with ``m_c`` the condition's offset, so a denoiser that learns nothing
        beyond it samples the grid's marginals (class by class) instead of the chain's
        clamps. Without a grid the offset is added to the output."""
        eps = out[:, : self._n_num]
        m = offset[:, : self._n_num]
        if not self._prior_eps:
            return eps + m
        ab = self._ab[t].reshape(-1, 1)
        return eps + (1 - ab).sqrt() * (num_t - ab.sqrt() * m)

    # -- sampling -----------------------------------------------------------------------
    def _draw_condition(self, n: int, rng: torch.Generator) -> torch.Tensor:
        size = self._cond[1] - self._cond[0]
        if size == 0:
            return torch.zeros(n, 0)
        freq = self.cond_prior.freq.clamp_min(0.0)
        if not bool(torch.isfinite(freq).all()) or float(freq.sum()) <= 0:
            freq = torch.ones_like(freq)
        idx = torch.multinomial(freq, n, replacement=True, generator=rng)
        return F.one_hot(idx, size).float()

    @torch.no_grad()
    def generate_encoded(self, n: int, rng: torch.Generator) -> np.ndarray:
        self.denoiser.eval()
        cond = self._draw_condition(n, rng)
        num = torch.randn(n, self._n_num, generator=rng)
        uniform = self._gmask.float() / self._gsize
        xt = self._sample_groups(uniform.expand(n, -1, -1), rng) * self._gmask
        for step in range(self._T - 1, -1, -1):
            t = torch.full((n,), step, dtype=torch.long)
            out, offset = self.denoiser(torch.cat([num, self._flat(xt), cond], dim=1),
                                        t.float())
            out = self._with_offset(out, offset)
            if self._n_num:
                ab = self._ab[step]
                eps = self._eps_hat(out, offset, num, t)
                x0 = ((num - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(
                    -self._scale, self._scale)
                num = self._c0[step] * x0 + self._ct[step] * num
                if step > 0:
                    num = num + self._post_var[step].sqrt() * torch.randn(
                        num.shape, generator=rng
                    )
            if self._n_cat:
                p = self._posterior(xt, self._x0_probs(out[:, self._n_num :]), t)
                xt = self._sample_groups(p, rng) * self._gmask
        self.denoiser.train()
        result = torch.zeros(n, self.encoder.dim)
        result[:, self._num_idx] = (num / self._scale).clamp(-1.0, 1.0)
        result[:, self._cond[0] : self._cond[1]] = cond
        flat = self._flat(xt)
        n_onehot = len(self._onehot_idx)
        result[:, self._onehot_idx] = flat[:, :n_onehot]
        if len(self._multi_idx):
            result[:, self._multi_idx] = flat[:, n_onehot + 1 :: 2]
        return result.numpy()
