"""The deep generators' DP quantile grid (issue 14): what a site releases and pays,
what the coordinator derives from it, the encoding through it, and the spread it buys.

Real heart-disease rows, the real site code (client/grid.py, client/site.py) and the
coordinator's combine step (server/grid.py); no Flower transport here (the benchmark's
in-process studies run the whole message path).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from opacus.accountants import RDPAccountant

from fedsynth.client.grid import grid_reply
from fedsynth.client.site import TRAINED, SiteState, train_site
from fedsynth.common import quantile_grid
from fedsynth.common.encoding import TAIL, TabularEncoder
from fedsynth.common.generators import TabDDPM, get_generator
from fedsynth.common.generators.base import GRID_PARAM, HEAPS_PARAM
from fedsynth.common.privacy.plan import PrivacyPlan
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.protocol import GRID_CELL_STD, VALUES, SiteReply, Status
from fedsynth.common.schema import Schema
from fedsynth.common.study import SiteConfig, StudyConfig, schema_fingerprint
from fedsynth.common.table import read_table
from fedsynth.server.grid import accepted, combine

GRID_SHARE = 0.2
GRID_NOISE = quantile_grid.grid_noise_for(3.0, 1e-5, GRID_SHARE)  # the sites' budget


@pytest.fixture(scope="module")
def heart(heart_schema: Schema, heart_files) -> pd.DataFrame:
    return pd.concat([read_table(p, heart_schema) for p in heart_files.values()],
                     ignore_index=True)


def _study(**kw) -> StudyConfig:
    return StudyConfig(generator="tvae", generator_params={"hidden": 16, "latent": 4},
                       num_server_rounds=2, local_epochs=1, sample_rate=0.1,
                       grid_share=GRID_SHARE, **kw)


def _sites(heart_schema_path, heart_files) -> list[SiteConfig]:
    # reproducible noise: a test, labelled so (never on a real SuperNode)
    return [SiteConfig(name, str(path), str(heart_schema_path), epsilon=3.0, delta=1e-5,
                       reproducible_noise_seed=i)
            for i, (name, path) in enumerate(sorted(heart_files.items()))]


def test_grid_is_the_summed_releases_and_is_paid_for(heart_schema, heart_schema_path,
                                                      heart_files) -> None:
    study = _study()
    fp = schema_fingerprint(heart_schema)
    sites = _sites(heart_schema_path, heart_files)
    states = [SiteState().for_study(study.study_id) for _ in sites]
    replies = [grid_reply(s, study, fp, st) for s, st in zip(sites, states, strict=True)]
    cells = quantile_grid.release_cells(heart_schema)
    # 32 cells per numeric column, then one per recorded value of the heap columns
    # (age 83, trestbps 181, thalach 181, oldpeak 101; cholesterol's 621 are too many)
    assert cells == 32 * 5 + 83 + 181 + 181 + 101
    assert all(r.status == Status.GRID_RELEASED and accepted(r, cells) == "" for r in replies)

    # each release is noisy (not the site's exact counts) and recorded once in its ledger
    for site, state, reply in zip(sites, states, replies, strict=True):
        exact = quantile_grid.site_counts(
            TabularEncoder(heart_schema),
            TabularEncoder(heart_schema).encode(read_table(site.data_path, heart_schema)))
        assert not np.allclose(reply.arrays[VALUES], exact)
        assert state.ledger.history == [(GRID_NOISE, 1.0, 1)]
        # a patient changes one cell of each of 5 coarse and 4 heap histograms
        assert reply.metrics[GRID_CELL_STD] == pytest.approx(GRID_NOISE * np.sqrt(9))
        # asked again: the same vector, nothing more charged
        again = grid_reply(site, study, fp, state)
        np.testing.assert_array_equal(again.arrays[VALUES], reply.arrays[VALUES])
        assert state.ledger.history == [(GRID_NOISE, 1.0, 1)]
        # asked again with another grid-share, also after a restart: the resend states the
        # noise the stored vector was drawn with, not one the request implies
        other = replace(study, grid_share=GRID_SHARE / 2)
        restarted = SiteState().for_study(study.study_id)
        restarted._load_study(state._study_record())
        for st in (state, restarted):
            resent = grid_reply(site, other, fp, st)
            np.testing.assert_array_equal(resent.arrays[VALUES], reply.arrays[VALUES])
            assert resent.metrics[GRID_CELL_STD] == reply.metrics[GRID_CELL_STD]

    # playing the coordinator: the grid is a function of the summed releases only
    params = combine(heart_schema, replies)
    grid = params[GRID_PARAM]
    summed = np.sum([r.arrays[VALUES] for r in replies], axis=0)
    total = GRID_NOISE * np.sqrt(9) * np.sqrt(4)
    assert grid == quantile_grid.grid_from_counts(heart_schema, summed, total)
    assert params[HEAPS_PARAM] == quantile_grid.heaps_from_counts(heart_schema, summed, total)
    shuffled = [SiteReply(r.status, r.metrics, arrays={VALUES: v}) for r, v in zip(
        replies, [summed, *[np.zeros_like(summed)] * 3], strict=True)]
    assert combine(heart_schema, shuffled) == params  # same sum, same grid and heaps
    assert set(grid) == {"age", "trestbps", "chol", "thalach", "oldpeak"}

    # then training: the reported epsilon is an independent accountant over grid +
    # count + DP-SGD + loss reports, and stays within the budget
    trained = replace(study, generator_params={**study.generator_params, **params})
    model = get_generator("tvae")(heart_schema, seed=0, **trained.generator_params)
    state = states[0]
    sigma = state.noise_multiplier
    reply = None
    for r in (1, 2):
        reply = train_site(sites[0], trained, fp, model.state_dict(), state, r)
        assert reply.status == TRAINED
        model.load_state_dict(reply.arrays)
    assert reply.metrics["noise-multiplier"] == sigma  # calibrated once, at the grid release
    steps = int(reply.metrics["steps"])
    acct = RDPAccountant()
    acct.history = [(GRID_NOISE, 1.0, 1), (trained.count_noise, 1.0, 1),
                    (sigma, 0.1, 2 * (steps + 1))]
    assert reply.metrics["epsilon"] == pytest.approx(acct.get_epsilon(delta=1e-5), abs=1e-6)
    assert reply.metrics["epsilon"] <= 3.0 * (1 + 1e-9)
    # the whole planned study spends the budget: the grid is in the calibration
    plan = PrivacyPlan.from_study(trained, 3.0, 1e-5)
    assert plan.grid_noise == GRID_NOISE
    assert plan.ledger(sigma).epsilon(1e-5) == pytest.approx(3.0, abs=0.01)


@pytest.mark.slow
def test_a_ckks_study_sends_its_grid_encrypted_and_one_site_decrypts_the_sum_once(
        tmp_path, heart_schema) -> None:
    """The coordinator (the attacker here) holds only ciphertexts of each site's grid
    release; one site decrypts their sum, flooded, and refuses a second decryption
    (fresh flooding could be averaged away). The plan charges the grid, and the model
    is encoded on it."""
    from fedsynth.common.generators import Generator
    from fedsynth.common.protocol import CKKS, DECRYPT_OP, GRID_MESSAGE, OP
    from fedsynth.simulations.benchmark_inprocess import coordinator_identity
    from fedsynth.simulations.simulate import (
        SimulationOptions,
        prepare_sites,
        setup_simulation_keys,
    )
    from tests.flower_support import run_recorded

    study = StudyConfig(generator="tvae", min_sites=3, num_server_rounds=1, local_epochs=1,
                        output_dir=str(tmp_path / "study"), n_synthetic=100,
                        secure_aggregation="ckks", study_id="ckks-grid-test")
    assert study.releases_grid
    assert PrivacyPlan.from_study(study, 3.0, 1e-5).grid_noise == pytest.approx(
        quantile_grid.grid_noise_for(3.0, 1e-5, study.grid_share))  # the grid is charged
    names = ("cleveland", "hungarian", "switzerland")
    opts = SimulationOptions(sites=names, epsilon=3.0, study=study)
    sites, _, _ = prepare_sites(opts, tmp_path)
    study, sites = setup_simulation_keys(tmp_path, study, sites)
    sites = [replace(s, reproducible_noise_seed=300 + i) for i, s in enumerate(sites)]
    outcome, grid = run_recorded(study, sites, "heart_disease")
    asked = [m for m in grid.sent if m.metadata.message_type == GRID_MESSAGE]
    released = [m for m in asked if dict(m.content["config"]).get(OP) != DECRYPT_OP]
    decrypt = [m for m in asked if dict(m.content["config"]).get(OP) == DECRYPT_OP]
    assert len(released) == 3 and len(decrypt) == 1

    def reply_to(msg):
        return next(r for r in grid.received
                    if r.metadata.reply_to_message_id == msg.metadata.message_id).content

    for msg in released:  # ciphertexts only: no site's histogram in clear
        reply = reply_to(msg)
        assert "arrays" not in reply and CKKS in reply
        assert dict(reply["site"])["status"] == Status.GRID_RELEASED
    summed = reply_to(decrypt[0])["arrays"][VALUES].numpy()
    states = [SiteState.from_record(dict(ctx.state["fedsynth-site"]))
              for ctx in grid._grid.contexts.values()]
    assert sum(s.grid_decrypted for s in states) == 1
    exact = np.sum([s.grid_counts for s in states], axis=0)
    # CKKS error and the flooding, std 2^-20 of the count-bound (0.1 count by default)
    flood = 2.0**-20 * StudyConfig().count_bound
    np.testing.assert_allclose(summed, exact, atol=6 * flood)
    assert 0.5 * flood < np.std(summed - exact) < 2 * flood
    saved = Generator.read_meta(outcome.output_dir / "model.fsg")["hparams"]
    assert set(saved[GRID_PARAM]) == {c.name for c in quantile_grid.numeric_columns(
        heart_schema)}
    with coordinator_identity(grid.run.run_id):  # asked to decrypt again: refused
        again = grid.send_and_receive([decrypt[0]])[0].content
    assert dict(again["site"])["status"] == Status.ALREADY_RELEASED and "arrays" not in again
    # another site, handed a model update's ciphertexts to decrypt: not the grid's layout
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedsynth.common.encryption import StateLayout
    from fedsynth.common.protocol import CHUNKS, LAYOUT

    other = next(m for m in released if m.metadata.dst_node_id != decrypt[0].metadata.dst_node_id)
    record = dict(decrypt[0].content[CKKS])
    record[LAYOUT] = StateLayout.from_state({"decoder.weight": np.zeros((64, 32))}).to_json()
    with coordinator_identity(grid.run.run_id):
        forged = Message(RecordDict({"config": decrypt[0].content["config"],
                                     CKKS: ConfigRecord({CHUNKS: record[CHUNKS],
                                                         LAYOUT: record[LAYOUT]})}),
                         dst_node_id=other.metadata.dst_node_id, message_type=GRID_MESSAGE)
        reply = grid.send_and_receive([forged])[0].content
    assert "arrays" not in reply and "not laid out" in " ".join(dict(reply["site"])["problems"])


def test_round_trip_through_a_grid(heart_schema: Schema, heart: pd.DataFrame) -> None:
    bounds = TabularEncoder(heart_schema)
    matrix = bounds.encode(heart)
    exact = quantile_grid.release(bounds, matrix, None, None)
    grid = quantile_grid.grid_from_counts(heart_schema, exact, 0.0)
    enc = TabularEncoder(heart_schema, grid=grid)
    encoded = enc.encode(heart)
    back = enc.decode(encoded)
    for name, edges in grid.items():
        real = pd.to_numeric(heart[name]).astype(float).to_numpy()
        got = pd.to_numeric(back[name]).astype(float).to_numpy()
        # exact between the grid's TAIL quantiles; beyond them, the quantile itself
        lo_q, hi_q = np.interp([TAIL, 1 - TAIL], np.linspace(0, 1, len(edges)), edges)
        inside = (real >= lo_q + 1e-6) & (real <= hi_q - 1e-6)
        assert inside.sum() > 0.9 * np.isfinite(real).sum()
        np.testing.assert_allclose(got[inside], real[inside], atol=1e-6)
        outside = np.isfinite(real) & ~inside
        column = heart_schema.column(name)
        tol = 0.5 if column.kind == "integer" else 0.051  # rounding to the column's step
        assert np.all((got[outside] >= lo_q - tol) & (got[outside] <= hi_q + tol))
        # the data fill [-1, 1] about as a Gaussian of std 1 / z(1 - TAIL) = 0.43
        col = encoded[np.isfinite(real), enc.block(name, "numeric").start]
        assert abs(np.median(col)) < 0.15 and 0.3 < np.std(col) < 0.5  # ties: oldpeak 0
    # moving a site's bounds-encoded table onto the grid equals encoding it directly
    np.testing.assert_allclose(enc.reencode(matrix, bounds), encoded, atol=1e-5)


def test_the_grid_takes_its_share_of_any_budget() -> None:
    """A budget-relative release: never an infeasible study, and its exact cost."""
    from fedsynth.common.privacy.accountant import PrivacyLedger

    for eps in (0.5, 1.0, 3.0, 10.0):
        m = quantile_grid.grid_noise_for(eps, 1e-5, GRID_SHARE)
        rho = 1 / (2 * m * m)  # the release's zCDP cost: a fifth of the budget's
        budget_rho = rho / GRID_SHARE
        assert budget_rho + 2 * np.sqrt(budget_rho * np.log(1e5)) == pytest.approx(eps)
        led = PrivacyLedger("rdp")
        led.record(m, 1.0, 1)
        assert led.epsilon(1e-5) < eps * 0.6  # a share, well inside the budget
        plan = PrivacyPlan.from_study(_study(), eps, 1e-5)
        assert plan.floor_epsilon(1e-5) < eps  # the study stays feasible


def test_a_grid_outside_the_bounds_is_refused(heart_schema: Schema) -> None:
    with pytest.raises(ValueError, match="leaves the public bounds"):
        TabularEncoder(heart_schema, grid={"age": [0.0, 50.0, 120.0]})
    with pytest.raises(ValueError, match="strictly increasing"):
        TabularEncoder(heart_schema, grid={"age": [30.0, 30.0, 70.0]})


@pytest.mark.slow
def test_ddpm_keeps_the_spread_under_dp(heart_schema: Schema, heart: pd.DataFrame) -> None:
    """ddpm under DP spread its numeric columns over the public range (std ratios 2.5-3.9
    federated); through the grid the same spread lands on the data's range."""
    def ratios(grid_share: float | None) -> list[float]:
        model = TabDDPM(heart_schema, seed=0).fit(
            heart, epochs=20, sample_rate=0.1, epsilon=3.0, grid_share=grid_share,
            randomness=DPRandomness.reproducible(0, "grid-test"))
        assert model.fit_info["epsilon"] <= 3.0
        sample = model.sample(1000, seed=0)
        return [float(pd.to_numeric(sample[c]).astype(float).std()
                      / pd.to_numeric(heart[c]).astype(float).std())
                for c in ("age", "trestbps", "chol", "thalach", "oldpeak")]

    without, with_grid = ratios(None), ratios(GRID_SHARE)
    # the failure the grid fixes: every column wider than the bar of 1.25
    # (1.29-1.78 measured with ddpm's loss multiplicity 8)
    assert min(without) > 1.25
    assert max(abs(np.log(r)) for r in with_grid) < max(abs(np.log(r)) for r in without) / 2
    assert all(0.7 < r < 1.5 for r in with_grid)


def test_a_lone_noise_spike_does_not_stretch_the_grid(heart: pd.DataFrame) -> None:
    """Real cholesterol of the four hospitals, one noisy histogram plus one spike over
    the floor far out in the public range (80-700 mg/dl): the grid's edges stay where
    the rows are, as without the spike (before: the support ran out to the spike and
    the clipped noise of every cell between became a long tail, chol's synthetic std
    ratio up to 1.93)."""
    from fedsynth.common import dp_histogram

    chol = pd.to_numeric(heart["chol"], errors="coerce").to_numpy(dtype=float)
    counts = dp_histogram.histogram(chol, 80.0, 700.0)
    std = 17.0  # summed noise per cell, 4 sites at epsilon 3 (the 0.2 share's level)
    noisy = counts + np.random.default_rng(0).normal(0.0, std, counts.shape)
    spiked = noisy.copy()
    spiked[-3] = 80.0  # a cell near 650 mg/dl, far over the floor
    plain = dp_histogram.quantile_edges(noisy, 80.0, 700.0, std)
    edges = dp_histogram.quantile_edges(spiked, 80.0, 700.0, std)
    assert plain[-1] < 520 and np.allclose(edges, plain)


def test_cholesterols_tail_is_below_the_grid_releases_noise(heart_schema: Schema,
                                                            heart: pd.DataFrame) -> None:
    """Why cholesterol's spread is the one the grid loses (issue 14, fifth pass), and
    what the grid keeps. Real rows of the four hospitals, their exact histograms plus
    simulated noise at the benchmark's level (epsilon 3, 4 sites: std 14.4 per summed
    cell; a test's numpy draws, not a site's release), 40 draws.

    Cholesterol's patients above the grid's top edge are a few percent of the rows
    but carry a fifth of its std, and the noise of the released cells above the edge,
    summed, is several times their number: no post-processing of the release (a
    coarser or hierarchical sum, a tail fitted to it) can see them, and the tail
    models tried widen the other columns (benchmarks/deep-spread/tail_limits.py).
    The grid alone, decoded as a perfect generator would decode it (1% tails clipped),
    keeps the other columns' median std ratio near 1 and cholesterol's above 0.8."""
    from fedsynth.common import dp_histogram

    default = quantile_grid.grid_noise_for(3.0, 1e-5, quantile_grid.DEFAULT_GRID_SHARE)
    noise = quantile_grid.cell_std(heart_schema, default) * np.sqrt(4)
    assert 14 < noise < 15  # the study's default share: below the 17 the 0.2 share had
    rng = np.random.default_rng(0)
    u = np.clip(np.linspace(0.0, 1.0, 4001), TAIL, 1 - TAIL)
    for name in ("age", "trestbps", "chol", "thalach", "oldpeak"):
        column = heart_schema.column(name)
        v = pd.to_numeric(heart[name], errors="coerce").to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        counts = dp_histogram.histogram(v, column.min, column.max)
        ratios, tops = [], []
        for _ in range(40):
            edges = dp_histogram.quantile_edges(
                counts + rng.normal(0.0, noise, counts.shape), column.min, column.max, noise)
            ratios.append(np.interp(u, np.linspace(0, 1, len(edges)), edges).std() / v.std())
            tops.append(edges[-1])
        top, ratio = float(np.median(tops)), float(np.median(ratios))
        if name == "chol":
            above = v > top
            cells_above = dp_histogram.BINS - int((top - column.min)
                                                  / (column.max - column.min) * dp_histogram.BINS)
            assert 0.01 < above.mean() < 0.05  # 1-5% of the patients ...
            assert v[~above].std() / v.std() < 0.85  # ... carry over 15% of the std ...
            assert noise * np.sqrt(cells_above) > 2.5 * above.sum()  # ... under the noise
            assert 0.8 < ratio < 1.0
        else:
            assert 0.9 < ratio < 1.1, (name, ratio)
