"""Faults: malformed replies, rounds asked twice, sites that crash, a coordinator that dies.

Fast part, no network: the coordinator's strategy gets real Flower messages whose
updates come from real DP training on the heart-disease sites, plus every kind of bad
reply, and must average exactly the good ones; a site's real ClientApp is asked the same
round twice and must not spend its budget twice.

Slow part, one real deployment (SuperLink + three SuperNodes, TLS and authentication)
shared by two studies: a site killed mid-round that rejoins, and a coordinator killed
after the sites trained a round but before it checkpointed it, then resumed.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from fedsynth.client.app import make_client_app
from fedsynth.client.site import SiteState, ledger_path, noise_for, train_site
from fedsynth.common.generators import Generator, get_generator
from fedsynth.common.privacy import PrivacyLedger, RoundPlan, round_cost
from fedsynth.common.schema import Schema
from fedsynth.common.study import SiteConfig, StudyConfig, schema_fingerprint
from fedsynth.server.guards import clear_guards, update_bounds
from fedsynth.server.packed_grid import unpacked
from fedsynth.server.strategy import RoundLog, SiteRound, make_strategy
from fedsynth.simulations.datasets import bundled_schema_path, bundled_site_files
from fedsynth.simulations.deploy import LocalDeployment, SiteSpec, _descendants
from tests.flower_support import stamp, task_identity

TINY = {"hidden": 16, "latent": 4}
STUDY = StudyConfig(
    study_id="faults", num_server_rounds=3, local_epochs=1, generator_params=TINY, min_sites=2
)


class NodeList(Grid):
    """The nodes a SuperLink would list; the strategy asks nothing else of it here.

    ``configure_train`` only asks which nodes are online; the replies are then handed
    to ``aggregate_train`` directly, as Flower's loop does after ``send_and_receive``.
    """

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        raise NotImplementedError


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    with task_identity():
        yield


_stamp = stamp


# --------------------------------------------------------------------------- strategy


@pytest.fixture(scope="module")
def trained(heart_files: dict[str, Path], heart_schema_path: Path) -> dict[str, Any]:
    """One real DP round at three hospitals from the same global model."""
    schema = Schema.load(heart_schema_path)
    model = get_generator("tvae")(schema, seed=STUDY.seed, **TINY)
    initial = model.state_dict()
    replies = {}
    for name in ("cleveland", "hungarian", "va"):
        site = SiteConfig(name, str(heart_files[name]), str(heart_schema_path))
        replies[name] = train_site(site, STUDY, schema_fingerprint(schema),
                                   {k: v.copy() for k, v in initial.items()}, SiteState(), 1)
        assert replies[name].status == "trained"
    return {"model": model, "initial": initial, "replies": replies}


def _content(name: str, arrays: dict[str, np.ndarray] | None,
             metrics: dict[str, Any]) -> RecordDict:
    content = RecordDict({
        "metrics": MetricRecord(metrics),
        "site": ConfigRecord({"name": name, "status": "trained", "problems": []}),
    })
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return content


def test_strategy_averages_only_the_good_replies(
    trained: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    model, initial, good = trained["model"], trained["initial"], trained["replies"]
    a, b = good["cleveland"], good["hungarian"]
    key = next(iter(initial))
    base = dict(good["va"].metrics)

    def changed(**values: Any) -> dict[str, Any]:
        return {**base, **values}

    def arrays(**override: np.ndarray) -> dict[str, np.ndarray]:
        return {**good["va"].arrays, **override}

    shifted = {k: v.copy() for k, v in good["va"].arrays.items()}
    shifted[key] = initial[key] + 50.0  # far beyond what one Adam step per lr can do
    bad: dict[str, tuple[dict[str, np.ndarray] | None, dict[str, Any], str]] = {
        "no-arrays": (None, base, "no model arrays"),
        "wrong-keys": ({k: v for k, v in good["va"].arrays.items() if k != key}, base,
                       "wrong keys"),
        "wrong-shape": (arrays(**{key: np.zeros((3, 3), np.float32)}), base, "has shape"),
        "nan": (arrays(**{key: np.full_like(initial[key], np.nan)}), base, "NaN or infinite"),
        "inf": (arrays(**{key: np.full_like(initial[key], np.inf)}), base, "NaN or infinite"),
        "too-large": (shifted, base, "update too large"),
        "no-epsilon": (good["va"].arrays, {k: v for k, v in base.items() if k != "epsilon"},
                       "missing or impossible epsilon"),
        "negative-epsilon": (good["va"].arrays, changed(epsilon=-0.5), "impossible epsilon"),
        "nan-epsilon": (good["va"].arrays, changed(epsilon=math.nan), "impossible epsilon"),
        "over-budget": (good["va"].arrays, changed(epsilon=3.5), "above the site's budget"),
        "bad-budget": (good["va"].arrays, changed(**{"epsilon-budget": -1.0}),
                       "impossible epsilon-budget"),
        "epsilon-went-down": (good["va"].arrays, changed(epsilon=0.1), "lower than the"),
        "bad-count": (good["va"].arrays, changed(**{"num-examples": -3.0}), "row count"),
    }
    names = ["cleveland", "hungarian", *bad, "crashed", "silent"]
    node_of = {name: 100 + i for i, name in enumerate(names)}

    bounds = update_bounds(model.networks(), model.training_spec(), STUDY.local_epochs,
                           STUDY.sample_rate)
    # The site whose epsilon "went down" reported more in an earlier round.
    earlier = [RoundLog(round=0, sites=[
        SiteRound(site="epsilon-went-down", status="trained", epsilon=2.0)])]
    strategy = make_strategy("fedavg", min_sites=2, proximal_mu=0.0,
                             extra_config=STUDY.to_flat(), guards=clear_guards(bounds),
                             history=earlier)
    start = ArrayRecord({k: Array(v) for k, v in initial.items()})
    sent = [_stamp(m) for m in strategy.configure_train(
        1, start, ConfigRecord(), NodeList(node_of.values()))]
    to = {m.metadata.dst_node_id: m for m in sent}

    replies = [
        _stamp(Message(_content(name, r.arrays, r.metrics), reply_to=to[node_of[name]]))
        for name, r in (("cleveland", a), ("hungarian", b))
    ]
    for name, (arr, metrics, _) in bad.items():
        replies.append(_stamp(Message(_content(name, arr, metrics), reply_to=to[node_of[name]])))
    from flwr.app import Error

    replies.append(Message(Error(code=0, reason="node went offline"),
                           reply_to=to[node_of["crashed"]]))
    # "silent": asked, never answered (what a round-timeout leaves).

    with caplog.at_level(logging.WARNING, logger="fedsynth.coordinator"):
        result, metrics = strategy.aggregate_train(1, replies)

    assert result is not None and metrics is not None
    wa, wb = a.metrics["num-examples"], b.metrics["num-examples"]
    for k in initial:
        expected = (wa * a.arrays[k] + wb * b.arrays[k]) / (wa + wb)
        np.testing.assert_allclose(result[k].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert metrics["sites-trained"] == 2

    record = strategy.history[-1]
    assert record.included == ["cleveland", "hungarian"] and record.aggregated
    status = {s.site: s for s in record.sites}
    for name, (_, _, reason) in bad.items():
        assert status[name].status == "refused", name
        assert reason in status[name].reason, (name, status[name].reason)
        assert any(f"refused the reply of {name}:" in r.getMessage() for r in caplog.records)
    assert status[f"node {node_of['crashed']}"].status == "failed"
    assert status[f"node {node_of['silent']}"].reason.startswith("no reply within")
    logged = caplog.text
    assert f"no reply from node {node_of['silent']}" in logged

    # The crashed site comes back and answers: its failure is then listed by name.
    crashed = 100 + names.index("crashed")
    again = [_stamp(m) for m in strategy.configure_train(
        2, result, ConfigRecord(), NodeList([node_of["cleveland"], crashed]))]
    back = {m.metadata.dst_node_id: m for m in again}
    replies = [_stamp(Message(_content(n, r.arrays, {**r.metrics, "epsilon": 2.5}),
                              reply_to=back[node]))
               for n, r, node in (("cleveland", a, node_of["cleveland"]),
                                  ("crashed", good["va"], crashed))]
    strategy.guards = clear_guards(None)  # round 2 starts from the average, not ``initial``
    assert strategy.aggregate_train(2, replies)[0] is not None
    assert {s.site: s.status for s in strategy.history[-2].sites}["crashed"] == "failed"


def test_too_few_good_replies_keep_the_model(trained: dict[str, Any]) -> None:
    """One good reply under min-sites 2: nothing is averaged, the round says so."""
    initial, good = trained["initial"], trained["replies"]
    strategy = make_strategy("fedavg", min_sites=2, proximal_mu=0.0,
                             extra_config=STUDY.to_flat())
    start = ArrayRecord({k: Array(v) for k, v in initial.items()})
    sent = [_stamp(m) for m in strategy.configure_train(1, start, ConfigRecord(),
                                                        NodeList([1, 2]))]
    a = good["cleveland"]
    bad_metrics = {**good["va"].metrics, "epsilon": math.inf}
    replies = [
        _stamp(Message(_content("cleveland", a.arrays, a.metrics), reply_to=sent[0])),
        _stamp(Message(_content("va", good["va"].arrays, bad_metrics), reply_to=sent[1])),
    ]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert not strategy.history[-1].aggregated
    assert strategy.history[-1].included == ["cleveland"]


def test_resumed_model_is_the_model_sent(trained: dict[str, Any], tmp_path: Path) -> None:
    """The next round's model and the one reloaded from its checkpoint have one digest.

    A site recognises a round asked again by that digest, so a coordinator that resumes
    from its checkpoint must send exactly the arrays it would have sent.
    """
    from fedsynth.client.replay import model_digest

    model, initial, good = trained["model"], trained["initial"], trained["replies"]
    strategy = make_strategy("fedavg", min_sites=2, proximal_mu=0.0,
                             extra_config=STUDY.to_flat())
    start = ArrayRecord({k: Array(v) for k, v in initial.items()})
    sent = [_stamp(m) for m in strategy.configure_train(1, start, ConfigRecord(),
                                                        NodeList([1, 2, 3]))]
    replies = [_stamp(Message(_content(n, good[n].arrays, good[n].metrics), reply_to=m))
               for n, m in zip(("cleveland", "hungarian", "va"), sent, strict=True)]
    aggregate, _ = strategy.aggregate_train(1, replies)
    assert aggregate is not None
    model.load_state_dict({k: v.numpy() for k, v in aggregate.items()})  # as run_study does
    model.save(tmp_path / "checkpoint.fsg", extra={"round": 1})
    reloaded = Generator.load(tmp_path / "checkpoint.fsg").state_dict()
    resent = ArrayRecord({k: Array(v) for k, v in reloaded.items()})
    assert model_digest(RecordDict({"arrays": resent}), ("arrays",)) == model_digest(
        RecordDict({"arrays": aggregate}), ("arrays",))


def test_honest_updates_fit_the_bound(trained: dict[str, Any]) -> None:
    """The bound is not tight enough to refuse real training (here, 3 hospitals)."""
    model, initial = trained["model"], trained["initial"]
    bounds = update_bounds(model.networks(), model.training_spec(), STUDY.local_epochs,
                           STUDY.sample_rate)
    assert set(bounds) == set(initial)
    for reply in trained["replies"].values():
        worst = max(float(np.max(np.abs(reply.arrays[k] - initial[k]))) / bounds[k]
                    for k in initial)
        assert 0 < worst <= 1.0


@pytest.mark.parametrize("generator", ["ctgan", "ddpm"])
def test_honest_updates_of_other_generators_fit_the_bound(
    generator: str, heart_files: dict[str, Path], heart_schema_path: Path
) -> None:
    """Same for the GAN (two optimizers, an EMA, a step counter) and the diffusion model."""
    schema = Schema.load(heart_schema_path)
    study = StudyConfig(study_id="bound", num_server_rounds=3, local_epochs=1,
                        sample_rate=0.2, generator=generator)
    model = get_generator(generator)(schema, seed=study.seed)
    initial = model.state_dict()
    site = SiteConfig("cleveland", str(heart_files["cleveland"]), str(heart_schema_path))
    reply = train_site(site, study, schema_fingerprint(schema), initial, SiteState(), 1)
    assert reply.status == "trained" and reply.arrays is not None
    bounds = update_bounds(model.networks(), model.training_spec(), study.local_epochs,
                           study.sample_rate)
    worst = max(float(np.max(np.abs(reply.arrays[k] - initial[k]))) / bounds[k]
                for k in initial)
    assert 0 < worst <= 1.0


@pytest.mark.parametrize("value", [0, -5, "nan", "soon"])
def test_round_timeout_must_be_positive_seconds(value: Any) -> None:
    from fedsynth.common.study import ConfigError

    with pytest.raises(ConfigError, match="round-timeout"):
        StudyConfig.from_flat({"round-timeout": value})
    assert StudyConfig.from_flat({"round-timeout": "90"}).round_timeout == 90.0


# --------------------------------------------------------------------------- site replay


def _ask(app: Any, site: SiteConfig, study: StudyConfig, arrays: dict[str, np.ndarray],
         server_round: int, fingerprint: str) -> Message:
    """One train message through the site's real ClientApp, in a fresh run (new context);
    the reply as the coordinator reads it (its array records unpacked)."""
    config = ConfigRecord({**study.to_flat(), "server-round": server_round,
                           "schema-fingerprint": fingerprint})
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "config": config})
    message = _stamp(Message(content, dst_node_id=1, message_type="train"))
    context = Context(run_id=7, node_id=1, node_config={**site.to_dict(), "site-name": site.name},
                      state=RecordDict(),
                      run_config={})
    return unpacked(app(message, context))


def _ledger(site: SiteConfig, study: StudyConfig) -> SiteState:
    path = ledger_path(site)
    assert path is not None
    return SiteState.from_record(json.loads(path.read_text()))


def test_a_round_asked_again_is_replayed_not_retrained(
    tmp_path: Path, heart_files: dict[str, Path], heart_schema_path: Path
) -> None:
    schema = Schema.load(heart_schema_path)
    fp = schema_fingerprint(schema)
    site = SiteConfig("cleveland", str(heart_files["cleveland"]), str(heart_schema_path),
                      state_dir=str(tmp_path / "state"))
    study = StudyConfig(study_id="replay", num_server_rounds=5, local_epochs=1,
                        generator_params=TINY)
    app = make_client_app()
    model = get_generator("tvae")(schema, seed=study.seed, **TINY).state_dict()

    first = _ask(app, site, study, model, 1, fp)
    after_first = _ledger(site, study)
    assert after_first.rounds_trained == 1 and after_first.ledger.total_steps() > 0

    # The coordinator died before checkpointing round 1 and asks again, same model.
    again = _ask(app, site, study, model, 1, fp)
    replayed = _ledger(site, study)
    assert replayed.ledger.history == after_first.ledger.history  # nothing spent
    assert replayed.rounds_trained == 1
    for key in model:
        assert np.array_equal(again.content["arrays"][key].numpy(),
                               first.content["arrays"][key].numpy())
    assert dict(again.content["metrics"]) == dict(first.content["metrics"])

    # Round 2 from the aggregate: a new question, trained and charged.
    new_model = {k: v.numpy() for k, v in first.content["arrays"].items()}
    second = _ask(app, site, study, new_model, 2, fp)
    charged = _ledger(site, study)
    assert dict(second.content["site"])["status"] == "trained"
    assert charged.rounds_trained == 2
    assert charged.ledger.epsilon(site.delta) > replayed.ledger.epsilon(site.delta)
    assert sorted(p.name for p in (tmp_path / "state").glob("reply-*")) == ["reply-replay-r2.bin"]

    # The same round number with a different model is a different release: charged.
    other = {k: v + np.float32(1e-3) for k, v in new_model.items()}
    _ask(app, site, study, other, 2, fp)
    assert _ledger(site, study).rounds_trained == 3

    # A stored reply that does not match the ledger's checksum is never sent: retrain.
    stored = tmp_path / "state" / "reply-replay-r2.bin"
    blob = stored.read_bytes()  # flip the last byte (the noise is random: it may be 0)
    stored.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    _ask(app, site, study, other, 2, fp)
    assert _ledger(site, study).rounds_trained == 4
    assert all(p.stat().st_mode & 0o077 == 0 for p in (tmp_path / "state").iterdir())


# --------------------------------------------------------------------------- deployment

SITES = ("cleveland", "hungarian", "va")
EPSILON = 3.0
ROUNDS = 3
RUN = {
    "num-server-rounds": ROUNDS,
    "local-epochs": 1,
    "generator-params": json.dumps(TINY),
    "n-synthetic": 100,
    "round-timeout": 120.0,
}
# Local epochs of the two drills that must act inside a round (crash a site mid-round,
# kill the coordinator between a site's reply and the checkpoint): at 1 epoch a site's
# task and reply take well under a second now that the model travels packed, and the
# tests' polls (tens of ms) could miss the window under a loaded CI machine; 60 epochs
# of the tiny model keep each site's task at a second or more.
WINDOW_EPOCHS = 60


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    from tests.test_deployment import _loopback_usable

    reason = _loopback_usable()
    if reason:
        pytest.skip(reason)
    files = bundled_site_files("heart_disease")
    schema = bundled_schema_path("heart_disease")
    with LocalDeployment(tmp_path_factory.mktemp("faults"), study_id="faults") as dep:
        dep.start_superlink()
        dep.add_sites([SiteSpec(n, str(files[n]), str(schema), epsilon=EPSILON) for n in SITES])
        dep.wait_for_nodes(len(SITES), timeout=180)
        yield dep


def _wait(condition: Any, timeout: float, what: str, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _training(dep: LocalDeployment, name: str) -> bool:
    """Whether the site has a ClientApp process running (a round under way): under its
    SuperNode, or under its ClientApp runtime (the hand-over Flower's SuperExec starts)."""
    roots = [p.popen.pid for p in dep.sites[name].processes() if p.popen is not None]
    for pid, _ in (c for root in roots for c in _descendants(root)):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"flwr-clientapp" in cmd:
            return True
    return False


def _checkpoint_round(output_dir: Path) -> int:
    path = output_dir / "checkpoint.fsg"
    if not path.exists():
        return 0
    try:
        return int(Generator.read_meta(path)["round"])
    except Exception:  # being replaced right now
        return 0


def _grid_released(dep: LocalDeployment, name: str, study_id: str) -> bool:
    state = _site_state(dep, name, study_id)
    return state is not None and state.grid_counts is not None


def _site_state(dep: LocalDeployment, name: str, study_id: str) -> SiteState | None:
    path = dep.sites[name].folder / "state" / "site-ledger.json"
    if not path.is_file():
        return None
    return SiteState.from_record(json.loads(path.read_text())).for_study(study_id)


def _expected_ledger(name: str, study: StudyConfig, rounds: int,
                     grid: bool = True) -> PrivacyLedger:
    """The ledger of the grid release and exactly ``rounds`` trained rounds, from the
    plan alone."""
    files = bundled_site_files("heart_disease")
    site = SiteConfig(name, str(files[name]), str(bundled_schema_path("heart_disease")),
                      epsilon=EPSILON)
    sigma = noise_for(site, study)
    plan = RoundPlan(study.sample_rate, study.local_epochs, study.loss_report)
    ledger = PrivacyLedger(study.accountant)
    # the quantile-grid release before round 1 (docs/privacy.md), unless the site was
    # down when it was asked (it then trains on the grid without having paid for one)
    if study.releases_grid and grid:
        from fedsynth.common.quantile_grid import grid_noise_for

        ledger.record(grid_noise_for(site.epsilon, site.delta, study.grid_share), 1.0, 1)
    for r in range(rounds):
        ledger = round_cost(ledger, sigma, plan, study.count_noise if r == 0 else None)
    return ledger


def _fresh_ledgers(dep: LocalDeployment) -> None:
    """Each drill stands for a study on fresh tables. A site's ledger is its table's for
    life, so without this the second drill would (rightly) find the first one's spending
    and calibrate to what is left; tests/test_coordinator_attacks.py checks that."""
    for name in SITES:
        shutil.rmtree(dep.sites[name].folder / "state", ignore_errors=True)


@pytest.mark.slow
def test_site_crash_mid_round_then_rejoins(deployment: LocalDeployment) -> None:
    _fresh_ledgers(deployment)
    dep, crashed = deployment, "va"
    # Rounds after the crash: the study must still be running when the site is back. A
    # restart and its registration check take 10-20 s on a loaded machine, and with the
    # model sent as one packed array a round of this study takes about 5 s; with two
    # rounds left the study once ended before the site rejoined.
    rounds = ROUNDS + 2
    run = {**RUN, "study-id": "crash", "min-sites": 2, "num-server-rounds": rounds,
           "local-epochs": WINDOW_EPOCHS}
    handle = dep.start_run(run, name="crash")
    # the study's first message is the quantile-grid query; crash in round 1's training
    _wait(lambda: _grid_released(dep, crashed, "crash"), 240, f"{crashed}'s grid release")
    _wait(lambda: not _training(dep, crashed), 120, f"{crashed}'s grid reply to finish")
    _wait(lambda: _training(dep, crashed), 240, f"{crashed} to start training round 1",
          step=0.02)
    dep.crash_supernode(crashed)  # SIGKILL, mid-round
    crashed_at = time.monotonic()
    _wait(lambda: _checkpoint_round(handle.output_dir) >= 1, 300, "round 1 to end")
    print(f"round 1 ended {time.monotonic() - crashed_at:.1f} s after the crash")
    dep.restart_supernode(crashed)
    dep.wait_for_nodes(len(SITES), timeout=120)
    result = dep.wait_run(handle, timeout=600)
    assert result.completed, result.log()

    summary = result.summary
    assert summary["rounds_completed"] == rounds
    logged = summary["rounds"]
    assert [r["round"] for r in logged] == list(range(1, rounds + 1))
    first = {s["site"]: s for s in logged[0]["sites"]}
    assert {n for n, s in first.items() if s["status"] == "trained"} == {"cleveland",
                                                                         "hungarian"}
    # The crashed site is listed as failed, under its name once it answered again.
    assert crashed in first and first[crashed]["status"] == "failed", first
    assert len(first) == len(SITES)
    assert all(r["aggregated"] for r in logged)
    # It rejoined and was included again by the last round.
    last = {s["site"]: s["status"] for s in logged[-1]["sites"]}
    assert last == {name: "trained" for name in SITES}
    for name in ("cleveland", "hungarian"):
        assert summary["sites"][name]["rounds_trained"] == rounds
    # Accounting intact: what each ledger holds is what it reported, and the crash
    # mid-round cost the crashed site nothing (no reply left it).
    for name in SITES:
        state = _site_state(dep, name, "crash")
        assert state is not None
        trained_rounds = summary["sites"][name]["rounds_trained"]
        assert state.rounds_trained == trained_rounds
        assert state.ledger.history == _expected_ledger(
            name, StudyConfig.from_flat(summary["study"]), trained_rounds,
            grid=state.grid_counts is not None).history
        assert state.ledger.epsilon(1e-5) == pytest.approx(summary["sites"][name]["epsilon"])
    log = result.log_path.read_text(errors="replace")
    assert "no reply from" in log


@pytest.mark.slow
def test_coordinator_restart_resumes_without_double_spending(
    deployment: LocalDeployment,
) -> None:
    dep, study_id = deployment, "restart"
    _fresh_ledgers(dep)
    run = {**RUN, "study-id": study_id, "min-sites": len(SITES), "local-epochs": WINDOW_EPOCHS}
    handle = dep.start_run(run, name="restart")
    out = handle.output_dir

    def trained_round_2_not_checkpointed() -> bool:
        states = [_site_state(dep, n, study_id) for n in SITES]
        return (any(s is not None and s.rounds_trained == 2 for s in states)
                and _checkpoint_round(out) == 1)

    _wait(trained_round_2_not_checkpointed, 400, "a site to finish round 2", step=0.05)
    dep.stop_superlink(crash=True)  # the coordinator dies, its ServerApp with it
    assert _checkpoint_round(out) == 1
    before = {n: _site_state(dep, n, study_id) for n in SITES}
    ahead = [n for n, s in before.items() if s is not None and s.rounds_trained == 2]
    assert ahead, before
    try:  # `flwr run --stream` loses its SuperLink; it may retry, so end it
        handle.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        handle.process.terminate()
        handle.process.wait(timeout=30)

    dep.restart_superlink()
    dep.wait_for_nodes(len(SITES), timeout=180)
    result = dep.run_study({**run, "resume": True, "output-dir": str(out)}, timeout=600,
                           name="restart-resumed")
    assert result.completed, result.log()
    log = result.log_path.read_text(errors="replace")
    assert f"resuming study {study_id} after round 1" in log
    # Flower's loop ran the two rounds left (its own count starts at 1), not three.
    assert f"[ROUND {ROUNDS - 1}/{ROUNDS - 1}]" in log and f"/{ROUNDS}]" not in log

    summary = result.summary
    assert summary["rounds_completed"] == ROUNDS
    assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))
    for record in summary["rounds"]:
        assert {s["site"] for s in record["sites"] if s["status"] == "trained"} == set(SITES)
    study = StudyConfig.from_flat(summary["study"])
    for name in SITES:
        state = _site_state(dep, name, study_id)
        assert state is not None
        # Round 2 counted once, whether the site trained it before the crash (then
        # replayed it) or after the restart.
        assert state.rounds_trained == ROUNDS, (name, ahead)
        assert state.ledger.history == _expected_ledger(
            name, study, ROUNDS, grid=state.grid_counts is not None).history
        assert state.ledger.epsilon(1e-5) == pytest.approx(summary["sites"][name]["epsilon"])
        assert summary["sites"][name]["epsilon"] <= EPSILON * (1 + 1e-9)
