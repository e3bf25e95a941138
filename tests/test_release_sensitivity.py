"""Every release a site makes, as the attacker who adds or removes one patient.

For each release kind the test computes the release's exact (noise-free) vector on a
real table with and without one patient, for the patients who move it most (the most
codes, the most missing values, the shortest and longest survival, values at the public
bounds) and a random sample of the others, and checks that the L2 move is at most the
sensitivity the noise and the ledger assume: a release charged as ``units``
sensitivity-1 Gaussians at noise std ``sigma`` per entry is the Gaussian mechanism of
L2 sensitivity sqrt(units), so ``move**2 <= units`` is the bound.

Real AMLSG rows (genes, survival, missing values; 1,540 patients pooled) and real heart
disease rows (the outcome's split), the real site code (``client.measure.answer``) for
the units each kind is charged.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest

from fedsynth.common import protocol as P
from fedsynth.common.bundled import bundled_schema_path
from fedsynth.common.generators import get_generator
from fedsynth.common.generators.marginal.code_pairs import (
    bounded_pair_counts,
    entry_columns,
    pair_cliques,
    pair_units,
)
from fedsynth.common.generators.marginal.codes import bounded_histogram, bounded_rows
from fedsynth.common.generators.marginal.event_links import (
    bounded_link_counts,
    link_cliques,
    link_covariates,
    whole_covariates,
)
from fedsynth.common.generators.marginal.measure import marginal, noisy_scores
from fedsynth.common.generators.marginal.model import study_discretizer
from fedsynth.common.generators.marginal.outcome_split import outcome_split
from fedsynth.common.generators.marginal.plan import (
    CODES,
    FINE,
    LINKS,
    MEASURE,
    ONE_WAY,
    PAIRS,
    SPLIT,
)
from fedsynth.common.privacy.release_noise import ReleaseNoise
from fedsynth.common.study import SiteConfig, StudyConfig, schema_fingerprint

SMALL = {"bins": 4, "fine_bins": 16, "rounds": 1, "per_round": 2, "iters": 100}
AMLSG = {**SMALL, "pair_codes": 24, "pair_bound": 3, "pairs_share": 0.2}


@pytest.fixture(scope="module")
def amlsg() -> tuple:
    from fedsynth.simulations.datasets import load_site_frames

    schema, frames = load_site_frames("amlsg")
    return schema, pd.concat(list(frames.values()), ignore_index=True)


@pytest.fixture(scope="module")
def heart() -> tuple:
    from fedsynth.simulations.datasets import load_site_frames

    schema, frames = load_site_frames("heart_disease")
    return schema, pd.concat(list(frames.values()), ignore_index=True)


def _worst(frame: pd.DataFrame, schema, presence: np.ndarray, sample: int = 40) -> list[int]:
    """The patients most likely to move a release most, and a random sample."""
    out = [int(np.argmax(presence.sum(axis=1))), int(np.argmin(presence.sum(axis=1))),
           int(np.argmax(frame.isna().sum(axis=1).to_numpy()))]
    for col in schema.columns:
        if col.is_numeric and col.name in frame:
            values = pd.to_numeric(frame[col.name], errors="coerce")
            if values.notna().any():
                out += [int(values.idxmin()), int(values.idxmax())]
    rng = np.random.default_rng(0)
    out += [int(i) for i in rng.choice(len(frame), size=sample, replace=False)]
    return list(dict.fromkeys(out))


def _largest_move(vector, rows: np.ndarray, patients: list[int]) -> float:
    """max over ``patients`` of ||vector(rows) - vector(rows without the patient)||_2."""
    full = vector(rows)
    return max(float(np.linalg.norm(full - vector(np.delete(rows, i, axis=0))))
               for i in patients)


def _site(tmp_path, frame: pd.DataFrame, dataset: str) -> SiteConfig:
    path = tmp_path / f"{dataset}.csv"
    if dataset == "heart_disease":  # the UCI files' own format: no header, '?' missing
        frame.to_csv(path, index=False, header=False, na_rep="?")
    else:
        frame.to_csv(path, index=False)
    return SiteConfig(name="s", data_path=str(path),
                      schema_path=str(bundled_schema_path(dataset)), epsilon=50.0)


def _charged(tmp_path, frame, dataset, schema, params, cliques, kind, binning="", plan=None):
    """The units the real site charges for this request (its ledger entry)."""
    from fedsynth.client.measure import answer
    from fedsynth.client.site import SiteState

    study = StudyConfig(generator="marginal", generator_params=params)
    plan = plan or get_generator("marginal")(schema, **params).plan()
    config = {**study.to_flat(), P.SCHEMA_FINGERPRINT: schema_fingerprint(schema),
              P.PLAN: json.dumps(plan.to_dict()), P.OP: P.MEASURE_OP, P.RELEASE_KIND: kind,
              P.STEP: 1, P.BINNING: binning,
              P.CLIQUES: json.dumps([list(c) for c in cliques])}
    state = SiteState()
    reply = answer(_site(tmp_path, frame, dataset), study, config, {}, {}, state)
    assert reply.reply.status == P.Status.TRAINED, reply.reply.problems
    (sigma, rate, units), = [tuple(h) for h in state.ledger.history]
    assert rate == 1.0 and sigma == reply.reply.metrics[P.SIGMA_RELEASED]
    return units, plan


def test_count_releases_move_by_at_most_their_charge(tmp_path, amlsg):
    """1-way, fine, several 2- and 3-way cliques in one request, the code histogram, the
    pairs and the links of AMLSG: each patient's removal moves the exact vector by at
    most sqrt(units charged)."""
    schema, frame = amlsg
    disc = study_discretizer(schema, AMLSG)
    names, sizes = disc.names, disc.shape
    cells, presence = disc.encode(frame), disc.code_presence(frame)
    patients = _worst(frame, schema, presence)
    moves: dict[str, tuple[float, int]] = {}

    def cliques_vector(cliques):
        return lambda c: np.concatenate([marginal(c, names, sizes, q) for q in cliques])

    one_way = [(a,) for a in names]
    units, _ = _charged(tmp_path, frame, "amlsg", schema, AMLSG, one_way, ONE_WAY)
    moves[ONE_WAY] = (_largest_move(cliques_vector(one_way), cells, patients), units)
    # the fine release: the numeric columns on the fine cells (missing cell included)
    binning = json.dumps({"fine": AMLSG["fine_bins"]})
    fine = study_discretizer(schema, AMLSG, binning)
    numeric = [(a.name,) for a in fine.attributes if getattr(a, "numeric", False)]
    assert numeric
    fcells = fine.encode(frame)
    units, _ = _charged(tmp_path, frame, "amlsg", schema, AMLSG, numeric, FINE, binning)
    moves[FINE] = (_largest_move(lambda c: np.concatenate(
        [marginal(c, fine.names, fine.shape, q) for q in numeric]), fcells, patients), units)
    # several cliques in one plain measurement, pairs and a triple, two sharing attributes
    plain = [tuple(names[:2]), tuple(names[1:4]), (names[0], names[-1]), tuple(names[2:4])]
    units, _ = _charged(tmp_path, frame, "amlsg", schema, AMLSG, plain, MEASURE)
    moves[MEASURE] = (_largest_move(cliques_vector(plain), cells, patients), units)
    # the code histogram: each patient's kept codes are its own row of ``bounded_rows``
    code_cliques = [(a,) for a in disc.code_attrs]
    units, plan = _charged(tmp_path, frame, "amlsg", schema, AMLSG, code_cliques, CODES)
    kept = bounded_rows(presence, plan.code_bound, np.random.default_rng(1))
    assert np.array_equal(kept.sum(axis=0), bounded_histogram(
        presence, plan.code_bound, np.random.default_rng(1)))
    moves[CODES] = (float(np.linalg.norm(kept, axis=1).max()), units)
    assert presence.sum(axis=1).max() > plan.code_bound  # the bound clips someone
    # pairs of the 24 most frequent genes, bound 3
    columns = entry_columns(disc.code_attrs)
    direct = sorted(disc.direct_codes, key=lambda a: -presence[:, columns[a]].sum())
    pairs = pair_cliques(direct[:24])
    units, plan = _charged(tmp_path, frame, "amlsg", schema, AMLSG, pairs, PAIRS)
    assert units == pair_units(plan.pair_bound) == 3
    moves[PAIRS] = (_largest_move(
        lambda p: bounded_pair_counts(p, columns, pairs, plan.pair_bound), presence,
        patients), units)
    # links: every allowed covariate (categorical ones counted whole), event and time
    allowed = link_covariates(disc, schema)
    time, event = schema.survival_pairs[0]
    tail = (event, time)
    links = link_cliques(allowed[:plan.link_covariates or 40], tail)
    units, plan = _charged(tmp_path, frame, "amlsg", schema, AMLSG, links, LINKS)
    whole = whole_covariates(disc)
    moves[LINKS] = (_largest_move(lambda c: bounded_link_counts(
        c, names, sizes, links, plan.link_bound, whole), cells, patients), units)
    print({k: (round(m, 4), u) for k, (m, u) in moves.items()})
    for kind, (move, units) in moves.items():
        assert move <= math.sqrt(units) + 1e-9, (kind, move, units)
    # the bounds are tight where they should be: a patient with many genes reaches them
    assert moves[PAIRS][0] == pytest.approx(math.sqrt(3))
    assert moves[ONE_WAY][0] == pytest.approx(math.sqrt(moves[ONE_WAY][1]))


def test_scores_move_by_at_most_one_each(amlsg):
    """The selection scores ``||M(D) - total p||_1``: ``p`` and ``total`` are fixed
    (public, or the site's earlier noisy release), so each moves by at most 1 and the
    vector of m scores by at most sqrt(m), the charge ``record(sigma, 1.0, m)``."""
    schema, frame = amlsg
    disc = study_discretizer(schema, AMLSG)
    names, sizes = disc.names, disc.shape
    cells = disc.encode(frame)
    patients = _worst(frame, schema, disc.code_presence(frame))
    cands = [tuple(names[i:i + 2]) for i in range(0, len(names) - 1, 3)][:12]
    cands += [tuple(names[i:i + 3]) for i in range(0, 12, 4)]  # triples are scored too
    rng = np.random.default_rng(0)
    model = [rng.dirichlet(np.ones(int(np.prod([sizes[a] for a in c])))) for c in cands]
    total = len(frame) + 7.3  # a noisy count, fixed for both neighbours

    def scores(c):
        return noisy_scores(c, names, sizes, cands, model, total, 0.0,
                            ReleaseNoise.reproducible(np.random.default_rng(0)))

    full = scores(cells)
    worst = max(float(np.abs(full - scores(np.delete(cells, i, axis=0))).max())
                for i in patients)
    assert worst <= 1.0 + 1e-9  # measured: 1.0 (AMLSG, 15 candidates)


def _one_way_then_score(study, schema, plan, disc, attr: str) -> tuple[dict, dict]:
    """A study's 1-way release request over every attribute, then a score request of
    ``attr`` alone (the two steps the rounding attacks use)."""
    base = {**study.to_flat(), P.SCHEMA_FINGERPRINT: schema_fingerprint(schema),
            P.PLAN: json.dumps(plan.to_dict()), P.STEP: 2}
    one_way = {**base, P.OP: P.MEASURE_OP, P.RELEASE_KIND: ONE_WAY,
               P.CLIQUES: json.dumps([[a] for a in disc.names])}
    return one_way, {**base, P.OP: P.SCORE_OP, P.CLIQUES: json.dumps([[attr]])}


def test_a_crafted_model_marginal_cannot_round_a_score_past_its_sensitivity(tmp_path, heart):
    """In floating point the score's sensitivity 1 holds only for moderate values: with
    ``total * p`` near 2**59 in one cell, ``|count - total p|`` rounds to a multiple of
    128, so one patient more or less in that cell moves the score by 128 or 0 and the
    noise (a few counts) is rounded away with it. On the old code the site scored any
    finite marginal the coordinator sent: its two neighbouring tables (63 and 64
    patients in the cell) gave scores 128 apart, with certainty. The site now scores
    probability vectors only, refuses the rest uncharged."""
    from fedsynth.client.measure import answer
    from fedsynth.client.site import SiteState

    schema, frame = heart
    params = {**SMALL, "outcome_plan_noise": 0}  # the default plan, with its score release
    plan = get_generator("marginal")(schema, **params).plan()
    assert plan.select_share > 0
    study = StudyConfig(generator="marginal", generator_params=params)
    disc = study_discretizer(schema, params)
    attr = "sex"
    col = disc.names.index(attr)
    cells = disc.encode(frame)
    target = int(np.bincount(cells[:, col]).argmax())

    def site_with(n_in_cell: int):
        keep = np.flatnonzero(cells[:, col] != target).tolist() + \
            np.flatnonzero(cells[:, col] == target)[:n_in_cell].tolist()
        return _site(tmp_path / str(n_in_cell), frame.iloc[sorted(keep)], "heart_disease")

    one_way, score = _one_way_then_score(study, schema, plan, disc, attr)
    out = []
    for n in (63, 64):
        (tmp_path / str(n)).mkdir()
        site = site_with(n)
        state = SiteState()
        assert answer(site, study, one_way, {}, {}, state).reply.status == P.Status.TRAINED
        total = state.noisy_count
        p = np.zeros(disc.shape[attr])
        p[target] = (2.0 ** 59 + 128) / total  # total * p lands on a rounding boundary
        before = len(state.ledger.history)
        reply = answer(site, study, score, {"p.0": p}, {}, state)
        if reply.values is not None:
            out.append(float(reply.values[0]))
        else:
            assert reply.reply.status == P.Status.REFUSED
            assert "probability vector" in reply.reply.problems[0]
            assert len(state.ledger.history) == before  # refused uncharged
        # an honest marginal is still scored
        honest = np.full(disc.shape[attr], 1.0 / disc.shape[attr])
        assert answer(site, study, score, {"p.0": honest}, {}, state).values is not None
    assert not out, f"scores of the neighbours: {out}, {out[0] - out[-1]} apart"


def test_the_outcome_split_moves_by_at_most_its_charge(tmp_path, heart):
    """Pairs with heart disease's outcome collapsed to {absent, present} (and missing):
    each patient is in one entry of each collapsed clique, so k cliques move by at most
    sqrt(k), charged k."""
    schema, frame = heart
    plan = get_generator("marginal")(schema, **SMALL).plan(noise=10.0)  # the outcome plan
    assert plan.outcome_split == 1
    disc = study_discretizer(schema, SMALL)
    names, sizes = disc.names, disc.shape
    split = outcome_split(schema, disc)
    cliques = [(a, split.outcome) for a in names if a != split.outcome][:6]
    cliques.append((names[0], names[1], split.outcome))  # a 3-way one too
    units, _ = _charged(tmp_path, frame, "heart_disease", schema, SMALL, cliques, SPLIT,
                        plan=plan)
    cells = disc.encode(frame)
    patients = _worst(frame, schema, np.zeros((len(frame), 1)))
    move = _largest_move(lambda c: np.concatenate(
        [split.collapse(marginal(c, names, sizes, q)) for q in cliques]), cells, patients)
    assert units == len(cliques) and move == pytest.approx(math.sqrt(units))


def test_the_same_statistic_asked_again_is_charged_again(tmp_path, heart):
    """The coordinator may ask one clique under several names: twice in one request, as
    a plain measurement and as a split, and scored. Each is a fresh Gaussian draw, so
    together they give the statistic at lower noise; the ledger composes every one of
    them (one unit per copy), so the epsilon it reports covers the combination."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from fedsynth.client.measure import answer
    from fedsynth.client.site import SiteState

    schema, frame = heart
    params = {**SMALL, "per_round": 8, "rounds": 2}
    # a plan with scores and split releases both (the coordinator's to choose)
    plan = dataclasses.replace(get_generator("marginal")(schema, **params).plan(),
                               outcome_split=1)
    study = StudyConfig(generator="marginal", generator_params=params)
    disc = study_discretizer(schema, params)
    outcome = outcome_split(schema, disc).outcome
    pair = ("sex", outcome)
    site = _site(tmp_path, frame, "heart_disease")
    base = {**study.to_flat(), P.SCHEMA_FINGERPRINT: schema_fingerprint(schema),
            P.PLAN: json.dumps(plan.to_dict()), P.STEP: 1}
    asks = [(P.MEASURE_OP, ONE_WAY, [(a,) for a in disc.names]),
            (P.MEASURE_OP, MEASURE, [pair, pair, pair]),
            (P.MEASURE_OP, SPLIT, [pair, pair]),
            (P.SCORE_OP, "", [pair, pair])]
    state = SiteState()
    sizes = disc.shape
    p = np.full(sizes["sex"] * sizes[outcome], 1.0 / (sizes["sex"] * sizes[outcome]))
    released = []
    for op, kind, cliques in asks:
        config = {**base, P.OP: op, P.RELEASE_KIND: kind or MEASURE,
                  P.CLIQUES: json.dumps([list(c) for c in cliques])}
        reply = answer(site, study, config, {"p.0": p, "p.1": p}, {}, state)
        assert reply.reply.status == P.Status.TRAINED, reply.reply.problems
        released.append((reply.reply.metrics[P.SIGMA_RELEASED], len(cliques)))
    units: dict[float, int] = {}
    for s, c in released:  # the ledger merges consecutive releases at one noise level
        units[s] = units.get(s, 0) + c
    charged: dict[float, int] = {}
    for s, _, c in state.ledger.history:
        charged[s] = charged.get(s, 0) + c
    assert charged == units and sum(units.values()) == len(disc.names) + 7
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = sum(compute_rdp(q=1.0, noise_multiplier=s, steps=c, orders=orders)
              for s, c in released)
    independent, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=site.delta)
    assert state.ledger.epsilon(site.delta) == pytest.approx(independent, abs=1e-6)


@pytest.mark.parametrize("name,dataset", [("ddpm", "mimic3_demo"), ("tvae", "heart_disease")])
def test_a_central_dp_fit_divides_by_its_dp_count_and_accounts_every_release(
        name, dataset, monkeypatch):
    """DP-SGD divides its noisy sum by q x rows. A central fit divided by the exact
    ``len(data)`` (the old code), so the published weights were a function of a private
    statistic outside the DP analysis; it now releases the row count (one cell without a
    statistics column: ddpm on MIMIC, which has no outcome; the outcome's histogram with
    one: tvae on heart) as a site does, and divides by that. Its reported epsilon is an
    independent RDP accountant's over all of its releases: the grid, the count, every
    DP-SGD step."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from fedsynth.common.generators import base
    from fedsynth.common.privacy import trainer
    from fedsynth.common.privacy.randomness import DPRandomness
    from fedsynth.common.quantile_grid import grid_noise_for
    from fedsynth.simulations.datasets import load_site_frames

    schema, frames = load_site_frames(dataset)
    frame = pd.concat(list(frames.values()), ignore_index=True)
    seen: list[tuple[float, float]] = []
    original = trainer._DPStep.__init__

    def spy(self, mode, module, dp, lr, expected_batch, randomness):  # noqa: ANN001
        seen.append((expected_batch, dp.noise_multiplier))
        original(self, mode, module, dp, lr, expected_batch, randomness)

    monkeypatch.setattr(trainer._DPStep, "__init__", spy)
    counts: list[np.ndarray] = []
    release = base.release_histogram

    def spy_release(*args, **kw):  # noqa: ANN002, ANN003
        counts.append(release(*args, **kw))
        return counts[-1]

    monkeypatch.setattr(base, "release_histogram", spy_release)
    q, eps, delta, count_noise = 0.25, 3.0, 1e-5, 10.0
    model = get_generator(name)(schema, seed=0)
    model.fit(frame, epochs=1, sample_rate=q, epsilon=eps, delta=delta,
              count_noise=count_noise, randomness=DPRandomness.reproducible(5, "test"))
    (expected_batch, sigma), = seen
    (histogram,) = counts
    assert len(histogram) == (1 if model.statistics_column() is None else 5)
    dp_count = max(1.0, float(round(histogram.sum())))
    assert dp_count != len(frame)
    assert expected_batch == pytest.approx(q * dp_count)
    info = model.fit_info
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    grid = grid_noise_for(eps, delta, base.DEFAULT_GRID_SHARE)
    rdp = (compute_rdp(q=1.0, noise_multiplier=grid, steps=1, orders=orders)
           + compute_rdp(q=1.0, noise_multiplier=count_noise, steps=1, orders=orders)
           + compute_rdp(q=q, noise_multiplier=sigma, steps=info["steps"], orders=orders))
    independent, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert info["epsilon"] == pytest.approx(independent, abs=1e-6) and info["epsilon"] <= eps


@pytest.mark.parametrize("name,dataset", [("tvae", "heart_disease"), ("ctgan", "mimic3_demo"),
                                          ("ddpm", "mimic3_demo")])
def test_the_deep_count_release_moves_by_at_most_one(name, dataset):
    """A site's one count release (``release_histogram``): the statistics column's
    histogram (tvae on heart: the outcome's; ctgan on MIMIC: gender's) or the row count
    alone (ddpm on MIMIC, no outcome); one patient is in one cell (or none, a missing
    value): L2 move at most 1, charged ``(count-noise, 1, 1)``."""
    from fedsynth.common.encoding import TabularEncoder
    from fedsynth.common.generators.base import release_histogram
    from fedsynth.simulations.datasets import load_site_frames

    schema, frames = load_site_frames(dataset)
    frame = pd.concat(list(frames.values()), ignore_index=True)
    model = get_generator(name)(schema, seed=0)
    encoded = TabularEncoder(schema).encode(frame)
    patients = _worst(frame, schema, np.zeros((len(frame), 1)))
    move = _largest_move(lambda rows: release_histogram(model, rows, None, None), encoded,
                         patients)
    assert move == pytest.approx(1.0)


def test_the_loss_report_moves_by_at_most_sqrt_2(heart, monkeypatch):
    """The loss report sums ``(min(loss, B) / B, 1)`` over the sampled rows: one patient
    moves the pair by at most sqrt(2), whatever its loss (huge, infinite, NaN, negative:
    a crafted model's), so noise std ``sigma sqrt(2)`` is one ``(sigma, q)`` step."""
    import torch

    from fedsynth.common.encoding import TabularEncoder
    from fedsynth.common.privacy import PrivacyLedger
    from fedsynth.common.privacy.randomness import DPRandomness
    from fedsynth.common.privacy.trainer import dp_loss_report

    schema, frame = heart
    model = get_generator("tvae")(schema, seed=0)
    encoded = TabularEncoder(schema).encode(frame)
    bound = model.loss_bound
    marks = np.arange(len(encoded), dtype=float)
    extreme = {0: 1e30, 1: float("nan"), 2: float("inf"), 3: -float("inf"), 4: -5.0}
    losses = np.array([extreme.get(i, (i % 7) * 20.0) for i in range(len(encoded))])
    data = np.column_stack([marks, encoded])

    def loss(module, batch):  # noqa: ANN001 (each row's loss read from its mark)
        return torch.as_tensor(losses[batch[:, 0].long().numpy()], dtype=torch.float32)

    monkeypatch.setattr(model, "per_sample_loss", loss)

    def report(rows: np.ndarray) -> np.ndarray:  # (S, N) at noise 0, every row sampled
        ledger = PrivacyLedger("rdp")
        value = dp_loss_report(model, rows, sample_rate=1.0, noise_multiplier=0.0,
                               ledger=ledger, randomness=DPRandomness.reproducible(0, "t"))
        return np.array([value * len(rows) / bound, len(rows)])

    full = report(data)
    moves = [float(np.linalg.norm(full - report(np.delete(data, i, axis=0))))
             for i in [0, 1, 2, 3, 4, 5, 6, 100]]
    assert max(moves) <= math.sqrt(2) + 1e-4
    assert moves[0] == pytest.approx(math.sqrt(2), abs=1e-4)  # a huge loss counts as B


def test_ctgans_loss_report_is_the_mean_over_real_rows(heart):
    """CTGAN's per-sample loss lists ``fake_batch`` fake rows after the real ones (the
    discriminator's step); the report summed them all and divided by the real rows, so
    a site reported about (n + 64) / n times its loss. At noise 0 with every row
    sampled the report is now the real rows' clipped mean."""
    import torch

    from fedsynth.common.encoding import TabularEncoder
    from fedsynth.common.privacy import PrivacyLedger
    from fedsynth.common.privacy.randomness import DPRandomness
    from fedsynth.common.privacy.trainer import dp_loss_report

    schema, frame = heart
    model = get_generator("ctgan")(schema, seed=0)
    rows = TabularEncoder(schema).encode(frame)[:40]
    value = dp_loss_report(model, rows, sample_rate=1.0, noise_multiplier=0.0,
                           ledger=PrivacyLedger("rdp"),
                           randomness=DPRandomness.reproducible(0, "t"))
    with torch.no_grad():
        real = model.per_sample_loss(model.private_module(),
                                     torch.as_tensor(rows, dtype=torch.float32))[:40]
    assert value == pytest.approx(float(real.clamp(0, model.loss_bound).mean()), rel=1e-4)


@pytest.mark.slow
def test_a_federated_amlsg_study_reports_what_an_independent_accountant_says(tmp_path):
    """A 3-centre AMLSG marginal study (fine, 1-way, code histogram, pairs, links,
    rounds) through the real ServerApp and ClientApp: for each site, the releases it
    made are read off the wire (each request's kind, cliques and plan, each reply's
    noise), their units worked out here from the request alone (cliques; code_bound;
    C(pair_bound, 2); link_bound), and Opacus' RDP accountant over that sequence gives
    the epsilon the site's ledger reports, to 1e-6."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from fedsynth.client.site import SiteState
    from fedsynth.common.generators.marginal.plan import MarginalPlan
    from tests.test_marginal_pairs import _amlsg_study

    _, grid, sites = _amlsg_study(tmp_path, secure=False)
    assert len(grid.sent) == len(grid.received)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    releases: dict[int, list[tuple[str, float, int]]] = {}
    for sent, got in zip(grid.sent, grid.received, strict=True):
        config = dict(sent.content[P.CONFIG])
        if sent.metadata.message_type != P.MARGINAL_MESSAGE or config.get(P.OP) not in (
                P.MEASURE_OP, P.SCORE_OP):
            continue
        _, reply = P.SiteReply.from_content(got.content)
        if reply.status != P.Status.TRAINED:
            continue
        kind = config.get(P.RELEASE_KIND, MEASURE) if config[P.OP] == P.MEASURE_OP \
            else "score"
        plan = MarginalPlan.from_dict(json.loads(config[P.PLAN]))
        cliques = json.loads(config[P.CLIQUES])
        units = {CODES: plan.code_bound, PAIRS: math.comb(plan.pair_bound, 2),
                 LINKS: plan.link_bound}.get(kind, len(cliques))
        releases.setdefault(sent.metadata.dst_node_id, []).append(
            (kind, reply.metrics[P.SIGMA_RELEASED], units))
    assert len(releases) == len(sites)
    for node, made in releases.items():
        assert {CODES, PAIRS, LINKS, FINE, ONE_WAY} <= {k for k, _, _ in made}
        rdp = sum(compute_rdp(q=1.0, noise_multiplier=s, steps=u, orders=orders)
                  for _, s, u in made)
        independent, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
        ledger = SiteState.from_record(dict(grid._grid.contexts[node].state[
            "fedsynth-site"])).ledger
        assert ledger.epsilon(1e-5) == pytest.approx(independent, abs=1e-6)
        assert independent <= 3.0 + 1e-9


def test_an_inflated_noisy_count_cannot_round_a_score_past_its_sensitivity(tmp_path, heart):
    """The score's ``total`` is the site's noisy count from its own 1-way release, and
    the plan (hence that release's noise) is the coordinator's: with a one_way_share of
    1e-40 the 1-way noise std is ~1e20, charged next to nothing, and the noisy count
    (which the coordinator computes from the release) lands past 2**59 half the time.
    A probability vector ``p`` then puts ``total * p`` on the 2**59 rounding boundary
    again. The site now refuses to score against a noisy count past a public ceiling
    (``client.measure.SCORE_TOTAL_CEILING``), uncharged."""
    from fedsynth.client.measure import answer
    from fedsynth.client.site import SiteState

    schema, frame = heart
    params = {**SMALL, "outcome_plan_noise": 0}
    honest = get_generator("marginal")(schema, **params).plan()
    plan = dataclasses.replace(honest, one_way_share=1e-40)
    study = StudyConfig(generator="marginal", generator_params=params)
    disc = study_discretizer(schema, params)
    attr, col = "sex", disc.names.index("sex")
    cells = disc.encode(frame)
    target = int(np.bincount(cells[:, col]).argmax())
    one_way, score = _one_way_then_score(study, schema, plan, disc, attr)
    out = []
    for n in (63, 64):
        keep = np.flatnonzero(cells[:, col] != target).tolist() + \
            np.flatnonzero(cells[:, col] == target)[:n].tolist()
        (tmp_path / str(n)).mkdir()
        site = _site(tmp_path / str(n), frame.iloc[sorted(keep)], "heart_disease")
        state = SiteState()
        total = 0.0
        while total < 2.0 ** 59 + 128:  # asked again until the count is large enough
            reply = answer(site, study, one_way, {}, {}, state)
            assert reply.reply.status == P.Status.TRAINED
            parts = np.split(reply.values, np.cumsum(list(disc.shape.values()))[:-1])
            total = max(1.0, float(np.mean([p.sum() for p in parts])))  # as the site does
        assert total == state.noisy_count
        p = np.zeros(disc.shape[attr])
        p[target] = (2.0 ** 59 + 128) / total  # a probability vector (sums below 1)
        before = len(state.ledger.history)
        reply = answer(site, study, score, {"p.0": p}, {}, state)
        if reply.values is not None:
            out.append(float(reply.values[0]))
        else:
            assert reply.reply.status == P.Status.REFUSED
            assert "noisy count" in reply.reply.problems[0]
            assert len(state.ledger.history) == before
    assert not out, f"scores of the neighbours: {out}, {out[0] - out[-1]} apart"
