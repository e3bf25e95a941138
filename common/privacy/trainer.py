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

The same clipped sum can be computed in more than one way; the trainer picks the
fastest of three exact ones (``pick_mode``): Opacus' ``hooks`` (per-sample gradients
materialised, then clipped) and ``ghost`` (ghost clipping: per-sample gradient *norms*
from activations and backprops, then a second backward of the loss re-weighted by the
clipping factors), and ``bookkeeping`` (book-keeping clipping, ``bookkeeping.py``: the
norms as ghost clipping takes them, then the clipped sum as a product of the kept
activations and re-weighted output gradients, with no second backward), which it
takes wherever the module's layers allow it. All add the same noise to the same clipped
sum, so the mechanism, and what the ledger records, does not depend on the mode
(``tests/test_dp_modes.py`` checks one step of every generator noise for noise, and a
site's rounds with its ledger). Under ghost/hooks the mode depends on the expected
batch, hence on the row count, but only the round's duration shows it, and a site
sends no timings.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
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
from .bookkeeping import BookKeeping, unsupported_layers
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


#: The exact per-sample clipping modes the trainer chooses between: Opacus' ``hooks``
#: and ``ghost``, and ``bookkeeping`` (``bookkeeping.py``), the one ``pick_mode`` takes
#: wherever it applies.
MODES = ("hooks", "ghost", "bookkeeping")
#: Samples per step x private parameters above which ghost clipping is faster than
#: hooks, for a module book-keeping cannot clip (none of the bundled generators).
#: Measured on this project's generators (tvae, ctgan, ddpm; heart and the MIMIC-III
#: demo; q = 1, 0.5, 0.3, 0.2 and 0.1) by ``simulations/benchmark_speed.py modes``:
#: hooks pay for materialising samples x parameters per-sample gradients, ghost
#: clipping for a second backward pass, so ghost wins once the per-sample gradients
#: are large (ghost faster in all four same-session comparisons at 0.84M, a tie at
#: 0.59M); see docs/benchmark.md.
GHOST_CROSSOVER = 750_000


def private_parameters(module: torch.nn.Module) -> int:
    """Trainable parameters of the module that reads real rows."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def pick_mode(module: torch.nn.Module, samples_per_step: float) -> str:
    """The fastest exact mode for this module and batch.

    Book-keeping clipping wherever every trainable layer is ``nn.Linear`` or has an
    Opacus grad sampler: it is a plain backward plus the clipped products, and it took
    the least CPU time in every cell measured (``benchmark_speed.py modes``: tvae,
    ctgan and ddpm on heart and MIMIC at 0.6M to 33M samples x parameters, and the
    drill's small networks at 6-62 rows a step; benchmarks/speed-s3), and the least
    wall time in all but one (small ctgan at 6 rows: 1.51 against hooks' 1.41 of a
    no-DP step, CPU 1.22 against 1.41). Otherwise ghost clipping once the
    per-sample gradients (samples per step x private parameters) pass
    ``GHOST_CROSSOVER``, else hooks.
    """
    if not unsupported_layers(module):
        return "bookkeeping"
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


class _DPStep:
    """One DP-SGD step's machinery in one of ``MODES``: what the loss runs through, the
    backward that leaves the clipped sum, and Opacus' optimizer that noises it.

    Every mode hands the same optimizer arguments (noise multiplier, clipping bound,
    expected batch, the site's ``gradient-noise`` stream): the ghost and book-keeping
    modes put the clipped sum in ``.grad`` themselves, and the ghost optimizer then only
    adds the noise and divides, exactly as the hooks optimizer does after clipping.
    """

    def __init__(self, mode: str, module: torch.nn.Module, dp: DPSettings, lr: float,
                 expected_batch: float, randomness: DPRandomness) -> None:
        self.mode = mode
        self.wanted = gradient_anchors(module)  # what Opacus' backward passes need (backward.py)
        self.keeper: BookKeeping | None = None
        self.wrapped: GradSampleModule | None = None
        if mode == "bookkeeping":
            self.keeper = BookKeeping(module, dp.max_grad_norm)
            self.forward = module
        elif mode == "ghost":
            self.wrapped = GradSampleModuleFastGradientClipping(
                module, loss_reduction="sum", strict=True, max_grad_norm=dp.max_grad_norm,
                use_ghost_clipping=True)
        else:
            self.wrapped = GradSampleModule(module, loss_reduction="sum", strict=True)
        if self.wrapped is not None:
            self.forward = self.wrapped
        # DPOptimizer scales by expected_batch_size (an int), as Opacus' own loop does.
        self.optimizer = (SecureNoiseDPOptimizer if mode == "hooks" else SecureNoiseGhostOptimizer)(
            torch.optim.Adam(module.parameters(), lr=lr),
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=int(round(expected_batch)),
            loss_reduction="mean",
            generator=randomness.torch("gradient-noise"),
            secure_mode=True,
        )

    def recording(self) -> AbstractContextManager[None]:
        """Around the private forward pass: book-keeping keeps its layers' inputs."""
        return self.keeper.recording() if self.keeper is not None else nullcontext()

    def take(self, loss_of: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor
             ) -> tuple[torch.Tensor, bool]:
        """The step's per-sample losses, their clipped sum, then Opacus' noise and
        scaling; the bool is False if Opacus skips the step.

        A sample whose gradient norm is not finite contributes zero in every mode
        (``bookkeeping.finite_rows``); ghost clipping cannot zero it in its second pass,
        so there the step is taken again on the batch without those rows, and a sample
        that is still not finite (a GAN's fake row, drawn without data) leaves a zero
        clipped sum: the update is then the noise alone."""
        with self.recording():
            losses = loss_of(batch)
        if self.keeper is not None:
            self.keeper.clip_into_grad(losses)
        elif self.mode == "ghost":
            wrapped = self.wrapped
            bad = ghost_backward(wrapped, self.optimizer, losses, self.wanted)  # type: ignore[arg-type]
            if bad is not None:
                batch = batch[~bad[: batch.shape[0]]]
                losses = loss_of(batch)
                if ghost_backward(wrapped, self.optimizer, losses,  # type: ignore[arg-type]
                                  self.wanted) is not None:
                    for p in self.optimizer.params:
                        p.grad = torch.zeros_like(p)
        else:
            hooks_backward(losses, self.wanted)
        return losses, bool(self.optimizer.pre_step())

    def remove_hooks(self) -> None:
        (self.keeper or self.wrapped).remove_hooks()  # type: ignore[union-attr]


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
    federated: bool = False,
    rows: float | None = None,
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

    ``mode`` is the clipping mode (one of ``MODES``); ``"auto"`` (the default) picks the
    fastest with :func:`pick_mode`. The mode changes the time a step
    takes, never the noise, the clipping or the ledger.

    ``rows`` is the row count the noisy sum is divided by (``q * rows``, Opacus'
    expected batch); default ``len(data)``. A site passes its DP count: the row count
    is a private statistic, and dividing by the exact one would make the update a
    function of it that the DP analysis does not cover (with Adam almost nothing shows,
    through its epsilon only, but the released weights must be a function of DP
    outputs alone).
    """
    if not 0 < sample_rate <= 1:
        raise ValueError("sample_rate must be in (0, 1]")
    if mode not in ("auto", *MODES):
        raise ValueError(f"mode must be 'auto' or one of {MODES}, got {mode!r}")
    if dp is not None and mode == "auto":
        batch_rows = max(1.0, sample_rate * len(data))
        mode = pick_mode(generator.private_module(),
                         samples_per_step(generator, data.shape[1], batch_rows))
    randomness.seed_global("model")
    module = generator.private_module()
    expected_batch = max(1.0, sample_rate * (len(data) if rows is None else rows))
    loader = poisson_loader(data, sample_rate, randomness.torch("sampler"))
    spec = generator.training_spec()
    lr = spec.lr
    total_loss, total_rows, steps = 0.0, 0, 0
    start = time.perf_counter()
    if dp is not None:
        if ledger is None:
            raise ValueError("DP training needs the site's privacy ledger")
        step = _DPStep(mode, module, dp, lr, expected_batch, randomness)
        optimizer: torch.optim.Optimizer = step.optimizer
        forward: torch.nn.Module = step.forward
    else:
        step = None
        optimizer = (torch.optim.Adam(module.parameters(), lr=lr, eps=spec.federated_adam_eps)
                     if federated else torch.optim.Adam(module.parameters(), lr=lr))
        forward = module
    anchors = [p.detach().clone() for p in module.parameters()] if proximal_mu > 0 else []

    def add_proximal() -> None:
        if not anchors:
            return
        for p, anchor in zip(module.parameters(), anchors, strict=True):
            if p.grad is not None:
                p.grad.add_(p.detach() - anchor, alpha=proximal_mu)

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
                if step is None:
                    losses = generator.per_sample_loss(forward, batch)
                    (losses.sum() / expected_batch).backward()
                    add_proximal()
                    optimizer.step()
                else:
                    losses, stepped = step.take(
                        lambda rows: generator.per_sample_loss(forward, rows), batch)
                    if stepped:
                        add_proximal()
                        optimizer.original_optimizer.step()  # type: ignore[attr-defined]
                steps += 1
                if dp is not None:
                    ledger.record(dp.noise_multiplier, sample_rate, 1)  # type: ignore[union-attr]
                total_loss += float(_real_rows(losses.detach(), batch).sum())
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
        if step is not None:
            step.remove_hooks()
    seconds = time.perf_counter() - start
    generator.trained = True  # it may be sampled now (Generator.sample refuses untrained)
    return RoundStats(
        steps=steps,
        rows_seen=total_rows,
        seconds=seconds,
        mean_loss=total_loss / max(total_rows, 1),
    )


def _real_rows(losses: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """The losses of the batch's rows: a GAN's per-sample loss lists its fake rows after
    them (the discriminator's step), which a mean over the real rows must leave out
    (CTGAN reported about (n + 64) / n times its loss before the twelfth session)."""
    return losses[: batch.shape[0]]


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
    (noise_multiplier, sample_rate). The two noise values are drawn together by the
    release sampler (OpenDP's float lattice Gaussian in secret mode).
    """
    bound = float(generator.loss_bound)
    loader = poisson_loader(data, sample_rate, randomness.torch("sampler"))
    module = generator.private_module()
    batch = next(iter(loader))[0]
    with torch.no_grad():
        # a loss that is not finite counts as the bound: a NaN here would make the
        # report NaN, a bit telling whether any sampled row overflows the model
        losses = torch.nan_to_num(_real_rows(generator.per_sample_loss(module, batch), batch),
                                  nan=bound, posinf=bound, neginf=0.0).clamp(0.0, bound) / bound
    std = noise_multiplier * math.sqrt(2.0)
    exact = np.array([float(losses.sum()), float(batch.shape[0])])
    noisy_sum, noisy_count = randomness.release("loss-report").add(exact, std, integral=False)
    ledger.record(noise_multiplier, sample_rate, 1)
    return bound * noisy_sum / max(noisy_count, 1.0)
