"""Checks a trained reply must pass before the coordinator averages (or adds) it in.

Each guard has one job and says why it refuses, naming no private value: a bad reply is
refused with its reason and the round goes on with the others. The strategy takes its
guards as a list (``server/strategy.py``), so an encrypted study swaps the checks that
read weights in clear for ones that read ciphertexts (``server/secure.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from ..common.generators.base import TrainingSpec
from ..common.privacy.plan import steps_per_round
from ..common.protocol import ARRAYS, EPSILON, EPSILON_BUDGET, METRICS, NUM_EXAMPLES
from .rounds import RoundLog, last_epsilon


@dataclass
class RoundContext:
    """What a guard may compare a reply with: the round's starting model, the model's
    reference shapes and dtypes, and the study's log so far."""

    sent: dict[str, np.ndarray]
    reference: dict[str, tuple[tuple[int, ...], str]]
    history: list[RoundLog]


class ReplyGuard(Protocol):
    def check(self, content: RecordDict, site: str, ctx: RoundContext) -> str:
        """Why the reply must be refused, or '' if it may be aggregated."""
        ...


class ClearUpdate:
    """Weights in clear: the model's keys and shapes, finite values."""

    def check(self, content: RecordDict, site: str, ctx: RoundContext) -> str:
        arrays = content.get(ARRAYS) if ARRAYS in content else None
        if not isinstance(arrays, ArrayRecord):
            return "no model arrays in a 'trained' reply"
        keys = set(arrays.keys())
        if keys != set(ctx.reference):
            missing, extra = sorted(set(ctx.reference) - keys), sorted(keys - set(ctx.reference))
            return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})"
        for key, arr in arrays.items():
            expected = ctx.reference[key][0]
            if tuple(arr.shape) != expected:
                return f"array {key!r} has shape {tuple(arr.shape)}, expected {expected}"
            if not np.all(np.isfinite(arr.numpy())):
                return f"array {key!r} holds NaN or infinite values"
        return ""


@dataclass
class UpdateBound:
    """An update no larger than local training with the study's plan can make it.

    Sites train with Adam (through Opacus' DP optimizer): whatever the clipped and noised
    gradient, Adam moves one coordinate by at most a few times its learning rate per
    step, so ``max_update`` (``update_bounds``) bounds an honest round's change of any
    coordinate. A larger change did not come from the study's training.
    """

    max_update: dict[str, float]

    def check(self, content: RecordDict, site: str, ctx: RoundContext) -> str:
        if not ctx.sent or ARRAYS not in content:
            return ""
        for key, arr in content[ARRAYS].items():
            change = float(np.max(np.abs(arr.numpy() - ctx.sent[key]), initial=0.0))
            bound = self.max_update.get(key, math.inf)
            # a counter buffer (the GAN's EMA step count) moves by exactly its bound, and
            # a DP-count-weighted average of the sites' counters is not exact in float32
            if change > bound * (1 + 1e-5) + 1e-6:
                return (
                    f"update too large: array {key!r} moved by {change:.3g}, more than the "
                    f"{bound:.3g} that local training with this plan can move it"
                )
        return ""


class ClearWeight:
    """FedAvg's weight in clear: the site's DP count, a positive finite number."""

    def check(self, content: RecordDict, site: str, ctx: RoundContext) -> str:
        metrics = content.get(METRICS) if METRICS in content else None
        if not isinstance(metrics, MetricRecord):
            return "no metrics record"
        weight = metrics.get(NUM_EXAMPLES)
        if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            return f"impossible row count {weight!r}"
        return ""


class PlausibleEpsilon:
    """A reported epsilon that composes: present, within the site's own declared budget,
    and never lower than the site reported before.

    Both figures are the site's own, so this catches a site whose accounting is broken,
    not one that lies; the guarantee itself rests on each site's ledger.
    """

    def check(self, content: RecordDict, site: str, ctx: RoundContext) -> str:
        metrics = content.get(METRICS) if METRICS in content else None
        if not isinstance(metrics, MetricRecord):
            return "no metrics record"
        eps = metrics.get(EPSILON)
        if not isinstance(eps, int | float) or not math.isfinite(eps) or (eps < 0 and eps != -1):
            return f"missing or impossible epsilon {eps!r}"
        if eps == -1:  # a no-DP baseline site: it claims no guarantee
            return ""
        budget: Any = metrics.get(EPSILON_BUDGET, math.inf)
        if not isinstance(budget, int | float) or math.isnan(budget) or budget <= 0:
            return f"impossible epsilon-budget {budget!r}"
        if eps > budget * (1 + 1e-9):
            return f"epsilon {eps:.6g} above the site's budget {budget:.6g}"
        previous = last_epsilon(ctx.history).get(site)
        if previous is not None and eps < previous * (1 - 1e-9):
            return f"epsilon {eps:.6g} lower than the {previous:.6g} this site reported before"
        return ""


def clear_guards(max_update: dict[str, float] | None) -> list[ReplyGuard]:
    """The checks of a study in clear, in the order their reasons are most useful."""
    guards: list[ReplyGuard] = [ClearUpdate()]
    if max_update is not None:
        guards.append(UpdateBound(max_update))
    return [*guards, ClearWeight(), PlausibleEpsilon()]


# Adam's step on one coordinate is lr * m_hat / (sqrt(v_hat) + eps). With any betas
# where beta1**2 < beta2 (Flower's and torch's defaults, and the GAN's (0.5, 0.9)),
# |m_hat / sqrt(v_hat)| stays below (1 - beta1) / sqrt((1 - beta2) (1 - beta1**2 / beta2))
# after bias correction: 7.3 at (0.9, 0.999). Ten leaves room for that worst case.
ADAM_STEP_FACTOR = 10.0


def update_bounds(
    networks: dict[str, Any], spec: TrainingSpec, local_epochs: int, sample_rate: float
) -> dict[str, float]:
    """Per state-dict key, the largest change of one coordinate an honest round can make.

    A round is ``local_epochs`` passes of ``int(1 / sample_rate)`` Poisson batches; each
    batch is one step of every optimizer the generator uses (``steps_per_batch`` of its
    ``TrainingSpec``: a GAN's generator steps). A trained parameter moves by at most
    ``ADAM_STEP_FACTOR`` times the largest learning rate of the spec per step. Buffers
    are not trained by an optimizer: frequencies stay in [0, 1] and step counters grow
    by one per step, so their bound is the larger of 1 and the number of steps.
    """
    steps = steps_per_round(sample_rate, local_epochs) * max(1, spec.steps_per_batch)
    trained = max(1e-12, ADAM_STEP_FACTOR * spec.largest_lr * steps)
    bounds: dict[str, float] = {}
    for prefix, net in networks.items():
        params = {name for name, _ in net.named_parameters()}
        for key in net.state_dict():
            bounds[f"{prefix}.{key}"] = trained if key in params else max(1.0, float(steps))
    return bounds
