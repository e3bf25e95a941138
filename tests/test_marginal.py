"""The marginal generator (issue 13): real heart-disease rows, real mbi, real Flower.

Small settings (few bins, one or two selection rounds, few iterations) keep it fast;
every assertion is about behaviour that matters: schema validity, exact conditions,
the privacy accounting against an independent accountant, and what the coordinator
can and cannot see.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedsynth.common import protocol as P
from fedsynth.common.generators import ConditionError, Generator, get_generator
from fedsynth.common.generators.marginal.discretize import Discretizer, discretizer_for
from fedsynth.common.generators.marginal.plan import MarginalPlan, calibrate, planned_ledger
from fedsynth.common.privacy import PrivacyLedger
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.study import StudyConfig
from fedsynth.common.table import conform, read_table
from tests.flower_support import run_recorded

SMALL = {"bins": 6, "rounds": 2, "per_round": 2, "candidates": 10, "iters": 150}
SITES = ("cleveland", "hungarian", "switzerland")


@pytest.fixture(scope="module")
def pooled(heart_schema, heart_files) -> pd.DataFrame:
    return pd.concat([read_table(heart_files[s], heart_schema) for s in SITES],
                     ignore_index=True)


@pytest.fixture(scope="module")
def fitted(heart_schema, pooled):
    model = get_generator("marginal")(heart_schema, seed=3, **SMALL)
    model.fit(pooled, epsilon=3.0, randomness=DPRandomness.reproducible(11))
    return model


# ------------------------------------------------------------------- discretization


def test_cells_come_from_the_schema_and_decode_to_valid_values(heart_schema, pooled):
    disc = Discretizer(heart_schema, bins=6)
    again = Discretizer(heart_schema, bins=6)
    assert disc.shape == again.shape  # no row involved in building it
    age = disc.attribute("age")
    assert age.size == 6 and disc.attribute("trestbps").size == 7  # + missing cell
    assert disc.attribute("cp").size == 4 and disc.attribute("slope").size == 4
    cells = disc.encode(pooled)
    decoded = disc.decode(cells, np.random.default_rng(0))
    conform(decoded, heart_schema)  # schema-valid: raises on any problem
    assert np.array_equal(disc.encode(decoded), cells)  # every value stays in its cell
    # the integer grid: ages are whole numbers spread over the bin, not bin midpoints
    assert decoded["age"].dtype == "Int64"
    assert decoded["age"].nunique() > 30
    # a missing value is its own cell, and decodes to missing
    assert (decoded["ca"].isna() == pooled["ca"].isna()).all()


def test_equal_mass_cuts_read_only_the_noisy_counts():
    from fedsynth.common.dp_histogram import equal_mass_cuts, isotonic_cdf

    rng = np.random.default_rng(0)
    counts = np.r_[np.zeros(20), rng.poisson(30, 24), np.zeros(20)] + rng.normal(0, 8, 64)
    cdf = isotonic_cdf(counts)
    assert np.all(np.diff(cdf) >= 0) and cdf[-1] == 1.0
    cuts = equal_mass_cuts(counts, 8)
    assert cuts[0] == 0 and cuts[-1] == 64 and np.all(np.diff(cuts) >= 1)
    # the mass sits in cells 20-43: most bins are cut there, not spread over the range
    assert np.sum((cuts[1:-1] >= 20) & (cuts[1:-1] <= 44)) >= 6
    # a histogram that is all noise still gives the public number of bins
    assert len(equal_mass_cuts(rng.normal(0, 5, 64), 8)) == 9
    assert list(equal_mass_cuts(np.ones(4), 8)) == [0, 1, 2, 3, 4]
    # noise far above the counts: the cuts fall back to (about) equal width
    noisy = np.r_[np.zeros(32), np.full(32, 3.0)] + rng.normal(0, 60, 64)
    assert np.abs(equal_mass_cuts(noisy, 8, noise_std=60.0) - np.arange(9) * 8).max() <= 2


class _Releases:
    """A stand-in for the sites: hands back given noisy fine vectors (and zeros for the
    1-way release on the bins), never sees a row."""

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors, self.sites, self.binnings, self.kinds = vectors, [], [], []

    def use(self, discretizer, binning: str) -> None:
        self.binnings.append(binning)
        self.shape = discretizer.shape

    def measure(self, cliques, kind):
        from fedsynth.common.generators.marginal.fit import Measurement

        self.kinds.append((kind, [c[0] for c in cliques]))
        return [Measurement(c, self.vectors[c[0]] if kind == "fine" else
                            np.zeros(self.shape[c[0]]), np.asarray(5.0), kind=kind)
                for c in cliques]


def test_bins_are_a_function_of_the_summed_noisy_fine_counts(heart_schema):
    from fedsynth.common.dp_histogram import equal_mass_cuts

    model = get_generator("marginal")(heart_schema, **SMALL)
    fine = Discretizer(heart_schema, model.fine_cells())
    rng = np.random.default_rng(1)
    noisy = {a.name: rng.normal(10, 5, a.size) for a in fine.attributes}
    releases = _Releases(noisy)
    ones = model._fine_one_way(releases)
    numeric = [a.name for a in fine.attributes if a.numeric]
    assert releases.kinds == [("fine", numeric), ("one-way", fine.names)]
    # what the sites are told: first the fine cells, then the cuts (no weights: public
    # cuts are all a site needs)
    assert json.loads(releases.binnings[0]) == {"fine": model.fine_cells()}
    sent = json.loads(releases.binnings[1])
    chol = model.discretizer.attribute("chol")
    expected = equal_mass_cuts(noisy["chol"][: fine.attribute("chol").bins], SMALL["bins"],
                               5.0)  # the stand-in's noise std
    assert sent["cuts"]["chol"] == list(expected) == list(chol.fine.cuts)
    assert "weights" not in sent and "weights" in json.loads(model.binning)
    # the model's 1-way of chol: sums of the fine noisy cells, noise std sqrt(width)
    meas = next(m for m in ones if m.clique == ("chol",) and m.kind == "fine")
    widths = np.diff(expected)
    assert np.allclose(meas.values[:-1], np.add.reduceat(noisy["chol"][:-1], expected[:-1]))
    assert meas.values[-1] == noisy["chol"][-1]  # the missing cell as released
    assert np.allclose(meas.cell_scale, np.r_[np.sqrt(widths), 1.0])
    # same releases, same bins: nothing else (no row) enters
    again = get_generator("marginal")(heart_schema, **SMALL)
    again._fine_one_way(_Releases(noisy))
    assert again.binning == model.binning
    assert model.sizes == get_generator("marginal")(heart_schema, **SMALL).sizes


def test_decoded_values_stay_in_their_bin_and_on_the_grid(heart_schema, pooled):
    from fedsynth.common.generators.marginal.discretize import FineCells

    fine = Discretizer(heart_schema, 64)
    rng = np.random.default_rng(2)
    cells = {}
    for a in fine.attributes:
        if a.numeric and a.bins > 6:
            inner = np.sort(rng.choice(np.arange(1, a.bins), 5, replace=False))
            w = np.clip(rng.normal(1, 1, a.bins), 0, None)
            cells[a.name] = FineCells(a.bins, (0, *map(int, inner), a.bins), tuple(w))
    disc = fine.refined(cells)
    assert disc.attribute("chol").size == 7  # 6 bins + missing
    codes = np.stack([rng.integers(0, a.size, 3000) for a in disc.attributes], axis=1)
    decoded = disc.decode(codes, np.random.default_rng(3))
    conform(decoded, heart_schema)
    assert np.array_equal(disc.encode(decoded), codes)  # every value back in its bin
    assert decoded["chol"].dtype == "Int64"
    op = decoded["oldpeak"].dropna().to_numpy(dtype=float)
    assert np.allclose(op * 10, np.round(op * 10))  # on the 0.1 grid
    # a fine cell with no weight is never drawn (unless its whole bin has none)
    chol = disc.attribute("chol")
    fine_of = fine.attribute("chol").value_cell(decoded["chol"].dropna().to_numpy(float))
    weights = np.asarray(chol.fine.weights)
    bin_of = np.searchsorted(np.asarray(chol.fine.cuts), fine_of, side="right") - 1
    lone = [np.asarray(chol.fine.weights)[chol.fine.cuts[b]:chol.fine.cuts[b + 1]].sum() == 0
            for b in bin_of]
    assert np.all((weights[fine_of] > 0) | np.asarray(lone))
    with pytest.raises(ValueError, match="rise strictly"):
        FineCells(10, (0, 5, 5, 10), tuple([1.0] * 10))


# ------------------------------------------------------------------- privacy accounting


def test_plan_is_calibrated_to_the_budget(heart_schema):
    model = get_generator("marginal")(heart_schema, **SMALL)
    plan = model.plan()
    for eps in (1.0, 3.0, 10.0):
        noise = calibrate(plan, eps, 1e-5)
        spent = planned_ledger(plan, noise).epsilon(1e-5)
        assert eps * 0.999 <= spent <= eps
    # more budget, less noise on every release kind
    lo, hi = calibrate(plan, 1.0, 1e-5), calibrate(plan, 10.0, 1e-5)
    assert hi.one_way < lo.one_way and hi.score < lo.score and hi.measure < lo.measure


def _independent(history: list[tuple[float, float, int]], delta: float, kind: str) -> float:
    """Compose every release directly with Opacus, one step call per release."""
    acc = RDPAccountant() if kind == "rdp" else PRVAccountant()
    for sigma, rate, count in history:
        for _ in range(count):
            acc.step(noise_multiplier=sigma, sample_rate=rate)
    return float(acc.get_epsilon(delta=delta))


@pytest.mark.slow
def test_reported_epsilon_equals_an_independent_accountant(fitted, heart_schema, pooled):
    info = fitted.fit_info
    history = list(zip(info["ledger"]["noise"], info["ledger"]["rate"],
                       info["ledger"]["count"], strict=True))
    d = len(heart_schema.columns)
    # the sequence: d one-way histograms, then per round the scores and the measurements
    numeric = [c.name for c in heart_schema.columns if c.is_numeric]
    assert history[0][2] == len(numeric) and history[1][2] == d
    assert len(history) == 2 + 2 * SMALL["rounds"]
    assert all(count == SMALL["per_round"] for _, _, count in history[3::2])
    # exactly the planned releases: the fine histograms, the 1-way marginals on the
    # bins cut from them, and per round the scores (the first round's against the
    # independent model) and the measurements
    noise = calibrate(fitted.plan(), 3.0, 1e-5)
    assert history == [tuple(h) for h in planned_ledger(fitted.plan(), noise).history]
    assert abs(info["epsilon"] - _independent(history, 1e-5, "rdp")) < 1e-6
    assert info["epsilon"] <= 3.0
    # rate-1 Gaussians compose into one Gaussian: closed-form RDP as a third opinion
    rho = sum(c / (2 * s * s) for s, _, c in history)
    orders = np.array(RDPAccountant.DEFAULT_ALPHAS)
    from opacus.accountants.analysis.rdp import get_privacy_spent

    closed, _ = get_privacy_spent(orders=orders, rdp=orders * rho, delta=1e-5)
    assert abs(info["epsilon"] - closed) < 1e-6
    # the PRV accountant, fed the same history by the ledger and step by step
    prv = PrivacyLedger("prv", history).epsilon(1e-5)
    assert abs(prv - _independent(history, 1e-5, "prv")) < 1e-6


# ------------------------------------------------------------------- central model


def test_fit_sample_save_load_round_trip(fitted, heart_schema, tmp_path):
    a = fitted.sample(300, seed=5)
    assert len(a) == 300
    conform(a, heart_schema)
    path = tmp_path / "model.fsg"
    fitted.save(path)
    loaded = Generator.load(path)
    assert loaded.name == "marginal"
    b = loaded.sample(300, seed=5)
    pd.testing.assert_frame_equal(a, b)
    # what it learnt: the disease rate is close to the real one (one noisy release)
    real = fitted_rate = None
    real = (fitted_source(heart_schema)["num"].astype(int) > 0).mean()
    fitted_rate = (a["num"].astype(int) > 0).mean()
    assert abs(real - fitted_rate) < 0.12


def fitted_source(schema) -> pd.DataFrame:
    from tests.conftest import HEART_FILES, data_dir

    return pd.concat([read_table(data_dir("heart_disease") / HEART_FILES[s], schema)
                      for s in SITES], ignore_index=True)


def test_conditional_sampling_is_exact(fitted):
    rows = fitted.sample(200, conditions={"sex": 0, "num": 1, "age": 50}, seed=1)
    assert len(rows) == 200
    assert (rows["sex"] == 0).all() and (rows["num"] == 1).all() and (rows["age"] == 50).all()
    missing = fitted.sample(50, conditions={"ca": None}, seed=2)
    assert missing["ca"].isna().all()
    with pytest.raises(ConditionError, match="categories"):
        fitted.sample(5, conditions={"cp": 9})
    with pytest.raises(ConditionError, match="outside the schema"):
        fitted.sample(5, conditions={"age": 130})
    balanced = fitted.sample_balanced(100, "sex", seed=3)
    assert balanced["sex"].value_counts().tolist() == [50, 50]


def _count_gaps(model, sampler: str, n: int) -> np.ndarray:
    """Per column: the largest gap between the drawn rows' cell counts and the model's."""
    from fedsynth.common.generators.marginal import fit

    model.hparams["sampler"] = sampler
    try:
        rows = model.sample(n, seed=7)
        assert rows.equals(model.sample(n, seed=7))  # a seed draws the same rows
    finally:
        model.hparams["sampler"] = "sample"
    conform(rows, model.schema)
    cells = model.discretizer.encode(rows)
    gaps = []
    for j, name in enumerate(model.discretizer.names):
        expected = fit.projected(model.mrf, (name,)) * n / float(model.mrf.total)
        drawn = np.bincount(cells[:, j], minlength=expected.size)
        gaps.append(np.abs(drawn - expected).max())
    return np.array(gaps)


def test_round_sampler_draws_the_models_counts_without_sampling_scatter(fitted):
    """Why "round" exists: rows drawn independently scatter each column's counts by
    about sqrt(n p (1 - p)) around the model's (AMLSG: as much as the code histogram's
    noise), mbi's randomized rounding keeps them within the rounding of each group of
    the junction tree. Post-processing of the same fitted model either way."""
    n = 2000
    sampled, rounded = _count_gaps(fitted, "sample", n), _count_gaps(fitted, "round", n)
    assert sampled.max() > 15  # the scatter of independent draws at this n
    assert rounded.max() < sampled.max() / 3 and rounded.mean() < sampled.mean() / 3
    with pytest.raises(ValueError, match="sampler"):
        get_generator("marginal")(fitted.schema, sampler="exact")


def test_unknown_hyperparameter_is_one_clear_error(heart_schema):
    with pytest.raises(ValueError, match="no hyperparameter"):
        get_generator("marginal")(heart_schema, epochs=3)


# ------------------------------------------------------------------- the site's side


def _site(tmp_path: Path, heart_schema_path: Path, heart_files, name: str, **kw: Any):
    from fedsynth.common.study import SiteConfig

    return SiteConfig(name=name, data_path=str(heart_files[name]),
                      schema_path=str(heart_schema_path), **kw)


def _request(study: StudyConfig, schema, plan: MarginalPlan, cliques, kind="one-way",
             op=P.MEASURE_OP, step=1) -> dict[str, Any]:
    from fedsynth.common.study import schema_fingerprint

    return {**study.to_flat(), "schema-fingerprint": schema_fingerprint(schema),
            P.PLAN: json.dumps(plan.to_dict()), P.OP: op, P.RELEASE_KIND: kind,
            P.CLIQUES: json.dumps([list(c) for c in cliques]), P.STEP: step}


def test_site_charges_every_release_and_refuses_past_its_budget(
        tmp_path, heart_schema, heart_schema_path, heart_files):
    from fedsynth.client.measure import answer
    from fedsynth.client.site import BUDGET_EXHAUSTED, SiteState

    site = _site(tmp_path, heart_schema_path, heart_files, "cleveland", epsilon=1.0)
    study = StudyConfig(generator="marginal", generator_params=SMALL)
    model = get_generator("marginal")(heart_schema, **SMALL)
    plan = model.plan()
    state = SiteState()
    one_way = [(a,) for a in model.discretizer.names]
    statuses = []
    for step in range(1, 40):  # a coordinator that keeps asking beyond its plan
        cfg = _request(study, heart_schema, plan, one_way if step == 1 else [("age", "sex")],
                       kind="one-way" if step == 1 else "measure", step=step)
        reply = answer(site, study, cfg, {}, {}, state).reply
        statuses.append(reply.status)
        assert state.ledger.epsilon(site.delta) <= site.epsilon
        if reply.status == BUDGET_EXHAUSTED:
            break
    assert statuses[0] == "trained" and statuses[-1] == BUDGET_EXHAUSTED
    # secret noise by default: the same request twice gives different vectors
    fresh = SiteState()
    cfg = _request(study, heart_schema, plan, one_way)
    a = answer(site, study, cfg, {}, {}, fresh).values
    b = answer(site, study, cfg, {}, {}, SiteState()).values
    assert a is not None and b is not None and not np.allclose(a, b)


# ------------------------------------------------------------------- federated, real apps


def _federated(tmp_path: Path, secure: bool, seeds: dict[str, int] | None = None,
               **params: Any):
    """A study through the real ServerApp code and ClientApp, in this process."""
    from fedsynth.simulations.simulate import (
        SimulationOptions,
        prepare_sites,
        setup_simulation_keys,
    )

    study = StudyConfig(generator="marginal", generator_params={**SMALL, **params},
                        min_sites=2,
                        output_dir=str(tmp_path / "study"), n_synthetic=200,
                        secure_aggregation="ckks" if secure else "none",
                        study_id="marginal-test")
    opts = SimulationOptions(sites=SITES, epsilon=3.0, study=study)
    sites, train, _ = prepare_sites(opts, tmp_path)
    sites = [replace(s, reproducible_noise_seed=(seeds or {}).get(s.name)) for s in sites]
    if secure:
        study, sites = setup_simulation_keys(tmp_path, study, sites)
    outcome, grid = run_recorded(study, sites, "heart_disease")
    return outcome, grid, sites, train


@pytest.mark.slow
def test_federated_study_through_the_real_apps(tmp_path, heart_schema):
    outcome, grid, sites, _ = _federated(tmp_path, secure=False, site_attribute=True)
    out = Path(outcome.output_dir)
    summary = json.loads((out / "summary.json").read_text())
    assert {m.metadata.message_type for m in grid.sent} == {P.MARGINAL_MESSAGE}
    # every site spent its budget by the plan, no more; the coordinator's record of it
    # is the site's own ledger (context.state), not a per-round figure
    contexts = grid._grid.contexts
    for ctx in contexts.values():
        from fedsynth.client.site import SiteState

        state = SiteState.from_record(dict(ctx.state["fedsynth-site"]))
        eps = state.ledger.epsilon(1e-5)
        assert 2.99 <= eps <= 3.0
    for name in SITES:
        assert 2.99 <= summary["sites"][name]["epsilon"] <= 3.0
    # the site attribute: the model knows each hospital's disease rate
    model = Generator.load(out / "model.fsg")
    assert model.sites == sorted(SITES)
    swiss = model.sample(400, site="switzerland", seed=1)
    hung = model.sample(400, site="hungarian", seed=1)
    rate = {n: (f["num"].astype(int) > 0).mean() for n, f in (("ch", swiss), ("hu", hung))}
    assert rate["ch"] > rate["hu"] + 0.2  # 0.93 vs 0.36 in the real data
    synthetic = read_table(out / "synthetic.csv", replace(heart_schema, header=True))
    assert len(synthetic) == 200


@pytest.mark.slow
def test_ckks_coordinator_sees_only_sums(tmp_path, heart_schema):
    seeds = {name: 100 + i for i, name in enumerate(SITES)}
    outcome, grid, sites, train = _federated(tmp_path, secure=True, seeds=seeds)
    # what each site released, recomputed from its reproducible (test-only) noise
    from fedsynth.client.measure import site_cells

    ops = [dict(m.content["config"]) for m in grid.sent]
    clear_values = []
    for msg, cfg in zip(grid.sent, ops, strict=True):
        reply = next(r for r in grid.received
                     if r.metadata.reply_to_message_id == msg.metadata.message_id)
        if cfg[P.OP] == P.STATUS_OP:  # the budget, in the metrics checked below
            assert P.COUNTS_RECORD not in reply.content and P.CKKS_COUNTS not in reply.content
        elif cfg[P.OP] != P.DECRYPT_OP:
            assert P.COUNTS_RECORD not in reply.content  # only ciphertexts
            assert P.CKKS_COUNTS in reply.content
        else:
            clear_values.append((cfg, np.asarray(reply.content[P.COUNTS_RECORD][P.VALUES].numpy())))
    assert clear_values
    # the first decrypted vector is the sum of the sites' noisy fine histograms of the
    # numeric columns (fine cells, no cuts yet); the second, the sum of their noisy
    # 1-way marginals on the bins cut from it: close to the exact pooled counts, and
    # far from any one site's counts
    first_cfg, first = clear_values[0]
    assert "cuts" not in json.loads(first_cfg[P.BINNING])
    fine = discretizer_for(heart_schema, SMALL["bins"], first_cfg[P.BINNING])
    assert first.size == sum(a.size for a in fine.attributes if a.numeric)
    cfg, total = clear_values[1]
    binning = cfg[P.BINNING]
    assert json.loads(binning)["cuts"].keys() == set(fine.numeric_names())
    disc = discretizer_for(heart_schema, SMALL["bins"], binning)
    exact_sites = []
    for s in sites:
        cells = site_cells(s, heart_schema, disc, SMALL["bins"], binning)
        exact_sites.append(np.concatenate([np.bincount(cells[:, j], minlength=n)
                                           for j, n in enumerate(disc.shape.values())]))
    pooled = np.sum(exact_sites, axis=0)
    sigma = math.sqrt(len(sites)) * max(
        calibrate(get_generator("marginal")(heart_schema, **SMALL).plan(), 3.0, 1e-5).one_way,
        1.0)
    assert np.abs(total - pooled).max() < 6 * sigma
    for one in exact_sites:
        assert np.abs(total - one).max() > 6 * sigma
    # nothing in clear from a site but status, epsilon and its noise levels
    for r in grid.received:
        metrics = set(dict(r.content["metrics"]))
        assert metrics <= P.MARGINAL_METRIC_KEYS
