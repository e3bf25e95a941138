"""The pair release of the marginal generator (``code_pairs.py``): every co-occurrence
count of the frequent codes in one Gaussian release of L2 sensitivity sqrt(C(b, 2)).

Real AMLSG rows (54 mutated genes as binary codes), real mbi, the real site code.
"""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import get_privacy_spent

from fedsynth.common import protocol as P
from fedsynth.common.bundled import bundled_schema_path
from fedsynth.common.generators import get_generator
from fedsynth.common.generators.marginal.code_pairs import (
    above_floor,
    bounded_pair_counts,
    capped,
    entry_columns,
    pair_cliques,
    pair_units,
)
from fedsynth.common.generators.marginal.fit import Measurement
from fedsynth.common.generators.marginal.plan import (
    CODES,
    PAIRS,
    MarginalPlan,
    calibrate,
    planned_ledger,
)
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.study import SiteConfig, StudyConfig, schema_fingerprint
from tests.flower_support import run_recorded

SMALL = {"bins": 4, "fine_bins": 16, "rounds": 1, "per_round": 2, "iters": 100,
         "pair_codes": 8}


@pytest.fixture(scope="module")
def amlsg() -> tuple:
    from fedsynth.simulations.datasets import load_site_frames

    schema, frames = load_site_frames("amlsg")
    return schema, frames


def _presence(schema, frame: pd.DataFrame) -> tuple[np.ndarray, dict[str, int], list[str]]:
    """The frame's code presence matrix, each code's column, and the binary codes most
    frequent in the frame first."""
    disc = get_generator("marginal")(schema, **SMALL).discretizer
    presence, columns = disc.code_presence(frame), entry_columns(disc.code_attrs)
    return presence, columns, sorted(disc.direct_codes,
                                     key=lambda a: -presence[:, columns[a]].sum())


@pytest.mark.parametrize("bound", [2, 3, 4])
def test_one_patient_moves_the_pair_vector_by_at_most_the_bound(amlsg, bound):
    schema, frames = amlsg
    frame = frames["centre_43"]
    presence, columns, direct = _presence(schema, frame)
    cliques = pair_cliques(direct[:20])
    base = bounded_pair_counts(presence, columns, cliques, bound)
    # a patient with few codes counts fully: the bounded counts are the exact ones
    has = presence[:, [columns[a] for a in direct[:20]]]
    few = has.sum(axis=1) <= bound
    exact = np.array([int(np.sum(few & (has[:, direct.index(a)] > 0)
                                 & (has[:, direct.index(b)] > 0))) for a, b in cliques])
    assert np.allclose(bounded_pair_counts(presence[few], columns, cliques, bound), exact)
    # adding any one patient, up to one with all 20 codes (190 pairs), moves the vector
    # by at most sqrt(C(bound, 2)) in L2, and exactly that once they have bound codes
    for k in (0, 1, bound, bound + 1, 9, 20):
        row = np.zeros((1, presence.shape[1]), dtype=np.int64)
        row[0, [columns[a] for a in direct[:k]]] = 1
        moved = bounded_pair_counts(np.vstack([presence, row]), columns, cliques, bound)
        norm = float(np.linalg.norm(moved - base))
        assert norm <= math.sqrt(pair_units(bound)) + 1e-9
        if k >= bound:
            assert norm == pytest.approx(math.sqrt(pair_units(bound)))
    # the weighting is per patient: removing a heavy patient changes nothing else
    heavy = int(np.argmax(has.sum(axis=1)))
    assert has[heavy].sum() >= 4
    rest = np.delete(presence, heavy, axis=0)
    moved = base - bounded_pair_counts(rest, columns, cliques, bound)
    assert np.count_nonzero(moved) == math.comb(int(has[heavy].sum()), 2)


def test_the_plan_charges_the_pair_release_as_c_of_b_2_gaussians():
    plan = MarginalPlan(14, 2, 8, 8, 0.2, 0.0, 8, 0.1, 4, 0.25, 3, 24, 0.2)
    noise = calibrate(plan, 3.0, 1e-5)
    ledger = planned_ledger(plan, noise)
    assert (noise.pairs, 1.0, 3) in [tuple(h) for h in ledger.history]
    assert ledger.epsilon(1e-5) <= 3.0 + 1e-9
    # the pairs' noise is set by their share and the bound alone (not by how many pairs)
    rho = sum(c / (2 * s * s) for s, _, c in ledger.history)
    assert 3 / (2 * noise.pairs ** 2) == pytest.approx(0.2 * rho)
    with pytest.raises(ValueError, match="pair_bound"):
        MarginalPlan(14, 2, 8, 8, 0.2, 0.0, pair_bound=1, pair_codes=24, pairs_share=0.1)
    with pytest.raises(ValueError, match="pair_bound"):
        MarginalPlan(14, 2, 8, 8, 0.2, 0.0, pair_bound=3, pair_codes=24, pairs_share=0.0)


def _site(tmp_path: Path, frame: pd.DataFrame, **kw) -> SiteConfig:
    path = tmp_path / "site.csv"
    frame.to_csv(path, index=False)
    return SiteConfig(name="s", data_path=str(path),
                      schema_path=str(bundled_schema_path("amlsg")), epsilon=3.0, **kw)


def _request(schema, params: dict, cliques: list, kind: str = PAIRS) -> dict:
    study = StudyConfig(generator="marginal", generator_params=params)
    plan = get_generator("marginal")(schema, **params).plan()
    return {**study.to_flat(), P.SCHEMA_FINGERPRINT: schema_fingerprint(schema),
            P.PLAN: json.dumps(plan.to_dict()), P.OP: P.MEASURE_OP, P.RELEASE_KIND: kind,
            P.STEP: 3, P.CLIQUES: json.dumps([list(c) for c in cliques])}


def test_a_site_clips_at_home_and_charges_the_bound(tmp_path, amlsg):
    from fedsynth.client.measure import answer
    from fedsynth.client.site import SiteState

    schema, frames = amlsg
    frame = frames["centre_43"]
    params = {**SMALL, "pair_bound": 3, "pairs_share": 0.2}
    presence, columns, direct = _presence(schema, frame)
    cliques = pair_cliques(direct[:8])
    study = StudyConfig(generator="marginal", generator_params=params)
    config = _request(schema, params, cliques)
    # without DP the reply is the site's bounded counts exactly: the weighting happens
    # at the site, on its own rows, before anything leaves
    exact = answer(_site(tmp_path, frame, dp=False), study, config, {}, {}, SiteState())
    bounded = bounded_pair_counts(presence, columns, cliques, 3)
    assert np.allclose(exact.values, bounded)
    assert not np.allclose(bounded, bounded_pair_counts(presence, columns, cliques, 20))
    # with DP: noise on top, and the ledger holds C(3, 2) = 3 Gaussians at its noise
    state = SiteState()
    reply = answer(_site(tmp_path, frame), study, config, {}, {}, state)
    sigma = reply.reply.metrics[P.SIGMA_RELEASED]
    assert reply.reply.status == "trained" and reply.values.shape == (len(cliques),)
    assert [tuple(h) for h in state.ledger.history] == [(sigma, 1.0, 3)]
    plan = MarginalPlan.from_dict(json.loads(config[P.PLAN]))
    assert sigma == pytest.approx(calibrate(plan, 3.0, 1e-5).pairs)


def test_a_site_refuses_a_pair_release_its_plan_does_not_give_a_share(tmp_path, amlsg):
    from fedsynth.client.measure import answer
    from fedsynth.client.site import SiteState

    schema, frames = amlsg
    frame = frames["centre_43"]
    site = _site(tmp_path, frame)
    _, _, direct = _presence(schema, frame)
    on = {**SMALL, "pair_bound": 3, "pairs_share": 0.2}
    cases = [
        ({**SMALL, "pair_bound": 0}, pair_cliques(direct[:4]), "no share for 'pairs'"),
        (on, [*pair_cliques(direct[:4]), (direct[1], direct[0])], "asked twice"),
        (on, pair_cliques(direct[:9]), "at most 8"),  # the plan's public cap
        (on, [(direct[0], "age")], "not a pair of two distinct binary codes"),
    ]
    for params, cliques, says in cases:
        study = StudyConfig(generator="marginal", generator_params=params)
        state = SiteState()
        reply = answer(site, study, _request(schema, params, cliques), {}, {}, state)
        assert reply.reply.status == P.Status.REFUSED and reply.values is None
        assert says in reply.reply.problems[0]
        assert not state.ledger.history  # nothing charged, nothing sent


@pytest.mark.slow
def test_central_fit_accounts_every_release_and_reads_the_pairs(amlsg):
    schema, frames = amlsg
    pooled = pd.concat([frames[s] for s in ("centre_43", "other_centres")],
                       ignore_index=True)
    params = {**SMALL, "pair_bound": 3, "pairs_share": 0.25, "codes_share": 0.3}
    model = get_generator("marginal")(schema, seed=1, **params)
    model.fit(pooled, epsilon=3.0, randomness=DPRandomness.reproducible(3, "test"))
    info, plan = model.fit_info, model.plan()
    history = [tuple(h) for h in zip(info["ledger"]["noise"], info["ledger"]["rate"],
                                     info["ledger"]["count"], strict=True)]
    noise = calibrate(plan, 3.0, 1e-5)
    assert history == [tuple(h) for h in planned_ledger(plan, noise).history]
    assert (noise.pairs, 1.0, 3) in history
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
    # the 8 most frequent genes' 28 pairs were released; the strongest association of
    # AML (NPM1 with DNMT3A: 2.2x what independence predicts) is read by the model
    assert info["pairs_released"] == 28
    read = {frozenset(c) for c in info["pairs_in_model"]}
    assert frozenset({"mut_NPM1", "mut_DNMT3A"}) in read
    syn = model.sample(2000, seed=1)
    npm1, dnmt3a = syn["mut_NPM1"].astype(int), syn["mut_DNMT3A"].astype(int)
    both = float(np.mean(npm1 & dnmt3a))
    assert both > 1.5 * npm1.mean() * dnmt3a.mean()
    # no round measures a pair of two genes again
    assert not [c for c in info["selected"] if all(a.startswith("mut_") for a in c)]


def _amlsg_study(tmp_path: Path, secure: bool, **extra) -> tuple:
    """A 3-centre AMLSG study through the real ServerApp code and ClientApp."""
    from fedsynth.simulations.simulate import (
        SimulationOptions,
        prepare_sites,
        setup_simulation_keys,
    )

    params = {**SMALL, "pair_bound": 3, "pairs_share": 0.2, **extra}
    study = StudyConfig(generator="marginal", generator_params=params, min_sites=3,
                        output_dir=str(tmp_path / "study"), n_synthetic=300,
                        secure_aggregation="ckks" if secure else "none",
                        study_id="pairs-test")
    opts = SimulationOptions(dataset="amlsg", sites=("centre_43", "centre_34", "centre_2"),
                             epsilon=3.0, study=study)
    sites, _, _ = prepare_sites(opts, tmp_path)
    if secure:
        study, sites = setup_simulation_keys(tmp_path, study, sites)
    outcome, grid = run_recorded(study, sites, "amlsg")
    return outcome, grid, sites


@pytest.mark.slow
@pytest.mark.parametrize("by_site", [False, True])
def test_a_federated_study_sends_the_pair_release(tmp_path, amlsg, by_site):
    from fedsynth.client.site import SiteState

    outcome, grid, sites = _amlsg_study(tmp_path, secure=False, site_attribute=by_site)
    configs = [dict(m.content[P.CONFIG]) for m in grid.sent]
    asked = [json.loads(c[P.CLIQUES]) for c in configs if c.get(P.RELEASE_KIND) == PAIRS]
    # one pair message to each site, every pair of the chosen genes in it
    assert len(asked) == len(sites) and all(a == asked[0] for a in asked)
    codes = list(dict.fromkeys(a for c in asked[0] for a in c))
    assert 2 <= len(codes) <= 8 and asked[0] == [list(p) for p in combinations(codes, 2)]
    plan = MarginalPlan.from_dict(json.loads(configs[0][P.PLAN]))
    planned = planned_ledger(plan, calibrate(plan, 3.0, 1e-5))
    for ctx in grid._grid.contexts.values():  # each site's own ledger is the plan's
        ledger = SiteState.from_record(dict(ctx.state["fedsynth-site"])).ledger
        assert [tuple(h) for h in ledger.history] == [tuple(h) for h in planned.history]
        assert 2.99 <= ledger.epsilon(1e-5) <= 3.0
    summary = json.loads((Path(outcome.output_dir) / "summary.json").read_text())
    assert summary["marginal"]["pairs_released"] == len(asked[0])
    assert summary["marginal"]["pairs_in_model"]
    assert all(len(c) == 2 for c in summary["marginal"]["pairs_in_model"])
    synthetic = pd.read_csv(Path(outcome.output_dir) / "synthetic.csv")
    assert len(synthetic) == 300 and set(codes) <= set(synthetic.columns)
    # with the site attribute each site's pair counts are read on (site, gene, gene)
    assert summary["marginal"]["site_attribute"] == (sorted(s.name for s in sites)
                                                     if by_site else [])


@pytest.mark.slow
def test_under_ckks_the_coordinator_sees_only_the_sum_of_the_pair_counts(tmp_path, amlsg):
    schema, _ = amlsg
    outcome, grid, sites = _amlsg_study(tmp_path, secure=True)
    asked, total = None, None
    for msg in grid.sent:
        cfg = dict(msg.content[P.CONFIG])
        reply = next(r for r in grid.received
                     if r.metadata.reply_to_message_id == msg.metadata.message_id)
        if cfg.get(P.RELEASE_KIND) == PAIRS and cfg[P.OP] == P.MEASURE_OP:
            assert P.COUNTS_RECORD not in reply.content  # a site sends ciphertexts only
            assert P.CKKS_COUNTS in reply.content
            asked = [tuple(c) for c in json.loads(cfg[P.CLIQUES])]
        elif cfg[P.OP] == P.DECRYPT_OP and asked is not None and total is None:
            total = np.asarray(reply.content[P.COUNTS_RECORD][P.VALUES].numpy())
    assert asked and total is not None and total.shape == (len(asked),)
    # the decrypted vector is the sum of the three sites' weighted pair counts plus
    # their noise: close to the pooled counts
    from fedsynth.common.table import read_table

    pooled = pd.concat([read_table(Path(s.data_path), schema) for s in sites],
                       ignore_index=True)  # the sites' training rows (holdout kept out)
    presence, columns, _ = _presence(schema, pooled)
    exact = bounded_pair_counts(presence, columns, asked, 3)
    model = get_generator("marginal")(schema, **{**SMALL, "pair_bound": 3, "pairs_share": 0.2})
    sigma = math.sqrt(len(sites)) * calibrate(model.plan(), 3.0, 1e-5).pairs
    assert np.abs(total - exact).max() < 5 * sigma
    assert Path(outcome.output_dir, "synthetic.csv").exists()


def test_pair_floor_keeps_the_pairs_of_codes_clear_of_the_pair_noise(amlsg):
    """``pair_floor``: the model reads a released pair only when both codes' noisy
    histogram counts are at least ``floor`` pair-noise stds, a choice made from the code
    histogram alone (so it selects no pair noise). Real AMLSG rows, their 8 most
    frequent genes' 28 pairs."""
    schema, frames = amlsg
    frame = frames["other_centres"]
    presence, columns, frequent = _presence(schema, frame)
    codes, sd = frequent[:8], 20.0
    counts = {a: float(presence[:, columns[a]].sum()) for a in codes}
    code_meas = [Measurement((a,), np.array([counts[a]]), np.asarray(5.0), kind=CODES)
                 for a in codes]
    cliques = pair_cliques(codes)
    pairs = bounded_pair_counts(presence, columns, cliques, 3)
    pair_meas = [Measurement(c, np.array([v]), np.asarray(sd), kind=PAIRS)
                 for c, v in zip(cliques, pairs, strict=True)]
    assert above_floor(pair_meas, code_meas, 0.0) == set(cliques)
    floor = float(np.median(list(counts.values()))) / sd  # half the codes clear it
    kept = above_floor(pair_meas, code_meas, floor)
    clear = {a for a in codes if counts[a] >= floor * sd}
    assert 0 < len(clear) < len(codes)
    assert kept == {c for c in cliques if set(c) <= clear}
    # the pair counts themselves play no part
    moved = [Measurement(m.clique, m.values + 1000.0, m.stddev, kind=PAIRS) for m in pair_meas]
    assert above_floor(moved, code_meas, floor) == kept
    # in a fit: a floor no code clears leaves every released pair out of the model
    pooled = pd.concat([frames[s] for s in ("centre_43", "other_centres")],
                       ignore_index=True)
    params = {**SMALL, "pair_bound": 3, "pairs_share": 0.25, "codes_share": 0.3,
              "pair_floor": 1e6}
    model = get_generator("marginal")(schema, seed=1, **params)
    model.fit(pooled, epsilon=3.0, randomness=DPRandomness.reproducible(3, "test"))
    assert model.fit_info["pairs_released"] == 28 and model.fit_info["pairs_in_model"] == []


def test_pair_cap_reads_no_more_patients_with_both_codes_than_with_either(amlsg):
    """``pair_cap``: a pooled pair count is read capped at the smaller of its codes'
    noisy histogram counts (clipped at 0), so a rare code's pair cannot drag its 1-way
    count up; the cap is never below what independence predicts, so no pair's sign
    against independence changes. Real AMLSG rows at 18 sites' summed noise stds."""
    schema, frames = amlsg
    frame = frames["other_centres"]
    presence, columns, frequent = _presence(schema, frame)
    codes, n = frequent[:12], len(frame)
    rng = np.random.default_rng(0)  # test noise, not a release
    hist = {a: float(presence[:, columns[a]].sum()) + rng.normal(0, 18.5) for a in codes}
    code_meas = [Measurement((a,), np.array([hist[a]]), np.asarray(18.5), kind=CODES)
                 for a in codes]
    cliques = pair_cliques(codes)
    noisy = bounded_pair_counts(presence, columns, cliques, 3) + rng.normal(0, 22, len(cliques))
    pair_meas = [Measurement(c, np.array([v]), np.asarray(22.0), kind=PAIRS)
                 for c, v in zip(cliques, noisy, strict=True)]
    read = capped(pair_meas, code_meas)
    ones = {a: max(v, 0.0) for a, v in hist.items()}
    lowered = 0
    for m, r in zip(pair_meas, read, strict=True):
        a, b = m.clique
        top = min(ones[a], ones[b])
        assert float(r.values[0]) == min(float(m.values[0]), top)
        expected = ones[a] * ones[b] / n
        assert np.sign(float(r.values[0]) - expected) == np.sign(float(m.values[0]) - expected)
        lowered += float(r.values[0]) < float(m.values[0])
    assert lowered > 0  # the noise does put some pairs above a code's count
    per_site = [Measurement(m.clique, np.array([[5e3], [5e3]]), np.array([1.0, 1.0]),
                            by_site=True, kind=PAIRS) for m in pair_meas[:3]]
    assert all(np.array_equal(r.values, m.values)
               for m, r in zip(per_site, capped(per_site, code_meas), strict=True))
