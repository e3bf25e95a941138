"""The link release of the marginal generator (``event_links.py``): every binary
covariate's counts in each cell of the survival event and time, in one Gaussian release
of L2 sensitivity sqrt(link_bound).

Real TCGA-BRCA rows (38 one-hot clinical indicators, event E, time T; 6 regions) and
real AMLSG rows, real mbi, the real site code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import get_privacy_spent

from fedsynth.common import protocol as P
from fedsynth.common.bundled import bundled_schema_path
from fedsynth.common.generators import get_generator
from fedsynth.common.generators.marginal.event_links import (
    PRESENT,
    bounded_link_counts,
    link_cliques,
    link_covariates,
    slice_length,
    whole_covariates,
)
from fedsynth.common.generators.marginal.plan import (
    LINKS,
    MarginalPlan,
    calibrate,
    planned_ledger,
)
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.study import SiteConfig, StudyConfig, schema_fingerprint
from tests.flower_support import run_recorded

SMALL = {"bins": 4, "fine_bins": 16, "rounds": 1, "per_round": 2, "iters": 100,
         "link_bound": 6, "links_share": 0.3}
TAIL = ("E",)  # the default tail (link_time False)


@pytest.fixture(scope="module")
def tcga() -> tuple:
    from fedsynth.simulations.datasets import load_site_frames

    return load_site_frames("tcga_brca")


def _cells(schema, frame: pd.DataFrame, params: dict | None = None) -> tuple:
    disc = get_generator("marginal")(schema, **(params or SMALL)).discretizer
    return disc.encode(frame), disc.names, disc.shape, link_covariates(disc, schema)


@pytest.mark.parametrize("bound", [1, 6, 10])
def test_one_patient_moves_the_link_vector_by_at_most_the_bound(tcga, bound):
    schema, frames = tcga
    frame = next(iter(frames.values()))
    cells, names, sizes, allowed = _cells(schema, frame)
    assert len(allowed) == 38 and "E" not in allowed
    cliques = link_cliques(allowed, ("E", "T"))  # the finer tail: one cell per patient too
    base = bounded_link_counts(cells, names, sizes, cliques, bound)
    inner = sizes["E"] * sizes["T"]
    assert base.shape == (38 * inner,)
    # a patient with at most ``bound`` covariates counts fully: each slice is the exact
    # (E, T) histogram of the patients holding the covariate
    col = {a: i for i, a in enumerate(names)}
    has = np.stack([cells[:, col[c]] == PRESENT for c in allowed], axis=1)
    few = has.sum(axis=1) <= bound
    sub = bounded_link_counts(cells[few], names, sizes, cliques, bound).reshape(38, inner)
    for j in (0, 5, 37):
        rows = cells[few & has[:, j]]
        exact = np.bincount(rows[:, col["E"]] * sizes["T"] + rows[:, col["T"]],
                            minlength=inner)
        assert np.array_equal(sub[j], exact)
    # adding any one patient, up to one holding all 38 covariates, moves the vector by at
    # most sqrt(bound) in L2, exactly that from ``bound`` covariates on
    for k in (0, 1, bound, bound + 1, 14, 38):
        row = cells[:1].copy()
        for a in allowed:
            row[0, col[a]] = 0
        for a in allowed[:k]:
            row[0, col[a]] = PRESENT
        moved = bounded_link_counts(np.vstack([cells, row]), names, sizes, cliques, bound)
        norm = float(np.linalg.norm(moved - base))
        assert norm <= math.sqrt(bound) + 1e-9
        assert norm == pytest.approx(math.sqrt(min(k, bound)))
    # the weight is the patient's own: removing one patient changes only its k entries
    heavy = int(np.argmax(has.sum(axis=1)))
    moved = base - bounded_link_counts(np.delete(cells, heavy, axis=0), names, sizes,
                                       cliques, bound)
    assert np.count_nonzero(moved) == int(has[heavy].sum()) >= 12


def test_categorical_covariates_count_whole_and_within_the_bound():
    from fedsynth.simulations.datasets import load_site_frames

    schema, frames = load_site_frames("amlsg")
    frame = frames["centre_43"]
    disc = get_generator("marginal")(schema, **SMALL).discretizer
    cells, names, sizes = disc.encode(frame), disc.names, disc.shape
    whole = whole_covariates(disc)
    assert whole == ["sex", "ecog", "aml_type", "cyto_risk"]
    cov = ["complex_karyotype", *whole, "mut_NPM1", "mut_FLT3", "mut_DNMT3A", "mut_TP53"]
    cliques = link_cliques(cov, ("death",))
    base = bounded_link_counts(cells, names, sizes, cliques, 8, whole)
    lengths = [slice_length(c, sizes, whole) for c in cliques]
    assert len(base) == sum(lengths) and lengths[1] == sizes["sex"] * sizes["death"]
    # a categorical slice is the whole (a, death) marginal: every patient in one cell
    # (all patients here have at most 8 entries, so none is scaled)
    parts = np.split(base, np.cumsum(lengths)[:-1])
    assert parts[1].sum() == pytest.approx(len(frame))
    col = {a: i for i, a in enumerate(names)}
    for k_genes in (0, 2, 5):  # 4 categorical entries + 0..5 binary ones
        row = cells[:1].copy()
        for a in cov[5:] + ["complex_karyotype"]:
            row[0, col[a]] = 0
        for a in (["complex_karyotype"] + cov[5:])[:k_genes]:
            row[0, col[a]] = PRESENT
        moved = bounded_link_counts(np.vstack([cells, row]), names, sizes, cliques, 8, whole)
        assert float(np.linalg.norm(moved - base)) == pytest.approx(
            math.sqrt(min(4 + k_genes, 8)))


def test_the_plan_charges_the_link_release_as_bound_gaussians():
    plan = MarginalPlan(41, 2, 8, 8, 0.2, 0.0, 2, 0.1, link_bound=10, link_covariates=38,
                        links_share=0.3)
    noise = calibrate(plan, 3.0, 1e-5)
    ledger = planned_ledger(plan, noise)
    assert (noise.links, 1.0, 10) in [tuple(h) for h in ledger.history]
    assert ledger.epsilon(1e-5) <= 3.0 + 1e-9
    rho = sum(c / (2 * s * s) for s, _, c in ledger.history)
    assert 10 / (2 * noise.links ** 2) == pytest.approx(0.3 * rho)
    assert plan.share_left == pytest.approx(0.4)
    with pytest.raises(ValueError, match="link_bound"):
        MarginalPlan(41, 2, 8, 8, 0.2, 0.0, link_bound=10, link_covariates=38)
    with pytest.raises(ValueError, match="sum < 1"):
        MarginalPlan(41, 2, 8, 8, 0.5, 0.0, link_bound=10, link_covariates=38,
                     links_share=0.6)


def test_the_release_is_on_only_with_a_binary_event_and_binary_covariates():
    from fedsynth.common.bundled import bundled_schema

    def plan(name: str, **kw):
        return get_generator("marginal")(bundled_schema(name), **kw).plan()

    tcga, amlsg = plan("tcga_brca", links_share=0.45), plan("amlsg")
    assert (tcga.link_bound, tcga.link_covariates) == (10, 38)
    assert plan("tcga_brca").link_bound == 0  # off by default there (model.SHARES)
    # AMLSG: 4 genes a patient, plus one entry for each of its 4 categorical columns
    assert amlsg.link_bound == 8 and amlsg.link_covariates == 40
    # heart disease has no survival outcome, MIMIC's codes are grouped (no binary
    # covariate): their plans are what they were
    for name in ("heart_disease", "mimic3_demo"):
        assert plan(name) == plan(name, link_bound=0)
        assert plan(name).link_bound == 0
    assert plan("tcga_brca", link_bound=0).links_share == 0.0


def _site(tmp_path: Path, frame: pd.DataFrame, **kw) -> SiteConfig:
    path = tmp_path / "site.csv"
    frame.to_csv(path, index=False)
    return SiteConfig(name="s", data_path=str(path),
                      schema_path=str(bundled_schema_path("tcga_brca")), epsilon=3.0, **kw)


def _request(schema, params: dict, cliques: list) -> dict:
    study = StudyConfig(generator="marginal", generator_params=params)
    plan = get_generator("marginal")(schema, **params).plan()
    return {**study.to_flat(), P.SCHEMA_FINGERPRINT: schema_fingerprint(schema),
            P.PLAN: json.dumps(plan.to_dict()), P.OP: P.MEASURE_OP, P.RELEASE_KIND: LINKS,
            P.STEP: 4, P.CLIQUES: json.dumps([list(c) for c in cliques])}


def test_a_site_weights_at_home_and_charges_the_bound(tmp_path, tcga):
    from fedsynth.client.measure import answer
    from fedsynth.client.site import SiteState

    schema, frames = tcga
    frame = next(iter(frames.values()))
    cells, names, sizes, allowed = _cells(schema, frame)
    cliques = link_cliques(allowed, ("E",))
    study = StudyConfig(generator="marginal", generator_params=SMALL)
    config = _request(schema, SMALL, cliques)
    # without DP the reply is the site's weighted counts exactly (on the unbinned cells:
    # E is binary, so the request needs no binning)
    exact = answer(_site(tmp_path, frame, dp=False), study, config, {}, {}, SiteState())
    weighted = bounded_link_counts(cells, names, sizes, cliques, 6)
    assert np.allclose(exact.values, weighted)
    assert not np.allclose(weighted, bounded_link_counts(cells, names, sizes, cliques, 38))
    state = SiteState()
    reply = answer(_site(tmp_path, frame), study, config, {}, {}, state)
    sigma = reply.reply.metrics[P.SIGMA_RELEASED]
    assert reply.reply.status == "trained" and reply.values.shape == weighted.shape
    assert [tuple(h) for h in state.ledger.history] == [(sigma, 1.0, 6)]
    plan = MarginalPlan.from_dict(json.loads(config[P.PLAN]))
    assert sigma == pytest.approx(calibrate(plan, 3.0, 1e-5).links)


def test_a_site_refuses_an_unplanned_or_malformed_link_release(tmp_path, tcga):
    from fedsynth.client.measure import answer
    from fedsynth.client.site import SiteState

    schema, frames = tcga
    frame = next(iter(frames.values()))
    site = _site(tmp_path, frame)
    allowed = _cells(schema, frame)[3]
    few = {**SMALL, "link_covariates": 5}
    cases = [
        ({**SMALL, "link_bound": 0}, link_cliques(allowed[:4], ("E",)), "no share for 'links'"),
        (SMALL, [*link_cliques(allowed[:4], ("E",)), (allowed[0], "E")], "asked twice"),
        (few, link_cliques(allowed[:6], ("E",)), "at most 5"),  # the plan's public cap
        (SMALL, [("age_at_index", "E")], "not a binary or categorical covariate"),
        (SMALL, [("E", "E")], "not a binary or categorical covariate"),
        (SMALL, link_cliques(allowed[:2], ("age_at_index",)), "not a survival event"),
        (SMALL, [(allowed[0], "E"), (allowed[1], "E", "T")], "same tail"),
    ]
    for params, cliques, says in cases:
        study = StudyConfig(generator="marginal", generator_params=params)
        state = SiteState()
        reply = answer(site, study, _request(schema, params, cliques), {}, {}, state)
        assert reply.reply.status == P.Status.REFUSED and reply.values is None, says
        assert says in reply.reply.problems[0]
        assert not state.ledger.history  # nothing charged, nothing sent


@pytest.mark.slow
def test_central_fit_accounts_every_release_and_reads_the_links(tcga):
    schema, frames = tcga
    pooled = pd.concat(frames.values(), ignore_index=True)
    model = get_generator("marginal")(schema, seed=1, **SMALL)
    model.fit(pooled, epsilon=3.0, randomness=DPRandomness.reproducible(3, "test"))
    info, plan = model.fit_info, model.plan()
    history = [tuple(h) for h in zip(info["ledger"]["noise"], info["ledger"]["rate"],
                                     info["ledger"]["count"], strict=True)]
    noise = calibrate(plan, 3.0, 1e-5)
    assert history == [tuple(h) for h in planned_ledger(plan, noise).history]
    assert (noise.links, 1.0, 6) in history
    # an independent accountant over the whole sequence: Opacus' RDP, step by step
    acc = RDPAccountant()
    for sigma, rate, count in history:
        for _ in range(int(count)):
            acc.step(noise_multiplier=sigma, sample_rate=rate)
    assert abs(acc.get_epsilon(delta=1e-5) - info["epsilon"]) < 1e-6
    orders = np.array(RDPAccountant.DEFAULT_ALPHAS)
    rho = sum(c / (2 * s * s) for s, _, c in history)
    closed, _ = get_privacy_spent(orders=orders, rdp=orders * rho, delta=1e-5)
    assert abs(info["epsilon"] - closed) < 1e-6 and info["epsilon"] <= 3.0
    # every covariate's link is in the model, and no round measures one again
    linked = {c[0] for c in info["links_in_model"]}
    assert len(linked) == 38 and all(tuple(c[1:]) == TAIL for c in info["links_in_model"])
    assert not [c for c in info["selected"] if set(c) & set(TAIL) and set(c) & linked]
    # treatment "not reported" patients die about 3x as often as the others in these
    # rows; the model's sample keeps the direction
    syn = model.sample(4000, seed=1)
    col = "treatment_or_therapy_not reported"
    real = pooled.groupby(col)["E"].mean()
    fake = syn.groupby(syn[col].astype(int))["E"].mean()
    assert real[1] > 2 * real[0] and fake[1] > 1.3 * fake[0]


def _tcga_study(tmp_path: Path, secure: bool) -> tuple:
    """A 3-region TCGA-BRCA study through the real ServerApp code and ClientApp."""
    from fedsynth.simulations.simulate import (
        SimulationOptions,
        prepare_sites,
        setup_simulation_keys,
    )

    study = StudyConfig(generator="marginal", generator_params=SMALL, min_sites=3,
                        output_dir=str(tmp_path / "study"), n_synthetic=300,
                        secure_aggregation="ckks" if secure else "none",
                        study_id="links-test")
    regions = tuple(sorted(load_regions())[:3])
    opts = SimulationOptions(dataset="tcga_brca", sites=regions, epsilon=3.0, study=study)
    sites, _, _ = prepare_sites(opts, tmp_path)
    if secure:
        study, sites = setup_simulation_keys(tmp_path, study, sites)
    outcome, grid = run_recorded(study, sites, "tcga_brca")
    return outcome, grid, sites


def load_regions() -> list[str]:
    from fedsynth.simulations.datasets import load_site_frames

    return list(load_site_frames("tcga_brca")[1])


@pytest.mark.slow
def test_a_federated_study_sends_the_link_release(tmp_path, tcga):
    from fedsynth.client.site import SiteState

    outcome, grid, sites = _tcga_study(tmp_path, secure=False)
    configs = [dict(m.content[P.CONFIG]) for m in grid.sent]
    asked = [json.loads(c[P.CLIQUES]) for c in configs if c.get(P.RELEASE_KIND) == LINKS]
    # one link message to each site, every binary covariate linked to the event
    assert len(asked) == len(sites) and all(a == asked[0] for a in asked)
    assert len(asked[0]) == 38 and all(tuple(c[1:]) == TAIL for c in asked[0])
    plan = MarginalPlan.from_dict(json.loads(configs[0][P.PLAN]))
    planned = planned_ledger(plan, calibrate(plan, 3.0, 1e-5))
    for ctx in grid._grid.contexts.values():  # each site's own ledger is the plan's
        ledger = SiteState.from_record(dict(ctx.state["fedsynth-site"])).ledger
        assert [tuple(h) for h in ledger.history] == [tuple(h) for h in planned.history]
        assert 2.99 <= ledger.epsilon(1e-5) <= 3.0
    summary = json.loads((Path(outcome.output_dir) / "summary.json").read_text())
    assert len(summary["marginal"]["links_in_model"]) == 38
    synthetic = pd.read_csv(Path(outcome.output_dir) / "synthetic.csv")
    assert len(synthetic) == 300 and set(synthetic["E"].unique()) <= {0, 1}


@pytest.mark.slow
def test_under_ckks_the_coordinator_sees_only_the_sum_of_the_link_counts(tmp_path, tcga):
    schema, _ = tcga
    outcome, grid, sites = _tcga_study(tmp_path, secure=True)
    asked, total = None, None
    for msg in grid.sent:
        cfg = dict(msg.content[P.CONFIG])
        reply = next(r for r in grid.received
                     if r.metadata.reply_to_message_id == msg.metadata.message_id)
        if cfg.get(P.RELEASE_KIND) == LINKS and cfg[P.OP] == P.MEASURE_OP:
            assert P.COUNTS_RECORD not in reply.content  # a site sends ciphertexts only
            assert P.CKKS_COUNTS in reply.content
            asked = [tuple(c) for c in json.loads(cfg[P.CLIQUES])]
            binning = cfg.get(P.BINNING, "")
        elif cfg[P.OP] == P.DECRYPT_OP and asked is not None and total is None:
            total = np.asarray(reply.content[P.COUNTS_RECORD][P.VALUES].numpy())
    assert asked and total is not None
    # the decrypted vector is the sum of the three sites' weighted counts plus their
    # noise: close to the pooled counts on the study's (DP-cut) time bins
    from fedsynth.common.generators.marginal.model import study_discretizer
    from fedsynth.common.table import read_table

    pooled = pd.concat([read_table(Path(s.data_path), schema) for s in sites],
                       ignore_index=True)  # the sites' training rows (holdout kept out)
    disc = study_discretizer(schema, SMALL, binning)
    exact = bounded_link_counts(disc.encode(pooled), disc.names, disc.shape, asked, 6)
    assert total.shape == exact.shape
    model = get_generator("marginal")(schema, **SMALL)
    sigma = math.sqrt(len(sites)) * calibrate(model.plan(), 3.0, 1e-5).links
    assert np.abs(total - exact).max() < 5 * sigma
    assert Path(outcome.output_dir, "synthetic.csv").exists()
