"""One privacy ledger per site, for the whole study.

Every mechanism a site runs on its private rows is recorded here as a subsampled
Gaussian (noise multiplier, sampling rate, number of releases) and composed by one of
Opacus' accountants. The ledger outlives a round: it is stored in the site's Flower
``context.state`` (and, in a deployment, on the site's disk), so the epsilon a site
reports is the epsilon of everything it released since the study began. A ledger made
anew each round would report a per-round epsilon and understate the real one; that is
the classic federated-DP bug, and the tests rule it out.

What counts as a release at a site:

- each DP-SGD step (noise multiplier sigma, Poisson rate q);
- the per-round loss report (one extra subsampled Gaussian query at (sigma, q));
- the site's row count used as its FedAvg weight, released once per study with Gaussian
  noise (rate 1, i.e. no subsampling).

The noise multiplier is calibrated against the *whole* planned study, so a site that
follows the plan ends exactly within its budget and one asked for more rounds than
planned stops before it would pass it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from opacus.accountants import create_accountant

from ..errors import BudgetError
from ..study import ACCOUNTANTS

Release = tuple[float, float, int]  # (noise multiplier, sample rate, count)


@dataclass
class PrivacyLedger:
    """The list of DP releases a site made, with the accountant that composes them."""

    mechanism: str = "rdp"
    history: list[Release] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mechanism not in ACCOUNTANTS:
            raise ValueError(f"accountant {self.mechanism!r} is not one of {ACCOUNTANTS}")

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Append releases, merging with the last entry when the mechanism is the same."""
        if steps <= 0:
            return
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, rate, count = self.history[-1]
            self.history[-1] = (sigma, rate, count + steps)
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    def accountant(self) -> Any:
        acc = create_accountant(self.mechanism)
        acc.history = [tuple(h) for h in self.history]
        return acc

    def epsilon(self, delta: float) -> float:
        """Epsilon of everything recorded, at the given delta (0 if nothing released)."""
        if not self.history:
            return 0.0
        return float(self.accountant().get_epsilon(delta=delta))

    def total_steps(self) -> int:
        return sum(h[2] for h in self.history)

    def copy(self) -> PrivacyLedger:
        return PrivacyLedger(self.mechanism, [tuple(h) for h in self.history])  # type: ignore[misc]

    def to_record(self) -> dict[str, Any]:
        """Flat lists, the shape a Flower ConfigRecord can hold."""
        return {
            "mechanism": self.mechanism,
            "noise": [h[0] for h in self.history],
            "rate": [h[1] for h in self.history],
            "count": [h[2] for h in self.history],
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> PrivacyLedger:
        noise = list(record.get("noise", []))
        rate = list(record.get("rate", []))
        count = list(record.get("count", []))
        if not (len(noise) == len(rate) == len(count)):
            raise ValueError("privacy ledger record is inconsistent (lists differ in length)")
        history = [(float(a), float(b), int(c)) for a, b, c in zip(noise, rate, count, strict=True)]
        return cls(str(record.get("mechanism", "rdp")), history)


@dataclass(frozen=True)
class RoundPlan:
    """What one round of local training releases, independent of the site's row count.

    Steps per round are ``epochs / sample_rate``: with Poisson sampling at a fixed rate,
    the privacy cost depends on the rate and the number of steps only, so sites of any
    size with the same plan spend the same epsilon and their reports do not reveal how
    many patients they hold.
    """

    sample_rate: float
    epochs: int
    loss_report: bool = True

    @property
    def steps(self) -> int:
        """``epochs * int(1 / q)``: the number of batches Opacus' Poisson sampler makes."""
        return self.epochs * int(1.0 / self.sample_rate)


def plan_history(
    noise_multiplier: float, plan: RoundPlan, rounds: int, count_noise: float | None
) -> PrivacyLedger:
    """The ledger a site will have after ``rounds`` rounds of ``plan``."""
    ledger = PrivacyLedger()
    if count_noise is not None:
        ledger.record(count_noise, 1.0, 1)
    per_round = plan.steps + (1 if plan.loss_report else 0)
    ledger.record(noise_multiplier, plan.sample_rate, per_round * rounds)
    return ledger


def round_cost(
    ledger: PrivacyLedger,
    noise_multiplier: float,
    plan: RoundPlan,
    count_noise: float | None = None,
) -> PrivacyLedger:
    """The ledger after one more round (and the count release, if not yet made)."""
    nxt = ledger.copy()
    if count_noise is not None:
        nxt.record(count_noise, 1.0, 1)
    nxt.record(noise_multiplier, plan.sample_rate, plan.steps + (1 if plan.loss_report else 0))
    return nxt


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    plan: RoundPlan,
    rounds: int,
    count_noise: float | None,
    mechanism: str = "rdp",
    tolerance: float = 1e-3,
    prior: tuple[Release, ...] = (),
) -> float:
    """Smallest noise multiplier whose whole-study epsilon stays within the budget.

    Bisection on the composed epsilon of the full plan (training steps, loss reports and
    the count release together), so the budget covers everything the site will release.
    ``prior`` is what the same table already released in earlier studies: a site's
    budget is the lifetime budget of its table, so a second study gets what is left.
    """
    if target_epsilon <= 0 or not math.isfinite(target_epsilon):
        raise BudgetError("epsilon must be a positive number")

    def eps(sigma: float) -> float:
        led = PrivacyLedger(mechanism, [tuple(h) for h in prior])  # type: ignore[misc]
        for release in plan_history(sigma, plan, rounds, count_noise).history:
            led.record(*release)
        return led.epsilon(delta)

    fixed = PrivacyLedger(mechanism, [tuple(h) for h in prior])  # type: ignore[misc]
    if count_noise is not None:
        fixed.record(count_noise, 1.0, 1)
    if fixed.history:
        floor = fixed.epsilon(delta)
        if floor >= target_epsilon:
            what = "earlier studies and this study's count release" if prior else (
                "the count release alone")
            raise BudgetError(
                f"{what} cost epsilon {floor:.3f}, more than the budget "
                f"{target_epsilon}; raise the budget or the count noise"
            )
    lo, hi = 0.3, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise BudgetError(
                f"no noise level reaches epsilon {target_epsilon} with this plan; "
                "use fewer rounds or epochs, or a lower sample rate"
            )
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
