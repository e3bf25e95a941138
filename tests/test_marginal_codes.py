"""Code sets in the marginal generator: the schema's public groups, the grouped
attributes, the bounded code histogram and what a site charges for it (codes.py).

On the real MIMIC-III demo (1,234 ICD-9 categories grouped by the 19 public chapters in
the bundled schema) and small hand-made code lists for the schema's edge cases.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
from opacus.accountants import RDPAccountant

from fedsynth.common import protocol as P
from fedsynth.common.bundled import bundled_schema, bundled_schema_path
from fedsynth.common.generators import ConditionError, get_generator
from fedsynth.common.generators.marginal.codes import (
    bounded_histogram,
    bounded_rows,
    code_weights,
)
from fedsynth.common.generators.marginal.model import study_discretizer
from fedsynth.common.generators.marginal.plan import (
    CODES,
    MarginalPlan,
    calibrate,
    planned_ledger,
)
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.schema import Schema, SchemaError
from fedsynth.common.study import StudyConfig, schema_fingerprint

SMALL: dict[str, Any] = {"rounds": 2, "per_round": 2, "candidates": 12, "iters": 200}


@pytest.fixture(scope="module")
def mimic() -> tuple[Schema, pd.DataFrame]:
    from fedsynth.simulations.datasets import mimic_patients

    schema = bundled_schema("mimic3_demo")
    return schema, mimic_patients(schema)


def _codeset_schema(groups: Any) -> dict[str, Any]:
    return {"name": "t", "columns": [
        {"name": "age", "kind": "integer", "min": 0, "max": 100},
        {"name": "dx", "kind": "codeset", "prefix": "dx_",
         "codes": ["401", "402", "428", "V45", "E880"], "groups": groups}]}


# ------------------------------------------------------------------- the schema option


def test_groups_by_prefix_and_by_named_ranges():
    by_prefix = Schema.from_dict(_codeset_schema({"prefix": 2}))
    assert by_prefix.code_groups("dx") == {"40": ["dx_401", "dx_402"], "42": ["dx_428"],
                                           "V4": ["dx_V45"], "E8": ["dx_E880"]}
    named = Schema.from_dict(_codeset_schema(
        {"circulatory": ["390..459"], "other": ["V45", "E880"]}))
    assert named.code_groups("dx") == {"circulatory": ["dx_401", "dx_402", "dx_428"],
                                       "other": ["dx_V45", "dx_E880"]}
    # published as written, and part of the fingerprint sites check
    again = Schema.from_dict(named.to_dict())
    assert again.code_groups("dx") == named.code_groups("dx")
    assert schema_fingerprint(named) != schema_fingerprint(by_prefix)


@pytest.mark.parametrize(("groups", "says"), [
    ({"prefix": 0}, "positive whole number"),
    ({"a": ["390..459"]}, "belong to no group"),
    ({"a": ["390..459", "V45", "E880"], "b": ["401"]}, "is in groups"),
    ({"a": ["390..459", "V45", "E880", "999"]}, "matches no code"),
    ([1, 2], "must be {prefix: N}"),
])
def test_bad_groups_are_one_clear_error(groups, says):
    with pytest.raises(SchemaError) as exc:
        Schema.from_dict(_codeset_schema(groups))
    assert "column 'dx'" in str(exc.value) and says in str(exc.value)


def test_bundled_mimic_schema_groups_every_code_by_its_chapter(mimic):
    schema, _ = mimic
    groups = schema.code_groups("dx")
    assert len(groups) == 19
    assert sorted(m for ms in groups.values() for m in ms) == sorted(schema.codesets["dx"])
    assert "dx_428" in groups["circulatory"] and "dx_V45" in groups["supplementary_v"]


# ------------------------------------------------------------------- cells and decoding


def test_a_group_is_one_attribute_counting_its_codes_and_decodes_inside_it(mimic):
    schema, frame = mimic
    disc = study_discretizer(schema, {"code_cap": 3})
    assert len(disc.names) == 5 + 19  # five columns and one attribute per chapter
    cells = disc.encode(frame)
    circ = disc.names.index("dx[circulatory]")
    members = disc.groups[[g.name for g in disc.groups].index("dx[circulatory]")].members
    exact = frame[list(members)].astype(int).sum(axis=1).to_numpy()
    assert np.array_equal(cells[:, circ], np.minimum(exact, 3))
    # decoding: a schema-valid table whose chapter counts are the cells (cap: "3 or more"
    # decodes to 3), every code inside its chapter
    out = disc.decode(cells, np.random.default_rng(0))
    assert list(out.columns) == schema.names
    back = disc.encode(out)
    assert np.array_equal(back, cells)
    # weights: codes with no weight are never drawn while others have weight
    g = disc.groups[[x.name for x in disc.groups].index("dx[circulatory]")]
    w = np.zeros(len(g.members))
    w[g.members.index("dx_428")] = 5.0
    w[g.members.index("dx_401")] = 1.0
    drawn = g.decode(np.full(2000, 1), w, np.random.default_rng(1))
    share = drawn.mean(axis=0)
    assert drawn.sum() == 2000 and set(np.flatnonzero(share)) <= {
        g.members.index("dx_428"), g.members.index("dx_401")}
    assert abs(share[g.members.index("dx_428")] - 5 / 6) < 0.03


def test_grouping_off_keeps_one_binary_attribute_per_code(mimic):
    schema, _ = mimic
    disc = study_discretizer(schema, {"group_codes": False})
    assert len(disc.names) == 5 + len(schema.codesets["dx"])
    assert disc.groups == []


# ------------------------------------------------------------------- the code histogram


def test_bounded_histogram_has_the_sensitivity_the_plan_charges(mimic):
    schema, frame = mimic
    disc = study_discretizer(schema, {})
    presence = disc.code_presence(frame)
    assert presence.sum(axis=1).max() > 8  # MIMIC patients carry up to 50 categories
    rng = np.random.default_rng(0)
    kept = bounded_rows(presence, 8, np.random.default_rng(0))
    # one patient is one row: at most 8 codes, only codes the patient has, so removing
    # the patient changes the histogram by a 0/1 vector of norm <= sqrt(8)
    assert np.array_equal(kept.sum(axis=1), np.minimum(presence.sum(axis=1), 8))
    assert np.all(kept <= presence)
    assert np.array_equal(bounded_histogram(presence, 8, np.random.default_rng(0)),
                          kept.sum(axis=0))
    # with a bound above anyone's count it is the exact per-code count
    assert np.array_equal(bounded_histogram(presence, 100, rng), presence.sum(axis=0))
    # decoding weights: noisy counts less two noise stds, never negative
    assert np.array_equal(code_weights(np.array([-3.0, 1.0, 10.0]), 2.0), [0.0, 0.0, 6.0])


def test_plan_charges_the_code_histogram_as_bound_gaussians():
    plan = MarginalPlan(24, 2, 12, 2, 0.25, 0.15, code_bound=8, codes_share=0.1)
    noise = calibrate(plan, 3.0, 1e-5)
    ledger = planned_ledger(plan, noise)
    assert (noise.codes, 1.0, 8) in [tuple(h) for h in ledger.history]
    acc = RDPAccountant()
    for sigma, rate, count in ledger.history:
        for _ in range(count):
            acc.step(noise_multiplier=sigma, sample_rate=rate)
    assert abs(acc.get_epsilon(delta=1e-5) - ledger.epsilon(1e-5)) < 1e-6
    assert ledger.epsilon(1e-5) <= 3.0 + 1e-9
    with pytest.raises(ValueError, match="code_bound and codes_share"):
        MarginalPlan(24, 2, 12, 2, 0.25, 0.15, code_bound=8, codes_share=0.0)


def test_site_answers_the_code_histogram_and_charges_its_bound(tmp_path, mimic):
    from fedsynth.client.measure import answer
    from fedsynth.client.site import SiteState
    from fedsynth.common.study import SiteConfig

    schema, frame = mimic
    path = tmp_path / "site.csv"
    frame.to_csv(path, index=False)
    site = SiteConfig(name="s", data_path=str(path),
                      schema_path=str(bundled_schema_path("mimic3_demo")), epsilon=3.0)
    study = StudyConfig(generator="marginal", generator_params=SMALL)
    model = get_generator("marginal")(schema, **SMALL)
    plan = model.plan()
    assert plan.code_bound == 6 and plan.attributes == 24  # 5 columns + 19 chapters
    groups = [[g.name] for g in model.discretizer.groups]
    base = {**study.to_flat(), "schema-fingerprint": schema_fingerprint(schema),
            P.PLAN: json.dumps(plan.to_dict()), P.OP: P.MEASURE_OP, P.RELEASE_KIND: CODES,
            P.STEP: 1}
    state = SiteState()
    reply = answer(site, study, {**base, P.CLIQUES: json.dumps(groups)}, {}, {}, state)
    assert reply.reply.status == "trained"
    assert reply.values is not None and reply.values.shape == (len(schema.codesets["dx"]),)
    sigma = reply.reply.metrics[P.SIGMA_RELEASED]
    assert [tuple(h) for h in state.ledger.history] == [(sigma, 1.0, 6)]
    # a request for only some groups is refused and charges nothing
    fresh = SiteState()
    part = answer(site, study, {**base, P.CLIQUES: json.dumps(groups[:3])}, {}, {}, fresh)
    assert part.reply.status == "refused" and not fresh.ledger.history


# ------------------------------------------------------------------- a central fit


@pytest.mark.slow
def test_central_fit_on_mimic_learns_code_frequencies_within_budget(mimic):
    schema, frame = mimic
    model = get_generator("marginal")(schema, seed=0, **SMALL)
    model.fit(frame, epsilon=3.0, randomness=DPRandomness.reproducible(0, "codes-test"))
    info = model.fit_info
    assert info["epsilon"] <= 3.0
    counts = [c for _, _, c in zip(*[info["ledger"][k] for k in ("noise", "rate", "count")],
                                   strict=True)]
    # the fine histograms of the 3 numeric columns, the 1-way marginals, the code histogram
    assert counts[:3] == [3, 24, 6]
    codes = schema.codesets["dx"]
    real_f = frame[codes].astype(float).mean().to_numpy()

    def corr(table: pd.DataFrame) -> float:
        return float(np.corrcoef(real_f, table[codes].astype(float).mean().to_numpy())[0, 1])

    syn = model.sample(2000, seed=1)
    assert set(np.unique(syn[codes].astype(int).to_numpy())) <= {0, 1}
    # the DP code histogram is what puts a chapter's codes where the patients have them:
    # the same model decoded uniformly inside each chapter is worse (on 100 patients
    # at eps 3 it is still far from exact: 0.43 on this seed, real-vs-real 0.87)
    weighted = corr(syn)
    model.discretizer.code_weights = {}
    uniform = corr(model.sample(2000, seed=1))
    assert weighted > 0.3 and weighted > uniform + 0.1  # 0.43 against 0.28 on this seed
    with pytest.raises(ConditionError, match="group 'dx\\[circulatory\\]'"):
        model.sample(5, conditions={"dx_428": 1})
    assert not math.isnan(float(syn["age"].mean()))


# ------------------------------------------------------------------- survival anchoring


def test_half_of_a_round_goes_to_pairs_holding_the_survival_columns():
    from fedsynth.common.generators.marginal.engine import pool_order

    names = [f"x{i}" for i in range(40)] + ["T", "E"]
    every = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    order = pool_order(every, ["T", "E"], 48, np.random.default_rng(0))
    assert sorted(order) == list(range(len(every)))  # a permutation: nothing dropped
    first = [every[i] for i in order[:48]]
    assert sum(bool({"T", "E"} & set(c)) for c in first[:24]) == 24
    # without anchors: the plain public random order (heart disease is unchanged)
    assert pool_order(every, [], 48, np.random.default_rng(0)) == [
        int(i) for i in np.random.default_rng(0).permutation(len(every))]
