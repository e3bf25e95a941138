"""The plan follows the noise the coordinator's sums will carry (issue 13, fifth pass).

Heart disease at 4 sites' summed noise (epsilon 1 each) gets the outcome plan: one
round measuring every pair with the outcome, no score release, more for the 1-way
releases. Its inputs are public (the sites' stated budgets, the schema, the candidate
pairs): these tests build plans without a row, then check the release sequence of a
central fit and of a federated study through the real apps against the plan and an
independent accountant.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsynth.common import protocol as P
from fedsynth.common.generators import get_generator
from fedsynth.common.generators.marginal.model import OUTCOME_PLAN_NOISE
from fedsynth.common.generators.marginal.plan import (
    SPLIT,
    MarginalPlan,
    budget_noise,
    calibrate,
    planned_ledger,
    summed_noise,
)
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.study import SiteConfig, StudyConfig, schema_fingerprint
from fedsynth.common.table import read_table
from tests.test_marginal import SITES, SMALL, _independent

FOUR_AT_1 = [(1.0, 1e-5)] * 4
FOUR_AT_3 = [(3.0, 1e-5)] * 4


def test_summed_noise_is_the_root_sum_of_the_sites_whole_budget_noise():
    one = budget_noise(1.0, 1e-5)
    assert summed_noise(FOUR_AT_1) == pytest.approx(2 * one, rel=1e-9)
    assert summed_noise([(1.0, 1e-5)]) == pytest.approx(one, rel=1e-9)
    # a site without DP adds no noise; more budget, less noise
    assert summed_noise([(1.0, 1e-5), (-1.0, 0.0)]) == pytest.approx(one, rel=1e-9)
    assert budget_noise(3.0, 1e-5) < one
    # the central epsilon with the same noise as the 4 sites' sum (emulate_sites.py)
    assert budget_noise(0.4718, 1e-5) == pytest.approx(summed_noise(FOUR_AT_1), rel=2e-3)


def test_heart_gets_the_outcome_plan_only_at_high_summed_noise(heart_schema):
    model = get_generator("marginal")(heart_schema)
    default = model.plan()
    assert default.select_share > 0 and default.rounds == 2  # AIM's scored rounds
    # 4 sites at epsilon 3 (3.0), one holder at epsilon 3 or 10: the same plan
    for budgets in (FOUR_AT_3, [(3.0, 1e-5)], [(10.0, 1e-5)] * 4):
        assert summed_noise(budgets) < OUTCOME_PLAN_NOISE
        assert model.plan(noise=summed_noise(budgets)) == default
    # one central holder at epsilon 1 (4.0) is past it too: both epsilon-1 modes
    assert model.plan(noise=summed_noise([(1.0, 1e-5)])).select_share == 0
    lean = model.plan(noise=summed_noise(FOUR_AT_1))  # 8.1
    assert summed_noise(FOUR_AT_1) >= OUTCOME_PLAN_NOISE
    outcome = heart_schema.outcome.column
    with_outcome = [c for c in (tuple(p) for p in _pairs(model)) if outcome in c]
    assert len(with_outcome) == len(heart_schema.columns) - 1  # every other column's pair
    assert (lean.rounds, lean.per_round, lean.candidates) == (1, len(with_outcome),
                                                              len(with_outcome))
    assert lean.select_share == 0.0  # no score release at all
    assert lean.one_way_share > default.one_way_share and lean.fine_share > default.fine_share
    # same budget, less noise on the 1-way releases and on each measured pair
    a, b = calibrate(default, 1.0, 1e-5), calibrate(lean, 1.0, 1e-5)
    assert b.one_way < a.one_way and b.fine < a.fine and b.measure < a.measure
    assert not math.isfinite(b.score)
    # off by the hyperparameter; a hyperparameter set by hand wins
    assert get_generator("marginal")(heart_schema, outcome_plan_noise=0).plan(
        noise=summed_noise(FOUR_AT_1)) == default
    assert get_generator("marginal")(heart_schema, one_way_share=0.25).plan(
        noise=summed_noise(FOUR_AT_1)).one_way_share == 0.25


def _pairs(model) -> list[tuple[str, ...]]:
    from fedsynth.common.generators.marginal import engine

    return engine.candidates(model.discretizer.names, model.sizes, [], 2,
                             int(model.hparams["max_clique_cells"]))


@pytest.mark.parametrize("name", ["amlsg", "tcga_brca", "mimic3_demo"])
def test_the_other_bundled_tables_keep_their_plan_at_any_noise(name):
    from fedsynth.server.app import resolve_schema

    model = get_generator("marginal")(resolve_schema(name))
    default = model.plan()
    for noise in (0.5, summed_noise([(3.0, 1e-5)] * 18), 50.0):
        assert model.plan(noise=noise) == default


@pytest.fixture(scope="module")
def pooled(heart_schema, heart_files) -> pd.DataFrame:
    return pd.concat([read_table(heart_files[s], heart_schema) for s in SITES],
                     ignore_index=True)


def test_a_central_fit_at_high_noise_releases_the_outcome_plan_exactly(heart_schema,
                                                                       pooled):
    model = get_generator("marginal")(heart_schema, seed=1, **SMALL)
    model.fit(pooled, epsilon=0.45, randomness=DPRandomness.reproducible(7, "test"))
    info = model.fit_info
    plan = MarginalPlan.from_dict(info["plan"])
    assert plan == model.plan(noise=budget_noise(0.45, 1e-5)) and plan.select_share == 0
    assert plan.outcome_split == 1  # the outcome pairs collapsed (outcome_split.py)
    history = [tuple(h) for h in zip(info["ledger"]["noise"], info["ledger"]["rate"],
                                     info["ledger"]["count"], strict=True)]
    assert history == [tuple(h) for h in planned_ledger(plan, calibrate(
        plan, 0.45, 1e-5)).history]
    assert abs(info["epsilon"] - _independent(history, 1e-5, "rdp")) < 1e-6
    assert info["epsilon"] <= 0.45
    outcome = heart_schema.outcome.column
    chosen = [tuple(c) for c in info["selected"]]
    assert len(chosen) == plan.per_round and all(outcome in c for c in chosen)


def test_a_site_answers_the_status_request_with_its_budget_only(
        heart_schema, heart_schema_path, heart_files):
    from fedsynth.client.measure import answer
    from fedsynth.client.site import SiteState

    site = SiteConfig(name="cleveland", data_path=str(heart_files["cleveland"]),
                      schema_path=str(heart_schema_path), epsilon=1.5)
    study = StudyConfig(generator="marginal")
    state = SiteState()
    config = {**study.to_flat(), P.SCHEMA_FINGERPRINT: schema_fingerprint(heart_schema),
              P.PLAN: json.dumps(get_generator("marginal")(heart_schema).plan().to_dict()),
              P.OP: P.STATUS_OP}
    reply = answer(site, study, config, {}, {}, state)
    assert reply.values is None and reply.chunks is None  # nothing released
    assert reply.reply.metrics[P.EPSILON_BUDGET] == 1.5
    assert reply.reply.metrics[P.DELTA] == site.delta
    assert state.ledger.history == [] and state.ledger.epsilon(site.delta) == 0.0


@pytest.mark.slow
def test_a_federated_study_plans_for_its_sites_summed_noise(tmp_path):
    """3 sites at epsilon 0.6 (summed noise 10.8): the outcome plan, asked of every site
    after one status request, each site's ledger exactly that plan's."""
    from fedsynth.client.site import SiteState
    from fedsynth.server.app import resolve_schema
    from fedsynth.simulations.simulate import SimulationOptions, prepare_sites
    from tests.flower_support import run_recorded

    study = StudyConfig(generator="marginal", generator_params=SMALL, min_sites=2,
                        output_dir=str(tmp_path / "study"), n_synthetic=100,
                        study_id="outcome-plan-test")
    sites, _, _ = prepare_sites(SimulationOptions(sites=SITES, epsilon=0.6, study=study),
                                tmp_path)
    sites = [replace(s, reproducible_noise_seed=40 + i) for i, s in enumerate(sites)]
    outcome, grid = run_recorded(study, sites, "heart_disease")
    schema = resolve_schema("heart_disease")
    configs = [dict(m.content[P.CONFIG]) for m in grid.sent]
    ops = [c[P.OP] for c in configs]
    assert ops[: len(sites)] == [P.STATUS_OP] * len(sites)  # one status message each
    assert P.STATUS_OP not in ops[len(sites):] and P.SCORE_OP not in ops
    expected = get_generator("marginal")(schema, **SMALL).plan(
        noise=summed_noise([(0.6, s.delta) for s in sites]))
    assert expected.select_share == 0 and expected.rounds == 1
    asked = {c[P.PLAN] for c in configs[len(sites):]}
    # the round's outcome pairs were asked collapsed (outcome_split.py)
    assert expected.outcome_split == 1
    assert SPLIT in {c.get(P.RELEASE_KIND) for c in configs}
    assert asked == {json.dumps(expected.to_dict())}
    planned = planned_ledger(expected, calibrate(expected, 0.6, 1e-5))
    for ctx in grid._grid.contexts.values():  # nothing charged for the status request
        ledger = SiteState.from_record(dict(ctx.state["fedsynth-site"])).ledger
        assert [tuple(h) for h in ledger.history] == [tuple(h) for h in planned.history]
        assert abs(ledger.epsilon(1e-5) - _independent(
            [tuple(h) for h in ledger.history], 1e-5, "rdp")) < 1e-6
        assert 0.599 <= ledger.epsilon(1e-5) <= 0.6
    summary = json.loads((Path(outcome.output_dir) / "summary.json").read_text())
    assert summary["marginal"]["plan"] == expected.to_dict()
    outcome_col = schema.outcome.column
    assert all(outcome_col in c for c in summary["marginal"]["selected"])
    assert len(summary["marginal"]["selected"]) == expected.per_round
    assert np.isfinite(summary["rounds_completed"])
