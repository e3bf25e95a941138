"""A deep study's quantile grid under masked sums and distributed noise.

The attacker is the coordinator: it holds every masked grid vector and every request it
sent, and may forge requests. It must read the sum of the sites' grid releases and
nothing finer, and it must not get a site to add less noise than that site's own
budget needs. Real keys, real heart disease rows, the real ServerApp and ClientApp code
in process, a real (one-round) TVAE study.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from opacus.accountants import RDPAccountant

from fedsynth.client.site import SPLIT_CHARGE_MARGIN, SiteState
from fedsynth.common import protocol as P
from fedsynth.common import quantile_grid
from fedsynth.common.encryption.masks import unmask_sum
from fedsynth.common.study import ConfigError, SiteConfig, StudyConfig
from tests.flower_support import RecordingGrid, run_recorded

SITES = ("cleveland", "hungarian", "switzerland")
GRID_REPLY_KEYS = P.STATUS_METRIC_KEYS | {P.GRID_CELL_STD, P.HONEST_SITES, P.EPSILON_ALONE}


def _uniform_share(v: np.ndarray) -> float:
    """Share of entries beyond a billion in fixed point (no count is; a mask is)."""
    return float(np.mean(np.abs(v.view(np.int64).astype(float) / 2**16) > 2**30))


def _study(tmp_path: Path, honest: int, budgets: dict[str, float]):
    from fedsynth.simulations.simulate import SimulationOptions, prepare_sites, setup_mask_keys

    study = StudyConfig(generator="tvae", min_sites=3, num_server_rounds=1, local_epochs=1,
                        output_dir=str(tmp_path / "study"), n_synthetic=100,
                        secure_aggregation="masks", study_id="masked-grid-test",
                        honest_sites=honest)
    opts = SimulationOptions(sites=SITES, epsilon=3.0, study=study, site_epsilon=budgets)
    sites, _, _ = prepare_sites(opts, tmp_path)
    sites = setup_mask_keys(tmp_path, [replace(s, reproducible_noise_seed=200 + i)
                                       for i, s in enumerate(sites)], honest)
    outcome, grid = run_recorded(study, sites, "heart_disease")
    return outcome, grid, sites


def _reply(grid: RecordingGrid, msg: Message) -> Message:
    return next(r for r in grid.received
                if r.metadata.reply_to_message_id == msg.metadata.message_id)


def _exact_pooled_counts(sites: list[SiteConfig], schema_fp: str) -> np.ndarray:
    """What the sum would be without noise: the sites' exact grid counts (test only)."""
    from fedsynth.client.site import site_table
    from fedsynth.common.encoding import TabularEncoder

    total = 0
    for site in sites:
        schema, data = site_table(site, SiteState(), schema_fp)
        total = total + quantile_grid.site_counts(TabularEncoder(schema), data)
    return np.asarray(total, dtype=float)


@pytest.mark.slow
def test_a_masked_grid_shows_the_coordinator_only_a_sum_carrying_the_common_noise(
        tmp_path, heart_schema):
    """h = 3 with hungarian's budget at 10: every site adds a third of the variance of
    one common noise, the most private site's; the coordinator reads one sum whose
    noise is that common noise whole; each ledger charges it and reports the worst
    case; forged requests for less noise are refused."""
    outcome, grid, sites = _study(tmp_path, honest=3, budgets={"hungarian": 10.0})
    grid_msgs = [m for m in grid.sent if m.metadata.message_type == P.GRID_MESSAGE]
    status = [m for m in grid_msgs if dict(m.content["config"]).get(P.OP) == P.STATUS_OP]
    asked = [m for m in grid_msgs if m not in status]
    assert len(status) == 3 and len(asked) == 3
    for msg in status:  # the budget only: nothing released
        reply = _reply(grid, msg).content
        assert dict(reply["site"])["status"] == P.Status.BUDGET_STATED
        assert "arrays" not in reply
    common = quantile_grid.grid_noise_for(3.0, 1e-5, 0.5)  # the budget-3 sites' need
    vectors, stds = [], []
    for msg in asked:
        assert float(dict(msg.content["config"])[P.GRID_NOISE]) == pytest.approx(common)
        reply = _reply(grid, msg).content
        arrays = {k: v.numpy() for k, v in reply["arrays"].items()}
        assert set(arrays) == {P.GRID_MASKED}  # no clear counts
        v = arrays[P.GRID_MASKED]
        assert v.dtype == np.uint64 and _uniform_share(v) > 0.95
        metrics = dict(reply["metrics"])
        assert set(metrics) <= GRID_REPLY_KEYS
        vectors.append(v)
        stds.append(metrics[P.GRID_CELL_STD])
    schema_fp = dict(asked[0].content["config"])[P.SCHEMA_FINGERPRINT]
    # each site added a third of the common variance, hungarian included
    one_third = quantile_grid.cell_std(heart_schema, common / math.sqrt(3))
    assert stds == pytest.approx([one_third] * 3, rel=1e-9)
    residual = unmask_sum(vectors) - _exact_pooled_counts(sites, schema_fp)
    whole = quantile_grid.cell_std(heart_schema, common)
    assert 0.85 * whole < float(np.std(residual)) < 1.15 * whole  # ~700 cells
    # the ledgers: the common noise charged, as an independent accountant composes it;
    # the worst case at the noise each site added
    summary = json.loads((Path(outcome.output_dir) / "summary.json").read_text())
    for ctx in grid._grid.contexts.values():
        state = SiteState.from_record(dict(ctx.state["fedsynth-site"]))
        assert state.shares == [(pytest.approx(common * SPLIT_CHARGE_MARGIN),
                                 pytest.approx(common / math.sqrt(3)), 1)]
        acc = RDPAccountant()
        acc.history = [tuple(h) for h in state.ledger.history]
        assert state.ledger.epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), abs=1e-6)
        alone = RDPAccountant()
        alone.history = [(common / math.sqrt(3), 1.0, 1)] + [
            tuple(h) for h in state.ledger.history if h[0] != common * SPLIT_CHARGE_MARGIN]
        assert state.alone_ledger().epsilon(1e-5) == pytest.approx(
            alone.get_epsilon(1e-5), abs=1e-6)
    shared = summary["secure_aggregation"]
    assert shared["scheme"] == "masks" and shared["honest_sites"] == {n: 3 for n in SITES}
    for name, info in summary["sites"].items():
        assert shared["epsilon_alone"][name] > info["epsilon"]
    trained = [_reply(grid, m).content for m in grid.sent
               if m.metadata.message_type == "train"]
    assert trained and all(set(dict(r["metrics"])) <= P.TRAIN_METRIC_KEYS for r in trained)
    from fedsynth.common.generators import Generator
    from fedsynth.common.generators.base import GRID_PARAM

    saved = Generator.read_meta(Path(outcome.output_dir) / "model.fsg")["hparams"]
    assert set(saved[GRID_PARAM]) == {c.name for c in quantile_grid.numeric_columns(
        heart_schema)}  # the model is encoded on the grid from the sum
    # asked the same again (a restart): the same bytes, nothing new drawn or charged
    from fedsynth.simulations.benchmark_inprocess import coordinator_identity

    msg = asked[0]
    with coordinator_identity(grid.run.run_id):
        again = grid.send_and_receive([Message(msg.content, dst_node_id=msg.metadata.dst_node_id,
                                               message_type=P.GRID_MESSAGE)])[0].content
        assert np.array_equal(again["arrays"][P.GRID_MASKED].numpy(), vectors[0])
        # a forged request for half the common noise: refused, nothing masked
        cfg = dict(msg.content["config"])
        cfg[P.GRID_NOISE] = common / 2
        forged = Message(RecordDict({"config": ConfigRecord(cfg)}),
                         dst_node_id=msg.metadata.dst_node_id, message_type=P.GRID_MESSAGE)
        reply = grid.send_and_receive([forged])[0].content
    assert "arrays" not in reply
    assert "below this site's own" in " ".join(dict(reply["site"])["problems"])
    # a forged request for a vast noise (to have a release drawn, charged, and then not
    # maskable): refused before anything is drawn
    from fedsynth.client.grid import _common_noise

    site = sites[0]
    assert "above" in _common_noise(site, {P.GRID_NOISE: 1e12}, common)
    assert _common_noise(site, {P.GRID_NOISE: common}, common) == common


def test_a_split_grid_request_without_common_noise_or_from_a_site_without_keys_is_refused(
        tmp_path, heart_schema):
    """Nothing is drawn or charged: no common noise in a split; no roster."""
    from fedsynth.client.grid import grid_reply
    from fedsynth.common.study import schema_fingerprint
    from fedsynth.simulations.simulate import SimulationOptions, prepare_sites

    study = StudyConfig(generator="tvae", secure_aggregation="masks", honest_sites=2,
                        study_id="refusals")
    opts = SimulationOptions(sites=SITES[:2], epsilon=3.0, study=study)
    sites, _, _ = prepare_sites(opts, tmp_path)
    fp = schema_fingerprint(heart_schema)
    state = SiteState()
    reply = grid_reply(sites[0], replace(study, honest_sites=1), fp, state, {})
    assert reply.status == P.Status.NO_KEYS and not state.ledger.history
    assert state.grid_counts is None
    from fedsynth.simulations.simulate import setup_mask_keys

    keyed = setup_mask_keys(tmp_path, sites, 2)[0]
    reply = grid_reply(keyed, study, fp, state, {})
    assert reply.status == P.Status.REFUSED and "common noise" in reply.problems[0]
    assert not state.ledger.history and state.grid_counts is None


def test_masks_for_a_deep_study_need_a_grid_and_a_ckks_site_keeps_its_updates_hidden():
    with pytest.raises(ConfigError, match="grid-share"):
        StudyConfig(generator="tvae", secure_aggregation="masks", grid_share=0.0)
    StudyConfig(generator="tvae", secure_aggregation="masks")  # the grid: allowed
    masked = StudyConfig(generator="tvae", secure_aggregation="masks")
    site = SiteConfig(name="a", data_path="a.csv", schema_path="s.yaml", key_dir="k",
                      peer_keys="p")
    assert site.accepts(masked)
    ckks = replace(site, wrapped_context="ctx.bin", holder_public_key="h.pem")
    assert not ckks.accepts(masked)  # its updates would travel in clear
    assert "CKKS context" in ckks.aggregation_problem(masked)
    assert ckks.accepts(StudyConfig(generator="marginal", secure_aggregation="masks"))
    assert not site.accepts(StudyConfig(generator="tvae"))  # nothing in clear
