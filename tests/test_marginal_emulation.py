"""The premise of the central emulation of a federated marginal study.

benchmarks/marginal-datasets ("Eighth pass: federated against its emulation") compares
federated studies with a central fit on the pooled rows at the epsilon whose one noise
equals the sites' summed noise. That is a like-for-like comparison only if the two run
the same plan and each release's summed noise std equals the central one: pinned here
for both plan paths the comparison uses (TCGA-BRCA's public workload at 6 regions,
heart disease's outcome plan at 4 sites and epsilon 1 each).
"""

from __future__ import annotations

import math

import pytest
from scipy.optimize import brentq

from fedsynth.common.bundled import bundled_schema
from fedsynth.common.generators.marginal import MarginalGenerator
from fedsynth.common.generators.marginal.plan import budget_noise, calibrate, summed_noise

DELTA = 1e-5


def emulation_epsilon(eps: float, sites: int) -> float:
    """The central epsilon whose noise equals ``sites`` sites' summed noise at ``eps``."""
    target = math.sqrt(sites) * budget_noise(eps, DELTA)
    return brentq(lambda e: budget_noise(e, DELTA) - target, eps / (2 * math.sqrt(sites)),
                  eps)


@pytest.mark.parametrize(("dataset", "eps", "sites", "expected"),
                         [("tcga_brca", 3.0, 6, 1.116), ("heart_disease", 1.0, 4, 0.472)])
def test_federated_plan_and_summed_noise_equal_the_emulation(dataset, eps, sites, expected):
    schema = bundled_schema(dataset)
    central = emulation_epsilon(eps, sites)
    assert central == pytest.approx(expected, abs=1e-3)  # the figures results.md quotes
    model = MarginalGenerator(schema, seed=0)
    # the coordinator plans for the sums of the sites' stated budgets (server/marginal.py)
    fed_plan = model.plan(noise=summed_noise([(eps, DELTA)] * sites))
    cen_plan = model.plan(noise=summed_noise([(central, DELTA)]))  # MarginalGenerator.fit
    assert fed_plan == cen_plan
    site, one = calibrate(fed_plan, eps, DELTA), calibrate(cen_plan, central, DELTA)
    for kind in ("one_way", "measure", "fine", "score", "links", "codes", "pairs"):
        s, c = getattr(site, kind), getattr(one, kind)
        if math.isfinite(c):  # a release the plan makes: the same summed std
            assert math.sqrt(sites) * s == pytest.approx(c, rel=1e-3), kind
        else:
            assert not math.isfinite(s), kind
    if dataset == "heart_disease":  # 8.1 summed noise: the outcome plan, no score release
        assert fed_plan.select_share == 0 and fed_plan.rounds == 1
