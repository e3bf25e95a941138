"""Masked sums and distributed noise (``secure-aggregation = "masks"``, ``honest-sites``).

The attacker is the coordinator, alone or joined by some sites: it holds every masked
vector, every request it sent, and the private keys of the sites that collude. It must
read the sum of the roster's vectors and nothing finer: not one site's vector, not the
sum of the honest sites' answers to two different requests, not one site's answer
twice under one mask. Real keys (X25519 from ``fedsynth keys``' code), real heart
disease rows, the real ServerApp and ClientApp code in process.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedsynth.client.measure import SPLIT_CHARGE_MARGIN
from fedsynth.common import protocol as P
from fedsynth.common.encryption import generate_site_keypair
from fedsynth.common.encryption.keys import KeySetupError, load_private_key
from fedsynth.common.encryption.masks import (
    MaskError,
    Roster,
    encode,
    load_roster,
    mask,
    pair_keys,
    request_digest,
    unmask_sum,
)
from fedsynth.common.protocol import GRID_MESSAGE, MARGINAL_MESSAGE
from fedsynth.common.study import ConfigError, SiteConfig, StudyConfig
from tests.flower_support import RecordingGrid, run_recorded

SITES = ("cleveland", "hungarian", "switzerland")
SMALL = {"bins": 6, "rounds": 1, "per_round": 2, "candidates": 6, "iters": 100}


def _rosters(tmp_path: Path, names: tuple[str, ...]) -> dict[str, Roster]:
    from fedsynth.simulations.simulate import setup_mask_keys

    sites = [SiteConfig(name=n, data_path="x.csv", schema_path="s.yaml") for n in names]
    sites = setup_mask_keys(tmp_path, sites, 1)
    return {s.name: load_roster(s.name, s.key_dir, s.peer_keys) for s in sites}


def _uniform_share(v: np.ndarray) -> float:
    """Share of entries whose fixed-point value is beyond a billion (a sum of counts
    never is; a uniform uint64 almost always is)."""
    return float(np.mean(np.abs(v.view(np.int64).astype(float) / 2**16) > 2**30))


# ------------------------------------------------------------------- the masks alone


def test_masks_cancel_in_the_whole_sum_and_nowhere_else(tmp_path):
    rosters = _rosters(tmp_path, SITES)
    rng = np.random.default_rng(0)
    values = {n: rng.integers(0, 300, 500) + rng.normal(0, 9, 500) for n in SITES}
    digest = request_digest(MARGINAL_MESSAGE, {"step": 1}, {})
    masked = {n: mask(values[n], r, pair_keys(r, "study"), digest) for n, r in rosters.items()}
    total = unmask_sum(list(masked.values()))
    assert np.abs(total - sum(values.values())).max() <= 3 * 2.0**-17  # fixed point
    # one site's vector, or two sites' sum, is uniform: nothing of the values is left
    for n in SITES:
        assert _uniform_share(masked[n]) > 0.99
        corr = np.corrcoef(masked[n].view(np.int64).astype(float), values[n])[0, 1]
        assert abs(corr) < 0.3  # 500 entries: 6.7 sd of a correlation of nothing
    with pytest.raises(MaskError, match="did not cancel"):
        unmask_sum([masked["cleveland"], masked["hungarian"]])


def test_a_coordinator_joined_by_one_site_reads_only_the_honest_sites_sum(tmp_path):
    """The coalition removes switzerland's masks (it holds its private key and every
    public key): the others' vectors stay masked, their sum is all it reads."""
    rosters = _rosters(tmp_path, SITES)
    rng = np.random.default_rng(1)
    values = {n: rng.integers(0, 300, 400).astype(float) for n in SITES}
    digest = request_digest(MARGINAL_MESSAGE, {"step": 7}, {})
    masked = {n: mask(values[n], r, pair_keys(r, "study"), digest) for n, r in rosters.items()}
    colluder = rosters["switzerland"]
    keys = pair_keys(colluder, "study")  # switzerland's pair keys: the coalition's
    from fedsynth.common.encryption.masks import _stream

    for honest in ("cleveland", "hungarian"):
        stripped = masked[honest].copy()
        m = _stream(keys[honest], digest, stripped.size)  # the mask it shares with them
        stripped = stripped - m if honest < "switzerland" else stripped + m
        assert _uniform_share(stripped - encode(values[honest])) > 0.99  # still masked
    pair = masked["cleveland"] + masked["hungarian"]  # minus switzerland's masks on them
    for honest in ("cleveland", "hungarian"):
        m = _stream(keys[honest], digest, pair.size)
        pair = pair - m if honest < "switzerland" else pair + m
    assert np.allclose(unmask_sum([pair]), values["cleveland"] + values["hungarian"])


def test_a_mask_is_bound_to_its_request(tmp_path):
    """Two different questions in one step (say a marginal to one site and a known
    answer to the others, to cancel noise): the masks do not cancel, the sum is noise."""
    rosters = _rosters(tmp_path, SITES)
    values = {n: np.full(50, 10.0) for n in SITES}
    one, other = request_digest(MARGINAL_MESSAGE, {"step": 3, "cliques": "[['age']]"}, {}), \
        request_digest(MARGINAL_MESSAGE, {"step": 3, "cliques": "[['sex']]"}, {})
    assert one != other
    # the arrays a score request carries count too
    assert request_digest(MARGINAL_MESSAGE, {"step": 3}, {"p.0": np.ones(3)}) != \
        request_digest(MARGINAL_MESSAGE, {"step": 3}, {"p.0": np.ones(3) / 2})
    masked = [mask(values[n], r, pair_keys(r, "study"), one if n == "cleveland" else other)
              for n, r in rosters.items()]
    with pytest.raises(MaskError):
        unmask_sum(masked)
    # and another study's masks are other masks
    a = mask(values["cleveland"], rosters["cleveland"], pair_keys(rosters["cleveland"], "a"), one)
    b = mask(values["cleveland"], rosters["cleveland"], pair_keys(rosters["cleveland"], "b"), one)
    assert not np.array_equal(a, b)


def test_one_config_as_a_grid_and_as_a_marginal_query_shares_no_mask(tmp_path):
    """The coordinator sends one site the same config twice, once as a deep study's grid
    query and once as a marginal query, hoping both replies carry the same mask: their
    difference would be the site's two vectors in clear, each carrying only its 1/H
    share of the noise. The marginal query is refused in a training study (nothing is
    drawn or charged), and the digests of the two kinds differ, so even a site that
    answered both would mask them apart."""
    from fedsynth.client.grid import grid_reply
    from fedsynth.client.measure import answer
    from fedsynth.client.site import SiteState
    from fedsynth.common.generators.marginal.model import study_discretizer
    from fedsynth.common.generators.marginal.plan import MarginalPlan, calibrate
    from fedsynth.common.quantile_grid import grid_noise_for
    from fedsynth.common.schema import Schema
    from fedsynth.common.study import schema_fingerprint
    from fedsynth.simulations.simulate import SimulationOptions, prepare_sites, setup_mask_keys

    study = StudyConfig(generator="tvae", min_sites=3, num_server_rounds=1,
                        output_dir=str(tmp_path / "study"), secure_aggregation="masks",
                        study_id="cross-kind", honest_sites=3)
    sites, _, _ = prepare_sites(SimulationOptions(sites=SITES, epsilon=3.0, study=study),
                                tmp_path)
    sites = [replace(s, honest_sites=3) for s in setup_mask_keys(tmp_path, sites, 3)]
    schema = Schema.load(sites[0].schema_path)
    names = study_discretizer(schema, {}, "").names
    plan = MarginalPlan(attributes=len(names), rounds=1, candidates=1, per_round=1,
                        one_way_share=0.2, select_share=0.2)
    config = {**study.to_flat(), P.SCHEMA_FINGERPRINT: schema_fingerprint(schema),
              P.OP: P.MEASURE_OP, P.PLAN: json.dumps(plan.to_dict()),
              P.CLIQUES: json.dumps([[a] for a in names]), P.RELEASE_KIND: "one-way",
              P.STEP: 1, P.GRID_NOISE: grid_noise_for(3.0, 1e-5, study.grid_share),
              P.NOISE_LEVELS: calibrate(plan, 3.0, 1e-5).to_json()}
    state = SiteState().for_study(study.study_id)
    grid = grid_reply(sites[0], study, config[P.SCHEMA_FINGERPRINT], state, dict(config))
    assert grid.status == P.Status.GRID_RELEASED
    charged = list(state.ledger.history)
    marginal = answer(sites[0], study, dict(config), {}, {}, state)
    assert marginal.reply.status == P.Status.REFUSED and marginal.masked is None
    assert "marginal" in marginal.reply.problems[0]
    assert state.ledger.history == charged  # nothing drawn, nothing charged

    # and the two kinds' masks are apart: the grid vector masked as a marginal reply
    # would be, minus the grid reply, is uniform
    roster = load_roster(sites[0].name, sites[0].key_dir, sites[0].peer_keys)
    keys = pair_keys(roster, study.study_id)
    counts = np.asarray(state.grid_counts, dtype=float)
    as_marginal = mask(counts, roster, keys, request_digest(MARGINAL_MESSAGE, config, {}))
    assert _uniform_share(as_marginal - np.asarray(grid.arrays[P.GRID_MASKED])) > 0.95
    assert request_digest(GRID_MESSAGE, config, {}) != \
        request_digest(MARGINAL_MESSAGE, config, {})


def test_a_roster_refuses_its_own_key_a_duplicate_and_an_empty_folder(tmp_path):
    for n in ("a", "b"):
        generate_site_keypair(tmp_path / n)
    peers = tmp_path / "peers"
    peers.mkdir()
    with pytest.raises(KeySetupError, match="no <site>.pem"):
        load_roster("a", tmp_path / "a", peers)
    (peers / "b.pem").write_bytes((tmp_path / "b" / "x25519-public.pem").read_bytes())
    (peers / "c.pem").write_bytes((tmp_path / "b" / "x25519-public.pem").read_bytes())
    with pytest.raises(KeySetupError, match="same key as b"):
        load_roster("a", tmp_path / "a", peers)
    (peers / "c.pem").write_bytes((tmp_path / "a" / "x25519-public.pem").read_bytes())
    with pytest.raises(KeySetupError, match="own key"):
        load_roster("a", tmp_path / "a", peers)
    (peers / "c.pem").unlink()
    roster = load_roster("a", tmp_path / "a", peers)
    assert roster.size == 2 and set(roster.peers) == {"b"}
    assert isinstance(load_private_key(tmp_path / "a"), type(roster.private))


# ------------------------------------------------------------------- configuration


def test_splitting_noise_needs_a_masked_study(tmp_path):
    with pytest.raises(ConfigError, match="private only inside a masked sum"):
        SiteConfig(name="a", data_path="x", schema_path="y", honest_sites=2)
    with pytest.raises(ConfigError, match="whole number >= 1"):
        SiteConfig(name="a", data_path="x", schema_path="y", honest_sites=0)
    with pytest.raises(ConfigError, match="'masks' sums count releases"):
        StudyConfig(generator="tvae", secure_aggregation="masks", grid_share=0.0)
    with pytest.raises(ConfigError, match="private only inside a masked sum"):
        StudyConfig(generator="marginal", honest_sites=2)
    site = SiteConfig(name="a", data_path="x", schema_path="y", key_dir="k", peer_keys="p",
                      honest_sites=2)
    assert "'masks'" in site.aggregation_problem(StudyConfig(generator="marginal"))
    masked = StudyConfig(generator="marginal", secure_aggregation="masks")
    assert site.aggregation_problem(masked) == ""
    assert site.aggregation_problem(replace(masked, honest_sites=2)) == ""
    assert "trusts at most 2" in site.aggregation_problem(replace(masked, honest_sites=3))
    assert SiteConfig.from_node_config({"data-path": "x", "schema-path": "y", "key-dir": "k",
                                        "peer-keys": "p", "honest-sites": 3}).honest_sites == 3


def test_simulate_refuses_honest_sites_without_masks_and_writes_nothing(tmp_path):
    from fedsynth.cli import main

    out = tmp_path / "study"
    assert main(["simulate", "--honest-sites", "2", "--out", str(out)]) == 2
    assert main(["simulate", "--generator", "marginal", "--secure-aggregation", "masks",
                 "--honest-sites", "9", "--out", str(out)]) == 2
    assert not out.exists()


# ------------------------------------------------------------------- a real study


def _masked_study(tmp_path: Path, honest: int, noise: dict[str, float] | None = None,
                  budgets: dict[str, float] | None = None, forget: str = ""):
    """A masked study of SITES through the real apps; ``forget``: a peer key file that
    cleveland's roster lacks (a deployment mistake)."""
    from fedsynth.simulations.simulate import SimulationOptions, prepare_sites, setup_mask_keys

    study = StudyConfig(generator="marginal", generator_params=SMALL, min_sites=3,
                        output_dir=str(tmp_path / "study"), n_synthetic=200,
                        secure_aggregation="masks", study_id="masked-test",
                        federated_validation=True, honest_sites=honest)
    opts = SimulationOptions(sites=SITES, epsilon=3.0, study=study, site_noise=noise or {},
                             site_epsilon=budgets or {})
    sites, _, _ = prepare_sites(opts, tmp_path)
    sites = setup_mask_keys(tmp_path, [replace(s, reproducible_noise_seed=100 + i)
                                       for i, s in enumerate(sites)], honest)
    if forget:
        (Path(sites[0].peer_keys) / f"{forget}.pem").unlink()
    outcome, grid = run_recorded(study, sites, "heart_disease")
    return outcome, grid, sites


def _reply(grid: RecordingGrid, msg: Any) -> Any:
    return next(r for r in grid.received
                if r.metadata.reply_to_message_id == msg.metadata.message_id)


@pytest.mark.slow
def test_a_masked_study_shows_the_coordinator_only_the_sum(tmp_path, heart_schema):
    """h = 3: each site adds a third of the variance of one common noise, the most
    private site's (hungarian's budget is 10, the others' 3: it adds the same noise and
    spends about 3); the sum carries that noise whole; the ledgers charge it, and the
    worst case (every other site colludes) is reported beside it. A request asked again
    is refused, and so are common levels below a site's need."""
    from fedsynth.client.measure import site_cells
    from fedsynth.client.site import SiteState
    from fedsynth.common.generators.marginal.discretize import discretizer_for

    outcome, grid, sites = _masked_study(tmp_path, honest=3, budgets={"hungarian": 10.0})
    from fedsynth.common.validation.federated import COUNT_KEY

    measured, validated = [], 0
    for msg in grid.sent:
        if msg.metadata.message_type != P.MARGINAL_MESSAGE:  # federated validation:
            reply = _reply(grid, msg).content  # scores only, no site's count in clear
            assert COUNT_KEY not in dict(reply["metrics"])
            validated += 1
            continue
        cfg = dict(msg.content["config"])
        reply = _reply(grid, msg).content
        assert P.COUNTS_RECORD not in reply and P.CKKS_COUNTS not in reply  # nothing in clear
        assert set(dict(reply["metrics"])) <= P.MARGINAL_METRIC_KEYS
        if cfg[P.OP] == P.MEASURE_OP:
            v = np.asarray(reply[P.MASKED_COUNTS][P.VALUES].numpy())
            assert v.dtype == np.uint64 and _uniform_share(v) > 0.95
            measured.append((msg, cfg, dict(reply["metrics"])))
    assert validated == 3
    # the second release is the 1-way marginals on the cut bins: unmask it as the
    # coordinator does, and compare its noise with the exact pooled counts
    step = sorted({c[P.STEP] for _, c, _ in measured})[1]
    second = [(m, c, x) for m, c, x in measured if c[P.STEP] == step]
    assert len(second) == 3 and "cuts" in json.loads(second[0][1][P.BINNING])
    total = unmask_sum([np.asarray(_reply(grid, m).content[P.MASKED_COUNTS][P.VALUES]
                                   .numpy()) for m, _, _ in second])
    binning = second[0][1][P.BINNING]
    disc = discretizer_for(heart_schema, SMALL["bins"], binning)
    exact = sum(np.concatenate([np.bincount(cells[:, j], minlength=n)
                                for j, n in enumerate(disc.shape.values())])
                for cells in (site_cells(s, heart_schema, disc, SMALL["bins"], binning)
                              for s in sites))
    assert len({x[P.SIGMA_CHARGED] for _, _, x in second}) == 1  # one common noise
    metrics = second[0][2]
    charged, added = metrics[P.SIGMA_CHARGED], metrics[P.SIGMA_RELEASED]
    # the ledger charges the sum's noise, a hair less (SPLIT_CHARGE_MARGIN)
    assert added == pytest.approx(charged / SPLIT_CHARGE_MARGIN / math.sqrt(3), rel=1e-12)
    residual = float(np.std(total - exact))
    # three thirds of the variance: the sum's noise is one site's charged std, not
    # sqrt(3) times it as when every site adds its whole noise
    assert 0.7 * charged < residual < 1.3 * charged
    # a split site scores against its exact count (sensitivity 2): twice the noise
    scores = [dict(_reply(grid, m).content["metrics"]) for m in grid.sent
              if dict(m.content["config"]).get(P.OP) == P.SCORE_OP]
    assert scores
    for m in scores:
        assert m[P.SIGMA_RELEASED] == pytest.approx(
            2 * m[P.SIGMA_CHARGED] / SPLIT_CHARGE_MARGIN / math.sqrt(3), rel=1e-12)
    # the ledgers: the charged noise, as an independent accountant composes it; the
    # worst case at the noise each site added
    summary = json.loads((Path(outcome.output_dir) / "summary.json").read_text())
    for ctx in grid._grid.contexts.values():
        state = SiteState.from_record(dict(ctx.state["fedsynth-site"]))
        acc, alone = RDPAccountant(), RDPAccountant()
        acc.history = [tuple(h) for h in state.ledger.history]
        assert all(a == pytest.approx(c / SPLIT_CHARGE_MARGIN / math.sqrt(3), rel=1e-12)
                   for c, a, _ in state.shares)
        alone.history = [(a, 1.0, n) for _, a, n in state.shares]
        assert state.ledger.epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), abs=1e-6)
        assert state.alone_ledger().epsilon(1e-5) == pytest.approx(
            alone.get_epsilon(1e-5), abs=1e-6)
        assert 2.98 <= state.ledger.epsilon(1e-5) <= 3.0  # hungarian too, of its 10
    assert summary["secure_aggregation"]["honest_sites"] == {n: 3 for n in SITES}
    assert all(e > 3.5 for e in summary["secure_aggregation"]["epsilon_alone"].values())
    assert "not a DP release" in summary["privacy"]  # the test's replayable noise wins
    from fedsynth.server.app import release_label
    from fedsynth.server.rounds import RoundLog, SiteRound

    secret = RoundLog(1, [SiteRound("a", P.Status.TRAINED, epsilon=1.0, honest_sites=3)])
    assert "distributed noise" in release_label([secret])
    # the coordinator asks one site the same question again: refused, nothing masked
    msg = second[0][0]
    again = grid.send_and_receive([msg])[0].content
    assert P.MASKED_COUNTS not in again
    assert dict(again["site"])["status"] == P.Status.REFUSED
    assert "answered already" in " ".join(dict(again["site"])["problems"])
    # ... or a new step with common levels halved (a split of less noise): refused
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedsynth.common.generators.marginal.plan import NoiseLevels

    cfg = dict(msg.content["config"])
    levels = NoiseLevels.from_json(cfg[P.NOISE_LEVELS])
    cfg[P.NOISE_LEVELS] = NoiseLevels(*(v / 2 for v in vars(levels).values())).to_json()
    cfg[P.STEP] = 999
    from fedsynth.simulations.benchmark_inprocess import coordinator_identity

    with coordinator_identity(grid.run.run_id):
        forged = Message(RecordDict({"config": ConfigRecord(cfg)}),
                         dst_node_id=msg.metadata.dst_node_id,
                         message_type=P.MARGINAL_MESSAGE)
        reply = grid.send_and_receive([forged])[0].content
    assert P.MASKED_COUNTS not in reply
    assert "below this site's own" in " ".join(dict(reply["site"])["problems"])


@pytest.mark.slow
def test_a_masked_study_fails_when_a_site_does_not_answer(tmp_path, heart_schema):
    """A site whose fixed noise would pass its budget refuses: the others' vectors are
    useless to the coordinator (their masks stay on) and the study says why."""
    from fedsynth.server.marginal import NoSiteAnswered

    with pytest.raises((NoSiteAnswered, RuntimeError), match="masked sum needs every"):
        _masked_study(tmp_path, honest=1, noise={"switzerland": 0.05})


def test_preflight_checks_a_masked_sum_site_and_prints_the_fingerprints(tmp_path):
    from fedsynth.client.preflight import Report, _check_encryption
    from fedsynth.simulations.simulate import setup_mask_keys

    sites = [SiteConfig(name=n, data_path="x.csv", schema_path="s.yaml") for n in SITES]
    me = setup_mask_keys(tmp_path, sites, 1)[0]
    node = {"site-name": me.name, "key-dir": me.key_dir, "peer-keys": me.peer_keys,
            "honest-sites": 3}
    report = Report()
    _check_encryption(node, "", report)
    assert not report.problems, report.problems
    roster = load_roster(me.name, me.key_dir, me.peer_keys)
    assert all(fp in report.ok[0] for fp in roster.fingerprints().values())
    from fedsynth.client.preflight import absolute_node_config

    relative = {"peer-keys": "peers", "key-dir": "keys"}  # the runtime's folder differs
    assert all(Path(v).is_absolute() for v in absolute_node_config(relative).values())
    for bad, why in (({**node, "honest-sites": 4}, "cannot reach more sites"),
                     ({"peer-keys": me.peer_keys}, "needs key-dir"),
                     ({**node, "peer-keys": str(tmp_path / "none")}, "is not a folder")):
        report = Report()
        _check_encryption(bad, "", report)
        assert any(why in p for p in report.problems), report.problems


def test_the_benchmark_runs_masked_settings_only_when_asked():
    """``--honest-sites`` adds a masked setting per generator, epsilon and h (the
    marginal generator's counts, a deep one's quantile grid; 'all' = every site);
    without it the settings are unchanged."""
    from fedsynth.simulations.benchmark import BenchmarkOptions, plan_settings
    from fedsynth.simulations.benchmark_cli import _honest

    names = ["a", "b", "c", "d"]
    plain = plan_settings(BenchmarkOptions(generators=("marginal", "tvae"), baselines=()),
                          names)
    assert not any(s.honest_sites for s in plain)
    masked = plan_settings(BenchmarkOptions(generators=("marginal", "tvae"), baselines=(),
                                            epsilons=(1.0, 3.0), honest_sites=_honest("2,all")),
                           names)
    extra = [s.key for s in masked if s.honest_sites]
    assert extra == [f"{g}/federated/eps{e}/masks-h{h}" for g in ("marginal", "tvae")
                     for h in (2, 4) for e in (1, 3)]
    with pytest.raises(ConfigError, match="whole numbers >= 1"):
        _honest("0")


def test_a_score_against_the_exact_count_moves_by_at_most_two(heart_schema, heart_files):
    """The attacker adds or removes one real patient: ``||M - n p||_1`` with ``n`` the
    exact count moves by up to 2 (so the split site doubles its score noise), where a
    count fixed by an earlier release lets it move by 1 only."""
    from fedsynth.common.generators.marginal.discretize import Discretizer
    from fedsynth.common.generators.marginal.measure import marginal
    from fedsynth.common.table import read_table

    frame = read_table(heart_files["cleveland"], heart_schema)
    disc = Discretizer(heart_schema, bins=6)
    cells, names, sizes = disc.encode(frame), disc.names, disc.shape
    clique = ("age", "num")
    p = np.full(int(np.prod([sizes[a] for a in clique])), 1.0)
    p /= p.sum()

    def score(rows: np.ndarray, n: float) -> float:
        return float(np.abs(marginal(rows, names, sizes, clique) - n * p).sum())

    moves_exact = [abs(score(cells, len(cells)) - score(np.delete(cells, i, 0), len(cells) - 1))
                   for i in range(0, len(cells), 7)]
    moves_fixed = [abs(score(cells, 300.0) - score(np.delete(cells, i, 0), 300.0))
                   for i in range(0, len(cells), 7)]
    assert max(moves_fixed) <= 1 + 1e-9
    assert 1.2 < max(moves_exact) <= 2 + 1e-9  # above 1: the doubling is needed


def test_keys_peers_builds_the_roster_a_site_names_and_refuses_bad_keys(tmp_path, capsys):
    """`fedsynth keys peers`: the other sites' keys into peer-keys, with fingerprints to
    read aloud; this site's own key, a key twice or an existing file are refused and
    leave the folder as it was."""
    from fedsynth.common.encryption.keys import keys_command, public_key_fingerprint

    for n in ("a", "b", "c"):
        generate_site_keypair(tmp_path / n)
    pub = {n: str(tmp_path / n / "x25519-public.pem") for n in ("a", "b", "c")}
    out = tmp_path / "peers"
    base = ["peers", "--site", "a", "--site-key", str(tmp_path / "a"), "--out", str(out)]
    assert keys_command([*base, "--peer", f"b={pub['b']}", "--peer", f"x={pub['a']}"]) == 1
    assert "own key" in capsys.readouterr().err and not out.exists()
    assert keys_command([*base, "--peer", f"b={pub['b']}", "--peer", f"c={pub['b']}"]) == 1
    assert "same key as b" in capsys.readouterr().err and not out.exists()
    assert keys_command([*base, "--peer", f"b={pub['b']}", "--peer", f"c={pub['c']}"]) == 0
    printed = capsys.readouterr().out
    assert public_key_fingerprint(pub["b"]) in printed
    assert public_key_fingerprint(pub["c"]) in printed
    roster = load_roster("a", tmp_path / "a", out)
    assert set(roster.peers) == {"b", "c"}
    before = (out / "b.pem").read_bytes()
    assert keys_command([*base, "--peer", f"b={pub['c']}"]) == 1  # exists: no --force
    assert (out / "b.pem").read_bytes() == before


def test_the_report_shows_each_sites_epsilon_should_all_others_collude():
    """A split study's privacy table carries the worst case beside the epsilon; a study
    without a split keeps the table it had."""
    from fedsynth.common.validation.report import privacy_table
    from fedsynth.simulations.simulate import privacy_rows

    sites = {n: {"epsilon": 1.0, "rounds_trained": 3, "last_status": "trained"}
             for n in ("a", "b")}
    config = [{"name": n, "epsilon": 1.0, "delta": 1e-5} for n in ("a", "b")]
    split = {"sites": sites, "sites_config": config,
             "secure_aggregation": {"scheme": "masks", "honest_sites": {"a": 2, "b": 2},
                                    "epsilon_alone": {"a": 1.46, "b": 1.46}}}
    html = privacy_table(privacy_rows(split))
    assert "epsilon if all other sites collude" in html and "1.46" in html
    plain = privacy_table(privacy_rows({"sites": sites, "sites_config": config}))
    assert "collude" not in plain



@pytest.mark.slow
def test_a_roster_that_lacks_a_site_fails_the_study_with_the_reason(tmp_path):
    """Cleveland's peer-keys lacks switzerland's key: its masks do not pair with the
    others', the sum is noise, and the study stops saying so, before fitting anything."""
    from fedsynth.server.marginal import NoSiteAnswered

    with pytest.raises((NoSiteAnswered, RuntimeError), match="masks did not cancel"):
        _masked_study(tmp_path, honest=1, forget="switzerland")
    assert not (tmp_path / "study" / "synthetic.csv").exists()
