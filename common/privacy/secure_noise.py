"""DP-SGD's Gaussian noise as Opacus' ``secure_mode`` draws it, in one draw per step.

Opacus' ``secure_mode`` (``opacus.optimizers.optimizer._generate_noise``) hardens the
Gaussian mechanism against floating-point attacks on a single Gaussian sample (Jin et
al. 2021; the fix of Holohan & Braghin 2021, arXiv:2107.10138, section 5.1 with n = 2):
every noise value is the sum of 2n = 4 independent N(0, std^2) draws, divided by 2, so
an attacker who sees the noisy value must invert four draws, not one. Opacus makes,
for *each parameter tensor*, one throw-away draw and four draws of the tensor's shape,
added into a fresh zero tensor one by one: 1 + 4 calls, an allocation and four
additions per tensor per step. On this project's small networks at q = 0.1 (batches of
a few to a hundred rows) that per-tensor overhead was a visible part of a step.

``secure_gaussian`` draws the same thing for all of a step's parameters at once: one
throw-away draw, then a (4, total) tensor of N(0, std^2) draws from the same generator
(the site's secret ``gradient-noise`` stream), summed over the four rows and halved.
Each noise value is therefore still the sum of four independent Gaussians from the
site's secret randomness, divided by 2, exactly the distribution and the hardening of
Opacus' secure mode; only how the draws are laid out among the parameters differs.
``tests/test_site_speed.py`` checks both (the values are the four rows' sum over 2;
their spread and tails are those of N(0, std^2)).

``SecureNoiseDPOptimizer`` and ``SecureNoiseGhostOptimizer`` are Opacus' optimizers
(hooks and ghost clipping) with ``add_noise`` replaced (and the ghost one's gradient
copy made cheaper); clipping, scaling and the skipped-step logic stay Opacus'.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping

#: Gaussian draws summed into each noise value (Opacus' secure mode: 2n with n = 2).
DRAWS = 4


def secure_gaussian(std: float, numel: int, generator: torch.Generator | None) -> torch.Tensor:
    """``numel`` noise values of std ``std``, each the sum of ``DRAWS`` N(0, std^2)
    draws halved (flat float32 tensor); one throw-away draw first, as Opacus makes.

    torch's ``normal`` (Box-Muller on Mersenne Twister uniforms, 2.4 ns a value here)
    is the fastest Gaussian draw this machine's libraries offer: numpy's PCG64
    uniforms are faster (1.3 ns) but Box-Muller on them written with torch operations
    is not (3.5 ns), and numpy's ziggurat is slower (7.7 ns); a kept buffer instead of
    a new one per step made no difference (``benchmark_speed.py noise``).
    """
    if std == 0:
        return torch.zeros(numel)
    torch.normal(0.0, std, (1, 1), generator=generator)  # thrown away, as Opacus does
    draws = torch.normal(0.0, std, (DRAWS, numel), generator=generator)
    return draws.sum(dim=0).div_(2.0)


class _OneDrawNoise:
    """``add_noise`` for Opacus' optimizers: one ``secure_gaussian`` draw per step."""

    params: list[torch.Tensor]
    noise_multiplier: float
    max_grad_norm: float
    generator: torch.Generator | None

    def add_noise(self) -> None:
        multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        summed = [p.summed_grad for p in self.params]  # type: ignore[attr-defined]
        for s in summed:
            _check_processed_flag(s)
        noise = secure_gaussian(multiplier * self.max_grad_norm,
                                sum(s.numel() for s in summed), self.generator)
        offset = 0
        for p, s in zip(self.params, summed, strict=True):
            n = s.numel()
            p.grad = (s + noise[offset:offset + n].view_as(s)).view_as(p)
            offset += n
            _mark_as_processed(s)


class SecureNoiseDPOptimizer(_OneDrawNoise, DPOptimizer):
    """Opacus' ``DPOptimizer`` (hooks mode) with the noise drawn by ``secure_gaussian``,
    and a sample whose gradient norm is not finite clipped to zero, not to NaN (Opacus'
    clip factor of a NaN norm is NaN, which would make the whole update NaN: a bit that
    tells whether any sampled row overflows the coordinator's model;
    ``bookkeeping.finite_rows`` says why zero is sound)."""

    def clip_and_accumulate(self) -> None:
        samples = self.grad_samples
        if samples and len(samples[0]):
            norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples],
                                dim=1).norm(2, dim=1)
            bad = ~torch.isfinite(norms)
            if bool(bad.any()):
                for p in self.params:
                    p.grad_sample = self._get_flat_grad_sample(p).masked_fill(
                        bad.reshape(-1, *([1] * (p.dim()))), 0.0)
        super().clip_and_accumulate()


class SecureNoiseGhostOptimizer(_OneDrawNoise, DPOptimizerFastGradientClipping):
    """Opacus' ghost-clipping optimizer with the noise drawn by ``secure_gaussian``.

    ``accumulate`` keeps Opacus' arithmetic (the first backward's clipped sum is
    ``summed_grad``, later ones are added to it) but copies with ``clone`` where Opacus
    calls ``copy.deepcopy`` per tensor, which cost more than the copy itself.
    """

    def accumulate(self) -> None:
        for p in self.params:
            if p.summed_grad is not None:  # type: ignore[attr-defined]
                p.summed_grad.add_(p.grad.data)  # type: ignore[attr-defined,union-attr]
            else:
                p.summed_grad = p.grad.data.clone()  # type: ignore[attr-defined,union-attr]
