"""The one trainer every generator trains through, with or without DP-SGD.

DP-SGD here is Opacus' mechanism: per-sample gradients of the module that reads real
rows (``generator.private_module()``), each clipped to ``max_grad_norm``, summed, and
Gaussian noise of std ``noise_multiplier * max_grad_norm`` added; batches are drawn by
Poisson sampling at rate ``q`` (each row independently), which is what Opacus'
accountants assume. Every step is recorded in the site's ledger.

Two details matter for the guarantee:

- The loss handed to backward is the *sum* of per-sample losses and the per-sample
  gradients are taken in "sum" mode; the optimizer divides by the expected batch size.
  An empty Poisson batch then still makes a (pure noise) step. Skipping it would make
  the number of noisy releases depend on the data.
- The generator decides what else happens after each private step (a GAN's generator
  update); that code sees only the privatised module, so it is post-processing.

Opacus computes the same clipped sum in more than one way; the trainer picks the faster
of two exact ones (``pick_mode``): ``hooks`` (per-sample gradients materialised, then
clipped) and ``ghost`` (ghost clipping: per-sample gradient *norms* from activations and
backprops, then a second backward of the loss re-weighted by the clipping factors; no
per-sample gradient is ever stored). Both add the same noise to the same clipped sum,
so the mechanism, and what the ledger records, does not depend on the mode
(``tests/test_dp_modes.py`` checks one step of every generator noise for noise, and a
site's rounds with its ledger). The mode depends on the expected batch, hence on the
row count, but only the round's duration shows it, and a site sends no timings.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleModuleFastGradientClipping,
)
from torch.utils.data import TensorDataset

from .accountant import PrivacyLedger
from .backward import ghost_backward, gradient_anchors, hooks_backward
from .randomness import DPRandomness
from .secure_noise import SecureNoiseDPOptimizer, SecureNoiseGhostOptimizer

if TYPE_CHECKING:
    from ..generators.base import Generator


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD parameters for one round; the noise is calibrated by the site's budget."""

    noise_multiplier: float
    max_grad_norm: float = 1.0


@dataclass
class RoundStats:
    steps: int
    rows_seen: int
    seconds: float
    mean_loss: float  # local only: computed on private rows without noise

    @property
    def rows_per_second(self) -> float:
        return self.rows_seen / self.seconds if self.seconds > 0 else math.inf


#: Opacus' exact per-sample clipping modes the trainer chooses between.
MODES = ("hooks", "ghost")
#: Samples per step x private parameters above which ghost clipping is the faster mode.
#: Measured on this project's generators (tvae, ctgan, ddpm; heart and the MIMIC-III
#: demo; q = 1, 0.5, 0.3, 0.2 and 0.1) by ``simulations/benchmark_speed.py modes``:
#: hooks pay for materialising samples x parameters per-sample gradients, ghost
#: clipping for a second backward pass, so ghost wins once the per-sample gradients
#: are large. First set at 1.5M (ghost slower in 3 of 4 runs below 1M); since ghost's
#: first pass skips the weight gradients and its optimizer copies with ``clone``
#: (``backward.py``, ``secure_noise.py``), ghost was faster in all four same-session
#: comparisons at 0.84M (MIMIC TVAE, q = 0.1: 0.64-0.90 of hooks' time) and a tie at
#: 0.59M (heart TVAE, q = 0.1: 0.98 and 1.13), which stays with hooks; see docs/benchmark.md.
GHOST_CROSSOVER = 750_000


def private_parameters(module: torch.nn.Module) -> int:
    """Trainable parameters of the module that reads real rows."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def pick_mode(module: torch.nn.Module, samples_per_step: float) -> str:
    """The faster exact mode for this module and batch: ghost clipping once the
    per-sample gradients (samples per step x private parameters) pass
    ``GHOST_CROSSOVER``."""
    size = samples_per_step * private_parameters(module)
    return "ghost" if size >= GHOST_CROSSOVER else "hooks"


def samples_per_step(generator: Generator, width: int, expected_batch: float) -> float:
    """How many samples the private module sees in a step of ``expected_batch`` rows.

    A GAN's discriminator also sees its fake rows; asking the loss for one all-zero
    row (no real data, no gradient) tells how many samples it adds, for any generator.
    The draws it makes come from torch's global generator, which the trainer reseeds
    right after.
    """
    with torch.no_grad():
        n = int(generator.per_sample_loss(generator.private_module(),
                                          torch.zeros(1, width)).shape[0])
    return expected_batch + max(0, n - 1)


def poisson_loader(
    data: np.ndarray, sample_rate: float, generator: torch.Generator
) -> DPDataLoader:
    """Poisson batches over the rows: each row joins each batch with probability q.

    ``generator`` must be secret to the site: the amplification by subsampling that the
    accountant credits holds only if nobody else knows which rows joined a batch.
    """
    dataset = TensorDataset(torch.as_tensor(data, dtype=torch.float32))
    return DPDataLoader(dataset, sample_rate=sample_rate, generator=generator)


def train_round(
    generator: Generator,
    data: np.ndarray,
    *,
    epochs: int,
    sample_rate: float,
    dp: DPSettings | None,
    ledger: PrivacyLedger | None,
    randomness: DPRandomness,
    proximal_mu: float = 0.0,
    mode: str = "auto",
) -> RoundStats:
    """Train ``generator`` on encoded rows for ``epochs / sample_rate`` Poisson steps.

    With ``dp`` set, each step is a DP-SGD step recorded in ``ledger``; without it, the
    same batches train with plain Adam (the no-DP baseline of the benchmarks).

    With ``training_spec().iterate_ema > 0`` the round returns an exponential moving average
    of the private module's iterates instead of the last one: each iterate is already
    DP, so averaging is free post-processing, and it cancels much of the noise DP-SGD
    injected (De et al. 2022,
    "Unlocking high-accuracy differentially private image classification").

    ``proximal_mu`` adds FedProx's pull towards the round's starting (global) weights.
    Its gradient ``mu * (w - w_global)`` depends on no row, so under DP it is added
    *after* clipping and noising: it must not eat into the per-sample clipping budget,
    and Opacus would drop it anyway (it overwrites ``.grad`` from per-sample gradients).

    ``randomness`` feeds the Poisson sampler, the gradient noise and the model's own
    draws (a VAE's reparametrisation, a GAN's latent codes) from separate streams; it is
    secret to the site unless a test made it reproducible. The noise is Opacus'
    ``secure_mode`` noise (each value the sum of four Gaussians, halved), which closes
    the floating-point attacks on a single Gaussian draw; ``secure_noise`` draws it for
    all parameters in one call per step instead of five calls per parameter tensor.

    ``mode`` is Opacus' clipping mode (``"hooks"`` or ``"ghost"``); ``"auto"`` (the
    default) picks the faster with :func:`pick_mode`. The mode changes the time a step
    takes, never the noise, the clipping or the ledger.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError("sample_rate must be in (0, 1]")
    if mode not in ("auto", *MODES):
        raise ValueError(f"mode must be 'auto' or one of {MODES}, got {mode!r}")
    if dp is not None and mode == "auto":
        batch_rows = max(1.0, sample_rate * len(data))
        mode = pick_mode(generator.private_module(),
                         samples_per_step(generator, data.shape[1], batch_rows))
    torch.manual_seed(randomness.int_seed("model"))
    module = generator.private_module()
    expected_batch = max(1.0, sample_rate * len(data))
    loader = poisson_loader(data, sample_rate, randomness.torch("sampler"))
    spec = generator.training_spec()
    lr = spec.lr
    total_loss, total_rows, steps = 0.0, 0, 0
    start = time.perf_counter()
    if dp is not None:
        if ledger is None:
            raise ValueError("DP training needs the site's privacy ledger")
        ghost = mode == "ghost"
        if ghost:
            wrapped = GradSampleModuleFastGradientClipping(
                module, loss_reduction="sum", strict=True, max_grad_norm=dp.max_grad_norm,
                use_ghost_clipping=True,
            )
        else:
            wrapped = GradSampleModule(module, loss_reduction="sum", strict=True)
        # Same arguments in both modes: the ghost optimizer only skips the clipping that
        # its module already did, then adds the same noise and divides the same way.
        optimizer = (SecureNoiseGhostOptimizer if ghost else SecureNoiseDPOptimizer)(
            torch.optim.Adam(wrapped.parameters(), lr=lr),
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=int(round(expected_batch)),
            loss_reduction="mean",
            generator=randomness.torch("gradient-noise"),
            secure_mode=True,
        )
        # DPOptimizer scales by expected_batch_size (an int); keep the exact rate here.
        forward: torch.nn.Module = wrapped
    else:
        ghost = False
        optimizer = torch.optim.Adam(module.parameters(), lr=lr)
        forward = module
    anchors = [p.detach().clone() for p in module.parameters()] if proximal_mu > 0 else []

    def add_proximal() -> None:
        if not anchors:
            return
        for p, anchor in zip(module.parameters(), anchors, strict=True):
            if p.grad is not None:
                p.grad.add_(p.detach() - anchor, alpha=proximal_mu)

    wanted = gradient_anchors(module)  # what the DP backward passes take gradients of (backward.py)
    ema_decay = spec.iterate_ema
    params = list(module.parameters())
    ema = [p.detach().clone() for p in params] if ema_decay > 0 else []

    generator.begin_round(randomness.int_seed("model"))
    # Opacus' hooks fire on module outputs even though rows need no gradient; harmless.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    try:
        for _ in range(epochs):
            for (batch,) in loader:
                optimizer.zero_grad(set_to_none=True)
                losses = generator.per_sample_loss(forward, batch)
                if dp is None:
                    (losses.sum() / expected_batch).backward()
                elif ghost:
                    # Opacus' ghost-clipping loss: a backward for the per-sample norms,
                    # then one of the loss re-weighted by each sample's clipping factor.
                    ghost_backward(wrapped, optimizer, losses, wanted)  # type: ignore[arg-type]
                else:
                    hooks_backward(losses, wanted)
                if dp is None:
                    add_proximal()
                    optimizer.step()
                elif optimizer.pre_step():  # type: ignore[union-attr]
                    add_proximal()
                    optimizer.original_optimizer.step()  # type: ignore[union-attr]
                steps += 1
                if dp is not None:
                    ledger.record(dp.noise_multiplier, sample_rate, 1)  # type: ignore[union-attr]
                total_loss += float(losses.detach().sum())
                total_rows += int(batch.shape[0])
                generator.after_private_step(forward)
                if ema:
                    with torch.no_grad():
                        for avg, p in zip(ema, params, strict=True):
                            avg.mul_(ema_decay).add_(p.detach(), alpha=1.0 - ema_decay)
        if ema:
            with torch.no_grad():
                for avg, p in zip(ema, params, strict=True):
                    p.copy_(avg)
    finally:
        if dp is not None:
            wrapped.remove_hooks()
    seconds = time.perf_counter() - start
    return RoundStats(
        steps=steps,
        rows_seen=total_rows,
        seconds=seconds,
        mean_loss=total_loss / max(total_rows, 1),
    )


def dp_loss_report(
    generator: Generator,
    data: np.ndarray,
    *,
    sample_rate: float,
    noise_multiplier: float,
    ledger: PrivacyLedger,
    randomness: DPRandomness,
) -> float:
    """A loss figure a site may send: a subsampled Gaussian query, charged to the ledger.

    Each sampled row contributes ``(min(loss, B) / B, 1)``, a vector of L2 norm at most
    sqrt(2); both sums get Gaussian noise of std ``noise_multiplier * sqrt(2)``, so the
    release is exactly one step of the mechanism the ledger records at
    (noise_multiplier, sample_rate).
    """
    bound = float(generator.loss_bound)
    loader = poisson_loader(data, sample_rate, randomness.torch("sampler"))
    gen = randomness.torch("loss-report")
    module = generator.private_module()
    batch = next(iter(loader))[0]
    with torch.no_grad():
        losses = generator.per_sample_loss(module, batch).clamp(0.0, bound) / bound
    std = noise_multiplier * math.sqrt(2.0)
    noisy_sum = float(losses.sum()) + float(torch.normal(0.0, std, (1,), generator=gen))
    noisy_count = float(batch.shape[0]) + float(torch.normal(0.0, std, (1,), generator=gen))
    ledger.record(noise_multiplier, sample_rate, 1)
    return bound * noisy_sum / max(noisy_count, 1.0)
