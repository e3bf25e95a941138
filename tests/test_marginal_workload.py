"""The marginal generator's public workload (``engine.workload_order``) and plans
without a score release (``select_share`` 0): what a study with many sites uses, where
the sites' summed noise drowns the selection scores (docs/generators.md).

Real heart-disease rows, real mbi, the real site code; small settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import get_privacy_spent

from fedsynth.common import protocol as P
from fedsynth.common.generators import get_generator
from fedsynth.common.generators.marginal.engine import workload_order
from fedsynth.common.generators.marginal.plan import MarginalPlan, calibrate, planned_ledger
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.study import SiteConfig, StudyConfig, schema_fingerprint
from fedsynth.common.table import read_table

NO_SCORES = {"bins": 6, "rounds": 2, "per_round": 3, "candidates": 10, "iters": 150,
             "workload": True}


def test_wide_tables_get_the_workload_and_no_score_share_by_default(heart_schema):
    from fedsynth.simulations.datasets import load_site_frames

    heart = get_generator("marginal")(heart_schema)
    assert not heart.workload() and heart.plan().select_share == 0.15  # 91 pairs
    tcga, _ = load_site_frames("tcga_brca")  # 41 attributes, 820 pairs
    wide = get_generator("marginal")(tcga)
    assert wide.workload() and wide.plan().select_share == 0.0
    # an explicit choice wins either way
    assert get_generator("marginal")(tcga, workload=False).plan().select_share == 0.15
    assert get_generator("marginal")(heart_schema, workload=True).plan().select_share == 0


def test_workload_order_puts_survival_then_codes_then_the_rest_by_variation():
    names = ["age", "sex", "T", "E", "c_a", "c_b", "c_c"]
    every = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    variation = {"age": 500, "sex": 400, "T": 300, "E": 200, "c_a": 150, "c_b": 90,
                 "c_c": 5}
    order = [every[i] for i in workload_order(every, variation, ["T", "E"],
                                              {"c_a": 1, "c_b": 1, "c_c": 1})]
    assert sorted(order) == sorted(every)  # a permutation: nothing dropped
    # taken in turn: the survival pair itself, the most varied code pair, the most
    # varied other pair; then the most varied covariate with the event, later the time
    assert order[:3] == [("T", "E"), ("c_a", "c_b"), ("age", "sex")]
    assert order[3] == ("age", "E") and order[6] == ("age", "T")  # event, then time
    codes = [c for c in order if all(a.startswith("c_") for a in c)]
    assert codes == [("c_a", "c_b"), ("c_a", "c_c"), ("c_b", "c_c")]  # rarest last
    # a table without survival or codes: one queue, most varied pairs first
    plain = [every[i] for i in workload_order(every, variation, [], {})]
    assert plain[0] == ("age", "sex") and plain[-1] == ("c_b", "c_c")


@pytest.fixture(scope="module")
def pooled(heart_schema, heart_files) -> pd.DataFrame:
    return pd.concat([read_table(heart_files[s], heart_schema)
                      for s in ("cleveland", "hungarian", "switzerland")], ignore_index=True)


def test_a_plan_without_scores_releases_only_counts_and_accounts_exactly(
        heart_schema, pooled):
    model = get_generator("marginal")(heart_schema, seed=2, **NO_SCORES)
    model.fit(pooled, epsilon=3.0, randomness=DPRandomness.reproducible(5, "test"))
    info = model.fit_info
    history = [tuple(h) for h in zip(info["ledger"]["noise"], info["ledger"]["rate"],
                                     info["ledger"]["count"], strict=True)]
    plan = model.plan()
    # fine histograms, 1-way marginals, then the rounds' measurements (the ledger
    # merges consecutive releases at one noise level): no score release
    assert history == [tuple(h) for h in planned_ledger(plan, calibrate(
        plan, 3.0, 1e-5)).history]
    assert len(history) == 3
    assert history[2][2] == NO_SCORES["per_round"] * NO_SCORES["rounds"]
    orders = np.array(RDPAccountant.DEFAULT_ALPHAS)
    rho = sum(c / (2 * s * s) for s, _, c in history)
    closed, _ = get_privacy_spent(orders=orders, rdp=orders * rho, delta=1e-5)
    assert abs(info["epsilon"] - closed) < 1e-6 and info["epsilon"] <= 3.0
    # the outcome's pairs come first (the schema's outcome is the public workload's head)
    outcome = heart_schema.outcome.column
    chosen = [tuple(c) for c in info["selected"]]
    assert len(chosen) == NO_SCORES["rounds"] * NO_SCORES["per_round"]
    assert all(outcome in c for c in chosen[: NO_SCORES["per_round"]])
    # without the score share, the measurements get more of the budget
    scored = get_generator("marginal")(heart_schema, **{**NO_SCORES, "workload": False,
                                                         "select_share": 0.15})
    assert calibrate(plan, 3.0, 1e-5).measure < calibrate(scored.plan(), 3.0, 1e-5).measure
    syn = model.sample(300, seed=1)
    assert len(syn) == 300 and set(syn.columns) == set(pooled.columns)


def test_a_site_refuses_scores_the_plan_has_no_share_for(
        tmp_path, heart_schema, heart_schema_path, heart_files):
    from fedsynth.client.measure import answer
    from fedsynth.client.site import SiteState

    site = SiteConfig(name="cleveland", data_path=str(heart_files["cleveland"]),
                      schema_path=str(heart_schema_path), epsilon=3.0)
    study = StudyConfig(generator="marginal", generator_params=NO_SCORES)
    model = get_generator("marginal")(heart_schema, **NO_SCORES)
    plan: MarginalPlan = model.plan()
    state = SiteState()
    base = {**study.to_flat(), P.SCHEMA_FINGERPRINT: schema_fingerprint(heart_schema),
            P.PLAN: json.dumps(plan.to_dict())}
    ones = {**base, P.OP: P.MEASURE_OP, P.RELEASE_KIND: "one-way", P.STEP: 1,
            P.CLIQUES: json.dumps([[a] for a in model.discretizer.names])}
    assert answer(site, study, ones, {}, {}, state).reply.status == "trained"
    spent = state.ledger.epsilon(site.delta)
    pair = ("age", "sex")
    cells = int(np.prod([model.sizes[a] for a in pair]))
    score = {**base, P.OP: P.SCORE_OP, P.STEP: 2, P.CLIQUES: json.dumps([list(pair)])}
    reply = answer(site, study, score, {"p.0": np.full(cells, 1 / cells)}, {}, state)
    assert reply.reply.status == P.Status.REFUSED and reply.values is None
    assert "no share for 'score'" in reply.reply.problems[0]
    assert state.ledger.epsilon(site.delta) == spent  # nothing charged, nothing sent


@pytest.mark.slow
def test_a_federated_workload_study_sends_no_score_request(tmp_path, heart_schema):
    from fedsynth.client.site import SiteState
    from tests.test_marginal import _federated

    outcome, grid, _, _ = _federated(tmp_path, secure=False, workload=True)
    ops = [dict(m.content[P.CONFIG])[P.OP] for m in grid.sent]
    assert P.SCORE_OP not in ops and set(ops) == {P.STATUS_OP, P.MEASURE_OP}
    plan = MarginalPlan.from_dict(json.loads(dict(grid.sent[0].content[P.CONFIG])[P.PLAN]))
    assert plan.select_share == 0.0
    planned = planned_ledger(plan, calibrate(plan, 3.0, 1e-5))
    for ctx in grid._grid.contexts.values():  # each site's own ledger: the plan, all of it
        ledger = SiteState.from_record(dict(ctx.state["fedsynth-site"])).ledger
        assert [tuple(h) for h in ledger.history] == [tuple(h) for h in planned.history]
        assert 2.99 <= ledger.epsilon(1e-5) <= 3.0
    summary = json.loads((Path(outcome.output_dir) / "summary.json").read_text())
    assert len(summary["marginal"]["selected"]) == plan.rounds * plan.per_round
