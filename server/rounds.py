"""The coordinator's log of a study: one entry per site and round, and why.

Kept apart from the strategies so that the ServerApp, the simulation's progress printer
and the summary read one shape, whatever strategy ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..common.protocol import (
    DELTA,
    EPSILON,
    EPSILON_ALONE,
    EPSILON_BUDGET,
    HONEST_SITES,
    REPRODUCIBLE_NOISE,
    SiteReply,
    Status,
)


@dataclass
class SiteRound:
    """What one site did in one round, as the coordinator saw it."""

    site: str
    status: str
    epsilon: float | None = None
    loss: float | None = None
    weight: float | None = None
    problems: list[str] = field(default_factory=list)
    reason: str = ""
    budget: float | None = None
    delta: float | None = None
    # The site said its noise was replayable (a test or benchmark): not a DP release.
    reproducible_noise: bool = False
    # The site added 1/h of its noise (distributed noise, masked sums): its epsilon
    # holds while h sites, itself included, do not collude with the coordinator.
    honest_sites: int = 1
    # Its epsilon were every other site to collude with the coordinator (a masked
    # study's releases with split noise; None: no split, the epsilon above).
    epsilon_alone: float | None = None


@dataclass
class RoundLog:
    round: int
    sites: list[SiteRound] = field(default_factory=list)
    aggregated: bool = True

    @property
    def included(self) -> list[str]:
        return [s.site for s in self.sites if s.status == Status.TRAINED]


def last_epsilon(history: list[RoundLog]) -> dict[str, float]:
    """Each site's latest epsilon among its accepted, trained replies."""
    last: dict[str, float] = {}
    for record in history:
        for entry in record.sites:
            if entry.status == Status.TRAINED and entry.epsilon is not None:
                last[entry.site] = entry.epsilon
    return last


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def site_round(name: str, reply: SiteReply) -> SiteRound:
    """A site's reply as a log entry: its status, problems and the privacy metrics it
    reported (a training round's, or the quantile-grid step's)."""
    metrics = reply.metrics
    return SiteRound(
        site=name,
        status=reply.status,
        epsilon=metrics.get(EPSILON),
        problems=reply.problems,
        budget=_number(metrics.get(EPSILON_BUDGET)),
        delta=_number(metrics.get(DELTA)),
        reproducible_noise=bool(metrics.get(REPRODUCIBLE_NOISE, 0.0)),
        honest_sites=int(metrics.get(HONEST_SITES, 1.0)),
        epsilon_alone=_number(metrics.get(EPSILON_ALONE)),
    )
