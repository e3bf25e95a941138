"""The privacy plan of a marginal study: every release, calibrated up front.

A site releases up to five kinds of Gaussian vectors, in this order, all at sampling
rate 1 (no subsampling: every row of the site counts):

- ``fine`` (when the plan has ``fine`` > 0): the noisy 1-way histogram of each of the
  ``fine`` numeric columns over fine equal-width cells of its public range, once; one
  patient moves each by one in one cell: ``record(sigma_fine, 1.0, fine)``. The
  coordinator cuts the model's bins from it and decodes values with it; it is also a
  second measurement of each numeric 1-way marginal;
- ``one-way``: the noisy 1-way marginal of every attribute, once. Adding or removing
  one patient changes each of the ``d`` histograms by one in one cell, so the vector's
  L2 sensitivity is sqrt(d). With noise std ``sigma`` per cell this is exactly ``d``
  compositions of a sensitivity-1 Gaussian mechanism at noise multiplier ``sigma``;
  the ledger records it as ``record(sigma, 1.0, d)``.
- ``codes`` (once, after the 1-way marginals, when the schema has code sets and
  ``code_bound`` > 0, ``codes.py``): the per-code counts of the codes, each patient
  contributing at most ``code_bound`` codes,
  so L2 sensitivity sqrt(code_bound): ``record(sigma_codes, 1.0, code_bound)``.
- ``pairs`` (once, after the code histogram, when ``pair_bound`` > 0,
  ``code_pairs.py``): the co-occurrence counts of pairs among at most ``pair_codes``
  frequent codes, each patient keeping at most ``pair_bound`` of them, so one patient
  moves at most C(pair_bound, 2) counts by one: L2 sensitivity sqrt(C(pair_bound, 2)),
  ``record(sigma_pairs, 1.0, C(pair_bound, 2))``.
- ``links`` (once, after the pairs, when ``link_bound`` > 0, ``event_links.py``): for
  each of at most ``link_covariates`` binary covariates, the counts of the patients
  holding it in each cell of the survival event (and time), each patient's slices
  weighted so that it moves the vector by at most sqrt(link_bound) in L2:
  ``record(sigma_links, 1.0, link_bound)``.
- ``score`` (one per selection round): for each of ``m`` candidate marginals the L1
  distance between the site's marginal and the current model's, scaled to the site's
  noisy total. One patient moves one count of each candidate marginal by one, so each
  score moves by at most 1 (triangle inequality): ``m`` sensitivity-1 Gaussians at
  ``sigma_score``, recorded as ``record(sigma_score, 1.0, m)``. The coordinator then
  takes the top-k of the summed scores: post-processing, free. This is report-noisy-max
  with Gaussian noise, charged as if every noisy score were published (it is, to the
  coordinator), so no separate exponential-mechanism analysis is needed and the ledger's
  Gaussian composition is exact for it.
  A plan with ``select_share`` 0 has no score release: the rounds measure a public
  workload in an order that post-processes the 1-way releases (``engine.workload_order``).
- ``measure`` (one per selection round): the ``k`` chosen marginals at ``sigma_measure``:
  ``record(sigma_measure, 1.0, k)``.
  With ``outcome_split`` 1 (the outcome plan) the round's pairs with the outcome come as
  ``split`` releases (``outcome_split.py``): the outcome's cells summed into its public
  {absent, present} split before the noise; one patient is still in one entry of each,
  so the same ``record(sigma_measure, 1.0, k)``.

Gaussian mechanisms at rate 1 compose exactly into one Gaussian: ``sum_i c_i / sigma_i^2``
= ``1 / sigma_eq^2``, in RDP (Opacus' ``rdp``) and in the privacy-loss distribution
(``prv``) alike. So the plan fixes the share of that total each kind gets
(``fine_share``, ``one_way_share``, ``codes_share``, ``pairs_share``, ``links_share``,
``select_share``,
the rest for measurements), finds the largest total (smallest ``sigma_eq``) whose epsilon at
``delta`` fits the budget with the site's own accountant, and splits it. A site that
follows the plan ends within its budget; the candidate count per round is the plan's
upper bound, so a round with fewer candidates spends less. Which plan a study gets
depends on the noise scale of the coordinator's sums (``summed_noise``, from the
sites' budgets: ``MarginalGenerator.plan``), never on a row.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ...errors import BudgetError
from ...privacy import PrivacyLedger

ONE_WAY, SCORE, MEASURE, FINE, CODES = "one-way", "score", "measure", "fine", "codes"
PAIRS, LINKS = "pairs", "links"
# a round's pairs with the outcome, the outcome collapsed to the schema's {absent,
# present} (outcome_split.py): measured and charged as ``measure`` (same noise, one
# sensitivity-1 Gaussian per pair), asked only when the plan's ``outcome_split`` is 1
SPLIT = "split"


@dataclass(frozen=True)
class MarginalPlan:
    """What a marginal study releases, independent of any row."""

    attributes: int  # d: number of 1-way marginals measured first
    rounds: int  # selection rounds after the 1-way marginals
    candidates: int  # upper bound on the candidates scored per round
    per_round: int  # marginals measured per round
    one_way_share: float = 0.2
    select_share: float = 0.2
    fine: int = 0  # numeric columns whose fine histogram is released first (0: none)
    fine_share: float = 0.0  # its share of the budget
    code_bound: int = 0  # grouped codes per patient in the code histogram (0: no release)
    codes_share: float = 0.0  # share of the budget for the code histogram
    pair_bound: int = 0  # codes per patient in the pair release (0: no pair release)
    pair_codes: int = 0  # at most this many codes form the released pairs (public cap)
    pairs_share: float = 0.0  # share of the budget for the pair release
    link_bound: int = 0  # covariates per patient at full weight in the link release (0: none)
    link_covariates: int = 0  # at most this many covariates are linked (public cap)
    links_share: float = 0.0  # share of the budget for the link release (event_links.py)
    # 1: the rounds measure pairs with the outcome collapsed (``SPLIT``, outcome_split.py)
    outcome_split: int = 0

    def __post_init__(self) -> None:
        if self.code_bound < 0 or not (0 <= self.codes_share < 1) or (
                (self.code_bound > 0) != (self.codes_share > 0)):
            raise ValueError("code_bound and codes_share are both 0 (no code histogram) or "
                             "both positive (codes_share < 1)")
        if (self.pair_bound > 0) != (self.pairs_share > 0) or self.pair_bound == 1 or (
                self.pair_bound and self.pair_codes < 2) or not 0 <= self.pairs_share < 1:
            raise ValueError("pair_bound, pair_codes and pairs_share are all 0 (no pair "
                             "release) or pair_bound >= 2, pair_codes >= 2 and 0 < "
                             "pairs_share < 1")
        if (self.link_bound > 0) != (self.links_share > 0) or not 0 <= self.links_share < 1 or (
                self.link_bound and self.link_covariates < 1):
            raise ValueError("link_bound, link_covariates and links_share are all 0 (no link "
                             "release) or all positive (links_share < 1)")
        if self.outcome_split not in (0, 1) or (self.outcome_split and not self.rounds):
            raise ValueError("outcome_split is 0, or 1 in a plan with rounds")
        if self.attributes < 1 or self.rounds < 0 or self.per_round < 1 or self.fine < 0:
            raise ValueError("a marginal plan needs >= 1 attribute, >= 0 rounds, >= 1 per round")
        if not (0 < self.one_way_share < 1 and 0 <= self.select_share < 1
                and self.one_way_share + self.select_share + self.fine_share
                + self.codes_share + self.pairs_share + self.links_share < 1
                or self.rounds == 0):
            raise ValueError("one_way_share, select_share, fine_share, codes_share, "
                             "pairs_share and links_share must be in [0, 1) with sum < 1 "
                             "(the rest is for the measurements)")
        if (self.fine > 0) != (self.fine_share > 0) or self.fine_share >= 1:
            raise ValueError("fine histograms need a fine_share in (0, 1), and a fine_share "
                             "needs fine histograms")
        if self.rounds == 0 and (self.fine_share + self.codes_share + self.pairs_share
                                 + self.links_share) >= 1:
            raise ValueError("fine_share + codes_share + pairs_share + links_share must be "
                             "< 1 (the rest is for the 1-way marginals)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MarginalPlan:
        return cls(**{k: (float(v) if "share" in k else int(v)) for k, v in raw.items()})

    @property
    def share_left(self) -> float:
        """The share of the budget the measurements get (what the others leave)."""
        return (1.0 - self.one_way_share - self.select_share - self.fine_share
                - self.codes_share - self.pairs_share - self.links_share)

    def one_way_total(self) -> float:
        """The share of the 1-way releases (the fine one included)."""
        return self.one_way_share + self.fine_share


@dataclass(frozen=True)
class NoiseLevels:
    """Noise std per cell (= noise multiplier, sensitivity 1) of each release kind."""

    one_way: float
    score: float
    measure: float
    fine: float = math.inf  # the fine histograms'; unused without numeric columns
    codes: float = math.inf  # the code histogram's (codes.py); unused without grouped codes
    pairs: float = math.inf  # the pair release's (code_pairs.py); unused without it
    links: float = math.inf  # the link release's (event_links.py); unused without it

    @classmethod
    def flat(cls, sigma: float) -> NoiseLevels:
        """The same noise for every kind (a fixed multiplier, or a fit without DP)."""
        return cls(sigma, sigma, sigma, sigma, sigma, sigma, sigma)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> NoiseLevels:
        """Levels a coordinator sent: every one a number > 0 (inf: the kind unused)."""
        raw = json.loads(text)
        levels = cls(**{f.name: float(raw[f.name]) for f in fields(cls)})
        if not all(v > 0 for v in asdict(levels).values()):  # NaN fails too
            raise ValueError("noise levels must be numbers > 0")
        return levels

    @classmethod
    def largest(cls, levels: list[NoiseLevels]) -> NoiseLevels:
        """Kind by kind, the largest: a common noise every one of these sites affords."""
        return cls(*(max(getattr(x, f.name) for x in levels) for f in fields(cls)))

    def split(self, honest_sites: int) -> NoiseLevels:
        """What one of ``honest_sites`` sites adds so that their sum carries these
        levels: 1/h of each variance (distributed noise, docs/privacy.md)."""
        f = 1.0 / math.sqrt(honest_sites)
        return NoiseLevels(*(getattr(self, k.name) * f for k in fields(self)))

    def of(self, kind: str) -> float:
        return {ONE_WAY: self.one_way, SCORE: self.score, MEASURE: self.measure,
                SPLIT: self.measure,
                FINE: self.fine, CODES: self.codes, PAIRS: self.pairs,
                LINKS: self.links}[kind]


def planned_ledger(plan: MarginalPlan, noise: NoiseLevels, mechanism: str = "rdp") -> PrivacyLedger:
    """The ledger a site holds after following ``plan`` to the end."""
    ledger = PrivacyLedger(mechanism)
    if plan.fine:
        ledger.record(noise.fine, 1.0, plan.fine)
    ledger.record(noise.one_way, 1.0, plan.attributes)
    if plan.code_bound:
        ledger.record(noise.codes, 1.0, plan.code_bound)
    if plan.pair_bound:
        ledger.record(noise.pairs, 1.0, math.comb(plan.pair_bound, 2))
    if plan.link_bound:
        ledger.record(noise.links, 1.0, plan.link_bound)
    for _ in range(plan.rounds):
        if plan.select_share > 0:  # 0: no score release (engine.workload_order decides)
            ledger.record(noise.score, 1.0, plan.candidates)
        ledger.record(noise.measure, 1.0, plan.per_round)
    return ledger


def _levels(plan: MarginalPlan, rho: float) -> NoiseLevels:
    """Split a total Gaussian budget rho = 1 / (2 sigma_eq^2) by the plan's shares."""
    fine = (math.sqrt(plan.fine / (2 * rho * plan.fine_share)) if plan.fine else math.inf)
    codes = (math.sqrt(plan.code_bound / (2 * rho * plan.codes_share))
             if plan.code_bound else math.inf)
    pairs = (math.sqrt(math.comb(plan.pair_bound, 2) / (2 * rho * plan.pairs_share))
             if plan.pair_bound else math.inf)
    links = (math.sqrt(plan.link_bound / (2 * rho * plan.links_share))
             if plan.link_bound else math.inf)
    if plan.rounds == 0:
        one_share = (1.0 - plan.fine_share - plan.codes_share - plan.pairs_share
                     - plan.links_share)
        return NoiseLevels(math.sqrt(plan.attributes / (2 * rho * one_share)), math.inf,
                           math.inf, fine, codes, pairs, links)
    measure_share = plan.share_left
    one = math.sqrt(plan.attributes / (2 * rho * plan.one_way_share))
    score = (math.sqrt(plan.rounds * plan.candidates / (2 * rho * plan.select_share))
             if plan.select_share > 0 else math.inf)
    measure = math.sqrt(plan.rounds * plan.per_round / (2 * rho * measure_share))
    return NoiseLevels(one, score, measure, fine, codes, pairs, links)


#: The largest whole-budget noise multiplier ``budget_noise`` tries: past it the
#: accountant's epsilon no longer falls (its conversion from RDP at delta has a floor).
MAX_BUDGET_NOISE = 1e6


def budget_noise(epsilon: float, delta: float, mechanism: str = "rdp",
                 tolerance: float = 1e-4, who: str = "a site") -> float:
    """The noise multiplier of the one Gaussian (sensitivity 1, rate 1) that spends a
    whole budget: every plan splits exactly this (``calibrate``), so it is a site's
    noise scale independent of the plan. Bisection with the site's own accountant.

    A budget below what any noise reaches (the accountant's floor at ``delta``) is a
    ``BudgetError`` naming that floor, so a study asks for a feasible budget before any
    release rather than failing inside the planner."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise BudgetError(f"{who}: epsilon must be a finite number > 0, got {epsilon!r}")

    def eps(sigma_eq: float) -> float:
        return PrivacyLedger(mechanism, [(sigma_eq, 1.0, 1)]).epsilon(delta)

    lo, hi = 0.05, 1.0
    while eps(hi) > epsilon:
        lo, hi = hi, hi * 2
        if hi > MAX_BUDGET_NOISE:
            raise BudgetError(
                f"{who}'s budget epsilon {epsilon:g} cannot pay for a marginal study at "
                f"delta {delta:g}: with the {mechanism} accountant no noise level gets "
                f"below epsilon {eps(MAX_BUDGET_NOISE):.3f}. Raise epsilon above that, or "
                "delta")
    while eps(lo) <= epsilon and lo > 1e-4:
        lo /= 2
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        if eps(mid) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def summed_noise(budgets: list[tuple[float, float]], mechanism: str = "rdp") -> float:
    """The noise scale of the coordinator's sums: sites answering with (epsilon, delta)
    budgets each add their own noise, so a sum carries sqrt(sum of their
    ``budget_noise`` squared) times what a plan's share makes of one. One central
    holder: its own ``budget_noise``. A site without DP (epsilon <= 0) adds none."""
    return math.sqrt(sum(budget_noise(e, d, mechanism) ** 2 for e, d in budgets if e > 0))


def calibrate(
    plan: MarginalPlan, epsilon: float, delta: float, mechanism: str = "rdp",
    tolerance: float = 1e-4,
) -> NoiseLevels:
    """Smallest noise levels whose whole-plan epsilon stays within ``epsilon``.

    Bisection on the equivalent single Gaussian's noise multiplier, with the same
    accountant the site's ledger uses; the returned levels are then checked against
    the planned ledger itself (so a rounding slip shows up here, not at a site).
    """
    hi = budget_noise(epsilon, delta, mechanism, tolerance)
    levels = _levels(plan, 1.0 / (2 * hi * hi))
    spent = planned_ledger(plan, levels, mechanism).epsilon(delta)
    if spent > epsilon * (1 + 1e-6):
        raise AssertionError(f"calibrated plan spends {spent} > {epsilon}")
    return levels
