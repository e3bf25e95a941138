"""One privacy plan per study: what a site will release, and what each release costs.

Built once from the study config, it is the one place that knows how many DP-SGD steps a
round makes, which noise fits a budget, and the smallest budget that can pay for the
plan at all. The coordinator's start-up check (``fedsynth simulate``, the benchmark),
every site (``client/site.py``) and a central ``Generator.fit`` use it, so an
infeasible budget is one clear error before anything runs, not a refusal found inside
each site in round 1.

Why a smallest feasible epsilon exists: a study releases each site's outcome histogram
once (Gaussian, std ``count_noise``, sensitivity 1) whatever the DP-SGD noise, so its
cost is a floor under the whole study's epsilon. DP-SGD's share goes to zero as its
noise grows, so any budget above that floor (plus what earlier studies on the same
table spent) can be met, with more noise the closer it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import BudgetError
from ..study import steps_per_round
from .accountant import PrivacyLedger, Release, RoundPlan, calibrate_noise, plan_history

if TYPE_CHECKING:
    from ..study import StudyConfig

#: Upper end of the noise calibration: past it DP-SGD learns nothing useful anyway.
MAX_NOISE_MULTIPLIER = 8192.0  # the last value calibrate_noise tries


@dataclass(frozen=True)
class PrivacyPlan:
    """Every DP release one site makes in a study, as a function of its noise."""

    sample_rate: float
    local_epochs: int
    rounds: int
    loss_report: bool = True
    # std of the one count release (None: a study or fit without one)
    count_noise: float | None = 10.0
    accountant: str = "rdp"
    # noise multiplier of the one quantile-grid release before training (None: a study
    # or fit without one; common/quantile_grid.py)
    grid_noise: float | None = None

    @classmethod
    def from_study(cls, study: StudyConfig, epsilon: float | None = None,
                   delta: float | None = None) -> PrivacyPlan:
        """The plan of a site of ``study`` whose budget is (``epsilon``, ``delta``): the
        grid release's noise is a share of the budget (``quantile_grid``), so a plan
        without a budget has none."""
        from ..quantile_grid import grid_noise_for

        grid = None
        if study.releases_grid and epsilon is not None and delta is not None:
            grid = grid_noise_for(epsilon, delta, study.grid_share)
        return cls(
            sample_rate=study.sample_rate,
            local_epochs=study.local_epochs,
            rounds=study.num_server_rounds,
            loss_report=study.loss_report,
            count_noise=study.count_noise,
            accountant=study.accountant,
            grid_noise=grid,
        )

    def _with_grid(self, prior: tuple[Release, ...]) -> tuple[Release, ...]:
        """``prior`` and the plan's grid release: it is made once, before any DP-SGD
        step, at the same cost whatever the training noise, so it composes like an
        earlier study's release."""
        if self.grid_noise is None:
            return tuple(prior)
        return (*prior, (self.grid_noise, 1.0, 1))

    @property
    def round_plan(self) -> RoundPlan:
        return RoundPlan(self.sample_rate, self.local_epochs, self.loss_report)

    @property
    def steps_per_round(self) -> int:
        return steps_per_round(self.sample_rate, self.local_epochs)

    def ledger(self, noise_multiplier: float, prior: tuple[Release, ...] = ()) -> PrivacyLedger:
        """The ledger after the whole plan at ``noise_multiplier``, on top of ``prior``."""
        led = PrivacyLedger(self.accountant,
                            [tuple(h) for h in self._with_grid(prior)])  # type: ignore[misc]
        for release in plan_history(noise_multiplier, self.round_plan, self.rounds,
                                    self.count_noise).history:
            led.record(*release)
        return led

    def floor_epsilon(self, delta: float, prior: tuple[Release, ...] = ()) -> float:
        """What the plan costs whatever the DP-SGD noise: the count release, the grid
        release (and ``prior``, what the table spent in earlier studies)."""
        led = PrivacyLedger(self.accountant,
                            [tuple(h) for h in self._with_grid(prior)])  # type: ignore[misc]
        if self.count_noise is not None:
            led.record(self.count_noise, 1.0, 1)
        return led.epsilon(delta) if led.history else 0.0

    def smallest_epsilon(self, delta: float, prior: tuple[Release, ...] = ()) -> float:
        """The smallest budget the plan can meet (at the largest calibrated noise)."""
        return self.ledger(MAX_NOISE_MULTIPLIER, prior).epsilon(delta)

    def check(self, epsilon: float, delta: float, who: str = "a site",
              prior: tuple[Release, ...] = ()) -> None:
        """Raise :class:`BudgetError` naming the smallest feasible epsilon if ``epsilon``
        cannot pay for the plan."""
        smallest = self.smallest_epsilon(delta, prior)
        if epsilon <= smallest * (1 + 1e-6):
            floor = self.floor_epsilon(delta, prior)
            raise BudgetError(
                f"{who}'s budget epsilon {epsilon:g} cannot pay for this study: the smallest "
                f"feasible epsilon is {smallest:.3f} (delta {delta:g}); the one count release "
                f"(count-noise {self.count_noise}) and the quantile-grid release (noise "
                f"{self.grid_noise}) alone cost {floor:.3f}. Raise the budget above that, or "
                "raise count-noise or lower grid-share"
            )

    def noise_for(self, epsilon: float, delta: float, prior: tuple[Release, ...] = ()) -> float:
        """The smallest noise multiplier whose whole plan stays within ``epsilon``."""
        return calibrate_noise(epsilon, delta, self.round_plan, rounds=self.rounds,
                               count_noise=self.count_noise, mechanism=self.accountant,
                               prior=self._with_grid(prior))

    def costs(self, noise_multiplier: float, delta: float) -> dict[str, float]:
        """Epsilon of each kind of release alone and of the whole plan, at ``delta``."""
        def eps(history: list[Release]) -> float:
            return PrivacyLedger(self.accountant, history).epsilon(delta) if history else 0.0

        steps = self.steps_per_round * self.rounds
        reports = self.rounds if self.loss_report else 0
        return {
            "count-release": eps([(self.count_noise, 1.0, 1)] if self.count_noise else []),
            "grid-release": eps([(self.grid_noise, 1.0, 1)] if self.grid_noise else []),
            "dp-sgd": eps([(noise_multiplier, self.sample_rate, steps)]),
            "loss-reports": eps([(noise_multiplier, self.sample_rate, reports)] if reports
                                else []),
            "total": self.ledger(noise_multiplier).epsilon(delta),
        }
