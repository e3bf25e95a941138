"""Pairs with the outcome measured on its public {absent, present} split (issue 13,
sixth pass; ``outcome_split.py``).

The outcome plan (4 sites' summed noise) asks each (feature, outcome) pair with the
outcome's cells summed into the schema's absent / present groups. These tests check the
site's side against the plan: the release is the exact collapsed marginal plus noise,
charged as the plan's measurement round (and an independent accountant) to 1e-6, and a
request the plan does not allow is refused without a charge.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsynth.common import protocol as P
from fedsynth.common.generators import get_generator
from fedsynth.common.generators.marginal.outcome_split import ordered, outcome_split
from fedsynth.common.generators.marginal.plan import (
    SPLIT,
    calibrate,
    planned_ledger,
    summed_noise,
)
from fedsynth.common.study import SiteConfig, StudyConfig, schema_fingerprint
from fedsynth.common.table import read_table
from tests.test_marginal import _independent

FOUR_AT_1 = [(1.0, 1e-5)] * 4


def _ask(heart_schema, heart_schema_path, heart_files, plan, cliques, **site_kw):
    from fedsynth.client.measure import answer
    from fedsynth.client.site import SiteState

    site = SiteConfig(name="cleveland", data_path=str(heart_files["cleveland"]),
                      schema_path=str(heart_schema_path), reproducible_noise_seed=5,
                      **site_kw)
    study = StudyConfig(generator="marginal", study_id="split-test")
    state = SiteState()
    config = {**study.to_flat(), P.SCHEMA_FINGERPRINT: schema_fingerprint(heart_schema),
              P.PLAN: json.dumps(plan.to_dict()), P.OP: P.MEASURE_OP,
              P.CLIQUES: json.dumps([list(c) for c in cliques]), P.RELEASE_KIND: SPLIT,
              P.STEP: 1}
    return answer(site, study, config, {}, {}, state), state, site


def _lean(heart_schema):
    model = get_generator("marginal")(heart_schema)
    plan = model.plan(noise=summed_noise(FOUR_AT_1))
    outcome = heart_schema.outcome.column
    pairs = [ordered(c, outcome) for c in _pairs(model) if outcome in c]
    return model, plan, pairs


def _pairs(model):
    from fedsynth.common.generators.marginal import engine

    return engine.candidates(model.discretizer.names, model.sizes, [], 2,
                             int(model.hparams["max_clique_cells"]))


def test_heart_outcome_splits_into_absent_and_present_from_the_schema(heart_schema):
    model = get_generator("marginal")(heart_schema)
    split = outcome_split(heart_schema, model.discretizer)
    assert split is not None and split.outcome == "num"
    assert split.groups == (0, 1, 1, 1, 1)  # num 0 absent; 1-4 present (schema.yaml)
    counts = np.arange(10.0)  # a (sex, num) marginal: 2 x 5
    assert list(split.collapse(counts)) == [0, 1 + 2 + 3 + 4, 5, 6 + 7 + 8 + 9]
    assert np.allclose(split.matrix(2) @ counts, split.collapse(counts))
    # the epsilon-1 plan asks for it; epsilon 3's scored plan and the off switch do not
    assert model.plan(noise=summed_noise(FOUR_AT_1)).outcome_split == 1
    assert model.plan(noise=summed_noise([(3.0, 1e-5)] * 4)).outcome_split == 0
    assert get_generator("marginal")(heart_schema, outcome_split=False).plan(
        noise=summed_noise(FOUR_AT_1)).outcome_split == 0


def test_a_site_releases_the_collapsed_pairs_charged_as_the_planned_round(
        heart_schema, heart_schema_path, heart_files):
    model, plan, pairs = _lean(heart_schema)
    reply, state, site = _ask(heart_schema, heart_schema_path, heart_files, plan, pairs,
                              epsilon=1.0)
    assert reply.reply.status == P.Status.TRAINED and reply.values is not None
    split = outcome_split(heart_schema, model.discretizer)
    assert len(reply.values) == sum(split.length(c, model.sizes) for c in pairs)
    # the round's entry of the plan: per_round sensitivity-1 Gaussians at sigma_measure
    levels = calibrate(plan, 1.0, site.delta)
    assert [tuple(h) for h in state.ledger.history] == [
        tuple(planned_ledger(plan, levels).history[-1])]
    assert state.ledger.history[0][2] == plan.per_round == len(pairs)
    assert abs(state.ledger.epsilon(site.delta) - _independent(
        [tuple(h) for h in state.ledger.history], site.delta, "rdp")) < 1e-6


def test_a_site_without_dp_releases_the_exact_collapsed_counts(
        heart_schema, heart_schema_path, heart_files):
    _, plan, _ = _lean(heart_schema)
    reply, state, _ = _ask(heart_schema, heart_schema_path, heart_files, plan,
                           [("sex", "num")], dp=False)
    rows = read_table(heart_files["cleveland"], heart_schema)
    sick = rows["num"].astype(float) > 0
    male = rows["sex"].astype(float) == 1
    expected = [(~male & ~sick).sum(), (~male & sick).sum(), (male & ~sick).sum(),
                (male & sick).sum()]
    assert np.allclose(reply.values, expected)


@pytest.mark.parametrize("case", ["unplanned", "outcome-first", "outcome-alone"])
def test_a_site_refuses_an_unplanned_collapsed_measurement_without_a_charge(
        heart_schema, heart_schema_path, heart_files, case):
    model, lean, pairs = _lean(heart_schema)
    plan = model.plan() if case == "unplanned" else lean  # the scored plan: no split
    assert plan.outcome_split == (0 if case == "unplanned" else 1)
    cliques = {"unplanned": pairs, "outcome-first": [("num", "sex")],
               "outcome-alone": [("num",)]}[case]
    reply, state, _ = _ask(heart_schema, heart_schema_path, heart_files, plan, cliques,
                           epsilon=1.0)
    assert reply.reply.status == P.Status.REFUSED and reply.values is None
    assert reply.reply.problems
    assert state.ledger.history == [] and state.ledger.epsilon(1e-5) == 0.0
