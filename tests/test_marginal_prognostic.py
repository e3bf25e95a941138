"""The schema's ``prognostic`` covariates and the marginal generator's survival workload.

On TCGA-BRCA at 6 regions' summed noise every link to (time, event) carries noise std
18 against 129 deaths; the workload links only the covariates the schema names as
prognostic (domain knowledge), so a Cox model on synthetic rows does not read noise on
race or the AJCC edition as risk (docs/generators.md "Prognostic covariates").

Real TCGA rows, real mbi; small settings.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from opacus.accountants import RDPAccountant

from fedsynth.common.bundled import bundled_schema
from fedsynth.common.generators import get_generator
from fedsynth.common.generators.marginal.engine import workload_order
from fedsynth.common.generators.marginal.plan import calibrate, planned_ledger
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.schema import Schema, SchemaError

SURV = ["T", "E"]


def _schema(**extra) -> dict:
    return {"name": "s", "columns": [
        {"name": "age", "kind": "integer", "min": 18, "max": 90},
        {"name": "stage", "kind": "binary"}, {"name": "race", "kind": "binary"},
        {"name": "T", "kind": "survival_time", "min": 0, "max": 100, "event": "E"},
        {"name": "E", "kind": "binary"}], **extra}


def test_schema_reads_checks_and_writes_the_prognostic_list():
    schema = Schema.from_dict(_schema(prognostic=["age", "stage"]))
    assert schema.prognostic == ("age", "stage")
    assert Schema.from_dict(schema.to_dict()).prognostic == ("age", "stage")
    assert "prognostic" not in schema.extra
    assert Schema.from_dict(_schema()).prognostic == ()
    for bad, words in ((["age", "grade"], "'grade'"), (["T"], "'T'"), ("age", "a list")):
        with pytest.raises(SchemaError, match="prognostic") as err:
            Schema.from_dict(_schema(prognostic=bad))
        assert words in str(err.value)
    raw = _schema(prognostic=["age"])
    raw["columns"] = raw["columns"][:3]  # no survival outcome
    with pytest.raises(SchemaError, match="no column is a survival_time"):
        Schema.from_dict(raw)


def test_workload_links_only_the_prognostic_covariates_and_them_first():
    names = ["age", "race", "stage", "grade", "T", "E"]
    every = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    variation = {"age": 500, "race": 450, "stage": 100, "grade": 300, "T": 300, "E": 200}
    order = [every[i] for i in workload_order(every, variation, SURV, {}, ["age", "stage"])]
    # the survival queue whole first: the pair itself, then each covariate by variation,
    # its event pair, then its time pair
    assert order[:5] == [("T", "E"), ("age", "E"), ("age", "T"), ("stage", "E"),
                         ("stage", "T")]
    # no other covariate is linked to survival; every non-survival pair stays
    assert not [c for c in order if set(c) & set(SURV) and set(c) & {"race", "grade"}]
    assert sorted(order[5:]) == sorted(c for c in every if not set(c) & set(SURV))
    assert len(set(order)) == len(order)
    # without the list: the former order exactly
    assert workload_order(every, variation, SURV, {}, ()) == workload_order(
        every, variation, SURV, {})
    # the survival queue measured whole (more rounds than the list needs): the rest
    # alone, then nothing; the engine stops when nothing is left (was: max() of nothing)
    rest = [c for c in every if not set(c) & set(SURV)]
    assert [rest[i] for i in workload_order(rest, variation, SURV, {}, ["age"])] != []
    assert workload_order([], variation, SURV, {}, ["age"]) == []


@pytest.fixture(scope="module")
def tcga() -> tuple:
    from fedsynth.simulations.datasets import load_site_frames

    schema, frames = load_site_frames("tcga_brca")
    return schema, pd.concat(frames.values(), ignore_index=True)


def test_bundled_tcga_names_its_prognostic_covariates():
    schema = bundled_schema("tcga_brca")
    assert "age_at_index" in schema.prognostic
    assert not [c for c in schema.prognostic if "race" in c or "edition" in c]
    assert set(schema.prognostic) < set(schema.names) - {"T", "E"}


def test_central_fit_measures_only_prognostic_links_and_accounts_exactly(tcga):
    schema, pooled = tcga
    model = get_generator("marginal")(schema, seed=1, iters=150, rounds=2, per_round=5)
    model.fit(pooled, epsilon=3.0, randomness=DPRandomness.reproducible(4, "test"))
    info, plan = model.fit_info, model.plan()
    linked = [c for c in info["selected"] if set(c) & set(SURV)]
    assert linked[0] == ["T", "E"] and len(linked) == 10  # the survival queue first
    assert all(set(c) - set(SURV) <= set(schema.prognostic) for c in linked)
    history = [tuple(h) for h in zip(info["ledger"]["noise"], info["ledger"]["rate"],
                                     info["ledger"]["count"], strict=True)]
    assert history == [tuple(h) for h in planned_ledger(plan, calibrate(
        plan, 3.0, 1e-5)).history]
    acc = RDPAccountant()
    for sigma, rate, count in history:
        for _ in range(int(count)):
            acc.step(noise_multiplier=sigma, sample_rate=rate)
    assert abs(acc.get_epsilon(delta=1e-5) - info["epsilon"]) < 1e-6
    # the hyperparameter: [] links every covariate again (the former workload), a name
    # outside the schema is one clear error
    every = get_generator("marginal")(schema, seed=1, iters=150, rounds=2, per_round=5,
                                      prognostic=[])
    every.fit(pooled, epsilon=3.0, randomness=DPRandomness.reproducible(4, "test"))
    assert [c for c in every.fit_info["selected"] if set(c) & set(SURV)] != linked
    with pytest.raises(ValueError, match="prognostic names \\['grade'\\]"):
        get_generator("marginal")(schema, prognostic=["grade"])  # before any release
    assert np.isfinite(info["epsilon"]) and info["epsilon"] <= 3.0
