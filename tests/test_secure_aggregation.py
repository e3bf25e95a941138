"""Encrypted aggregation in the study itself: real TenSEAL, real TVAE, real hospitals.

What is checked, and why it matters:

- the coordinator's context cannot decrypt (nor encrypt), and the model the sites
  decrypt is the plaintext FedAvg of the sites' real DP-trained updates within 1e-6;
- in one real Flower simulation with encryption and DP on, no message the coordinator
  receives holds a model array or a row count in clear, except the final release;
- bad ciphertexts are refused where they can be seen: the coordinator refuses a reply
  of the wrong count or size and averages the others; a site refuses an aggregate that
  does not decrypt or has the wrong shape and does not train on it;
- strategies that are not linear in the updates are refused with the reason.

One simulation only: the Ray engine takes seconds to start.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tenseal as ts
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedsynth.client.secure import (
    AGGREGATE_REFUSED,
    CKKS_RECORD,
    GlobalModel,
    model_layout,
    open_global_model,
    release_final,
    train_encrypted,
)
from fedsynth.client.site import (
    TRAINED,
    SiteState,
    load_encoded,
    load_site_state,
    train_site,
)
from fedsynth.common.encryption import (
    EncryptionContextError,
    StateLayout,
    add_encrypted,
    check_ciphertexts,
    create_study_keys,
    decrypt_weighted_mean,
    encrypt_weighted_update,
    generate_site_keypair,
    load_public_context,
    make_secret_context,
    unwrap_secret_context,
)
from fedsynth.common.encryption.keys import PRIVATE_KEY_FILE
from fedsynth.common.generators import TVAE, Generator
from fedsynth.common.protocol import CHUNKS, ENCRYPTED_WEIGHT, LAYOUT
from fedsynth.common.schema import Schema
from fedsynth.common.study import (
    NONLINEAR_STRATEGIES,
    ConfigError,
    SiteConfig,
    StudyConfig,
    schema_fingerprint,
)
from fedsynth.server.secure import (
    SecureAggregation,
    make_secure_strategy,
    read_encrypted_checkpoint,
)
from fedsynth.server.strategy import SiteAwareFedAvg, SiteAwareFedProx
from fedsynth.simulations.simulate import SimulationOptions
from tests.flower_support import RecordingGrid

SITES = ("cleveland", "switzerland")
TOLERANCE = 1e-6


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real study key set: each site's key pair, the holder's wrap, the public context."""
    root = tmp_path_factory.mktemp("keys")
    site_dirs = {name: root / "sites" / name for name in SITES}
    for folder in site_dirs.values():
        generate_site_keypair(folder)
    made = create_study_keys("secure-test", site_dirs[SITES[0]], site_dirs, root / "coordinator")
    return {
        "study_id": "secure-test",
        "site_dirs": site_dirs,
        "made": made,
        "public_ctx": load_public_context(made.public_context_path),
    }


def _site(keys: dict[str, Any], heart_files: dict[str, Path], schema_path: Path, name: str
          ) -> SiteConfig:
    return SiteConfig(
        name=name,
        data_path=str(heart_files[name]),
        schema_path=str(schema_path),
        epsilon=3.0,
        key_dir=str(keys["site_dirs"][name]),
        holder_public_key=str(keys["made"].holder_public_key_path),
        wrapped_context=str(keys["made"].wrapped[name]),
    )


@pytest.fixture(scope="module")
def sites(keys, heart_files, heart_schema_path) -> dict[str, SiteConfig]:
    return {name: _site(keys, heart_files, heart_schema_path, name) for name in SITES}


@pytest.fixture(scope="module")
def study(keys) -> StudyConfig:
    """The default generator (the real TVAE), one local epoch, encryption on."""
    return StudyConfig(
        study_id=keys["study_id"],
        num_server_rounds=3,
        local_epochs=1,
        secure_aggregation="ckks",
        public_context=str(keys["made"].public_context_path),
    )


@pytest.fixture(scope="module")
def trained(sites, study, heart_schema: Schema) -> dict[str, Any]:
    """Each hospital's real DP round with ``train_site``, then its encrypted update."""
    initial = TVAE(heart_schema, seed=study.seed).state_dict()
    layout = model_layout(heart_schema, study)
    fp = schema_fingerprint(heart_schema)
    replies, chunks = {}, {}
    for name, site in sites.items():
        reply = train_site(site, study, fp, initial, SiteState(), 1)
        assert reply.status == TRAINED and reply.arrays is not None
        ctx = unwrap_secret_context(
            study.study_id, site.key_dir, site.holder_public_key, site.wrapped_context
        )
        update = encrypt_weighted_update(ctx, reply.arrays, reply.metrics["num-examples"],
                                         layout=layout)
        replies[name], chunks[name] = reply, update.chunks
    return {"replies": replies, "chunks": chunks, "layout": layout, "initial": initial}


def _reply(content: RecordDict, node: int) -> Message:
    """A reply as the coordinator receives it from node ``node``."""
    meta = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=MessageType.TRAIN,
    )
    return Message(content, metadata=meta)


def _encrypted_reply(name: str, chunks: list[bytes], layout: StateLayout, node: int,
                     epsilon: float = 1.0) -> Message:
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {"num-examples": ENCRYPTED_WEIGHT, "epsilon": epsilon, "loss": 10.0}
            ),
            "site": ConfigRecord({"name": name, "status": TRAINED, "problems": []}),
            CKKS_RECORD: ConfigRecord({CHUNKS: chunks, LAYOUT: layout.to_json()}),
        }
    )
    return _reply(content, node)


def _strategy(keys: dict[str, Any], layout: StateLayout) -> SecureAggregation:
    strategy = make_secure_strategy(
        "fedavg",
        min_sites=1,
        proximal_mu=0.0,
        extra_config={},
        public_ctx=keys["public_ctx"],
        layout=layout,
    )
    assert isinstance(strategy, SecureAggregation)
    assert isinstance(strategy.strategy, SiteAwareFedAvg) and strategy.history == []
    return strategy


def _flat(state: dict[str, np.ndarray], keys: tuple[str, ...]) -> np.ndarray:
    return np.concatenate([np.asarray(state[k], dtype=np.float64).ravel() for k in keys])


# --------------------------------------------------------------------------- (a)


def test_coordinator_cannot_decrypt_and_sites_get_plaintext_fedavg(keys, sites, trained):
    layout: StateLayout = trained["layout"]
    public_ctx: ts.Context = keys["public_ctx"]
    assert layout.n_chunks >= 2  # the default generator spans several ciphertexts

    strategy = _strategy(keys, layout)
    replies = [_encrypted_reply(n, trained["chunks"][n], layout, i + 1)
               for i, n in enumerate(SITES)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and len(arrays) == 0  # nothing in clear at the coordinator
    summed = strategy.aggregate
    assert summed is not None and len(summed) == layout.n_chunks

    # The coordinator's context holds no key: it cannot decrypt, nor encrypt.
    assert not public_ctx.is_private()
    with pytest.raises(EncryptionContextError):
        decrypt_weighted_mean(public_ctx, summed, layout)
    with pytest.raises(ValueError):
        ts.ckks_vector_from(public_ctx, summed[0]).decrypt()
    with pytest.raises(EncryptionContextError):
        encrypt_weighted_update(public_ctx, trained["initial"], 10.0, layout=layout)
    coordinator = keys["made"].public_context_path.parent
    assert not list(coordinator.rglob(PRIVATE_KEY_FILE))

    # Flower's own plaintext FedAvg of the same updates, weighted by the DP counts.
    plain = aggregate_arrayrecords(
        [
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in r.arrays.items()}),
                    "metrics": MetricRecord({"num-examples": r.metrics["num-examples"]}),
                }
            )
            for r in trained["replies"].values()
        ],
        "num-examples",
    )
    want = _flat({k: v.numpy() for k, v in plain.items()}, layout.keys)
    for name in SITES:  # every site decrypts the same model with its own unwrapped copy
        site = sites[name]
        ctx = unwrap_secret_context(
            keys["study_id"], site.key_dir, site.holder_public_key, site.wrapped_context
        )
        got = open_global_model(ctx, GlobalModel(summed, layout.to_json()), layout)
        error = np.max(np.abs(_flat(got, layout.keys) - want)) / np.max(np.abs(want))
        assert error < TOLERANCE, (name, error)
    counts = [r.metrics["num-examples"] for r in trained["replies"].values()]
    assert len(set(counts)) == 2  # the weights really differ, so weighting is tested


# --------------------------------------------------------------------------- (c)


def test_coordinator_refuses_wrong_ciphertexts_and_the_round_goes_on(keys, sites, trained,
                                                                      caplog):
    layout: StateLayout = trained["layout"]
    good = trained["chunks"]["cleveland"]
    truncated = [*good[:-1], good[-1][:-100]]
    plaintext = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in trained["initial"].items()}),
            "metrics": MetricRecord({"num-examples": ENCRYPTED_WEIGHT, "epsilon": 1.0}),
            "site": ConfigRecord({"name": "leaky", "status": TRAINED, "problems": []}),
        }
    )
    strategy = _strategy(keys, layout)
    replies = [
        _encrypted_reply("cleveland", good, layout, 1),
        _encrypted_reply("short", good[:-1], layout, 2),
        _encrypted_reply("cut", truncated, layout, 3),
        _reply(plaintext, 4),
    ]
    with caplog.at_level(logging.WARNING, logger="fedsynth.coordinator"):
        _, metrics = strategy.aggregate_train(1, replies)
    log = {s.site: s for s in strategy.history[-1].sites}
    assert log["cleveland"].status == "trained"
    assert log["short"].status == "refused" and "ciphertexts" in log["short"].reason
    assert log["cut"].status == "refused" and "bytes" in log["cut"].reason
    assert log["leaky"].status == "refused" and "in clear" in log["leaky"].reason
    for name in ("short", "cut", "leaky"):
        assert any(name in r.getMessage() and "refused" in r.getMessage()
                   for r in caplog.records)
    assert metrics is not None and metrics["sites-trained"] == 1
    # The sum is Cleveland's update alone: what the site decrypts is its own model.
    site = sites["cleveland"]
    ctx = unwrap_secret_context(
        keys["study_id"], site.key_dir, site.holder_public_key, site.wrapped_context
    )
    assert strategy.aggregate is not None
    got = open_global_model(ctx, GlobalModel(strategy.aggregate, layout.to_json()), layout)
    want = trained["replies"]["cleveland"].arrays
    error = np.max(np.abs(_flat(got, layout.keys) - _flat(want, layout.keys)))
    assert error / np.max(np.abs(_flat(want, layout.keys))) < TOLERANCE


def test_site_refuses_a_garbage_aggregate(keys, sites, study, trained, heart_schema):
    layout: StateLayout = trained["layout"]
    good = trained["chunks"]["cleveland"]
    other_key = encrypt_weighted_update(
        make_secret_context(), trained["initial"], 100.0, layout=layout
    ).chunks
    small = replace(study, generator_params={"hidden": 16, "latent": 4})
    # What an active coordinator can make with its key-less context: -1 x an update.
    negated = [ts.ckks_vector_from(keys["public_ctx"], c).neg().serialize() for c in good]
    count = trained["replies"]["cleveland"].metrics["num-examples"]
    garbage = {
        "random bytes": [os.urandom(len(c)) for c in good],
        "one ciphertext short": good[:-1],
        "another study key": other_key,
        "another model": good,  # valid ciphertexts, but the layout is not this model's
        "negated update": negated,
    }
    fp = schema_fingerprint(heart_schema)
    for what, chunks in garbage.items():
        plan = small if what == "another model" else study
        state = SiteState()
        result = train_encrypted(
            sites["switzerland"], plan, fp, GlobalModel(chunks, layout.to_json()), state, 2
        )
        assert result.reply.status == AGGREGATE_REFUSED, what
        assert result.ciphertexts is None and result.reply.arrays is None
        assert result.reply.problems and "refused" in result.reply.problems[0]
        # The refusal goes to the coordinator: it must not quote a decrypted value
        # (here the count slot, -count / B, which would disclose the site's count).
        assert f"{count / study.count_bound:.3g}"[1:] not in result.reply.problems[0], what
        assert state.rounds_trained == 0 and state.noisy_count is None  # nothing spent
        released = release_final(sites["switzerland"], plan, fp,
                                 GlobalModel(chunks, layout.to_json()), state)
        assert released.status == AGGREGATE_REFUSED and released.arrays is None, what


def test_fedprox_trains_from_the_decrypted_model(keys, sites, study, trained, heart_schema):
    """FedProx composes: the site's anchor is the model it decrypts; the reply is sealed."""
    layout: StateLayout = trained["layout"]
    summed = add_encrypted(keys["public_ctx"], [trained["chunks"][n] for n in SITES])
    prox = replace(study, strategy="fedprox", proximal_mu=1.0)
    strategy = make_secure_strategy("fedprox", min_sites=1, proximal_mu=1.0, extra_config={},
                                    public_ctx=keys["public_ctx"], layout=layout)
    assert isinstance(strategy.strategy, SiteAwareFedProx)
    assert strategy.strategy.proximal_mu == 1.0
    state = SiteState()
    result = train_encrypted(sites["cleveland"], prox, schema_fingerprint(heart_schema),
                             GlobalModel(summed, layout.to_json()), state, 2)
    assert result.reply.status == TRAINED and result.reply.arrays is None
    assert result.ciphertexts is not None and state.rounds_trained == 1
    check_ciphertexts(keys["public_ctx"], result.ciphertexts, layout)
    assert result.reply.metrics["num-examples"] == ENCRYPTED_WEIGHT
    assert "train-seconds" not in result.reply.metrics  # its length would track the count


# --------------------------------------------------------------------------- (d)


@pytest.mark.parametrize("name", ["FedAdam", *sorted(NONLINEAR_STRATEGIES)])
def test_nonlinear_strategies_are_refused_under_encryption(name, keys, trained):
    with pytest.raises(ConfigError, match="not linear in the site updates"):
        StudyConfig(strategy=name, secure_aggregation="ckks")
    with pytest.raises(ConfigError, match="not linear"):
        make_secure_strategy(name, min_sites=1, proximal_mu=0.0, extra_config={},
                             public_ctx=keys["public_ctx"], layout=trained["layout"])
    with pytest.raises(ConfigError, match="strategy must be one of"):
        StudyConfig(strategy=name)  # without encryption: simply not offered
    assert StudyConfig(strategy="fedprox", secure_aggregation="ckks").strategy == "fedprox"


# --------------------------------------------------------------------------- (b)


@pytest.fixture(scope="module")
def simulation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`fedsynth simulate` with encryption and DP on, through a recording grid."""
    import fedsynth.simulations.simulate as sim
    from fedsynth.server.app import resolve_schema, run_study

    grids: list[RecordingGrid] = []

    def recording_server_app(study: StudyConfig, on_round: Any = None) -> ServerApp:
        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Any) -> None:
            grids.append(RecordingGrid(grid))
            run_study(grids[-1], study, resolve_schema(study.schema), on_round)

        return app

    out = tmp_path_factory.mktemp("encrypted-study")
    opts = SimulationOptions(
        sites=SITES,
        epsilon=3.0,
        study=StudyConfig(
            num_server_rounds=2,
            local_epochs=1,
            sample_rate=0.1,
            generator_params={"hidden": 16, "latent": 4},
            output_dir=str(out),
            n_synthetic=200,
            secure_aggregation="ckks",
        ),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sim, "make_server_app", recording_server_app)
        summary = sim.simulate(opts)
    assert len(grids) == 1
    return {"summary": summary, "out": out, "grid": grids[0], "opts": opts}


def _row_counts(summary: dict[str, Any], study: StudyConfig, schema: Schema) -> set[float]:
    """Every site's exact training row count and the DP count it used as its weight."""
    counts: set[float] = set()
    for cfg in summary["sites_config"]:
        site = SiteConfig(cfg["name"], cfg["data-path"], cfg["schema-path"])
        data = load_encoded(site, schema)
        counts.add(float(len(data)))
        # the DP count as the site recorded it in its own state-dir
        recorded = load_site_state(SiteConfig.from_node_config(cfg), study.study_id)
        assert recorded.noisy_count is not None
        counts.add(float(recorded.noisy_count))
    return counts


def _numbers(record: Any) -> list[float]:
    values = record.values() if hasattr(record, "values") else []
    out: list[float] = []
    for value in values:
        items = value if isinstance(value, list) else [value]
        out += [float(v) for v in items if isinstance(v, int | float) and not isinstance(v, bool)]
    return out


@pytest.mark.slow
def test_encrypted_simulation_sends_nothing_in_clear(simulation, heart_schema):
    summary, out, grid = simulation["summary"], simulation["out"], simulation["grid"]
    study = StudyConfig.from_flat(summary["study"])
    model = TVAE(heart_schema, seed=study.seed, **study.generator_params)
    layout = StateLayout.from_state(model.state_dict(), count_bound=study.count_bound)
    public_ctx = load_public_context(study.public_context)
    assert not public_ctx.is_private()
    counts = _row_counts(summary, study, heart_schema)
    metric_keys = {
        "num-examples", "loss", "steps", "noise-multiplier", "epsilon", "delta", "epsilon-budget",
        "reproducible-noise",
    }

    train = [m for m in grid.received if m.metadata.message_type == MessageType.TRAIN]
    release = [m for m in grid.received if m.metadata.message_type == MessageType.QUERY]
    assert len(train) == 2 * len(SITES) and len(release) == 1
    for msg in train:
        content = msg.content
        assert dict(content["site"])["status"] == TRAINED
        for record in content.array_records.values():  # no weights in clear
            assert len(record) == 0
        for record in content.config_records.values():
            for value in record.values():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, bytes):
                        assert len(item) >= 100_000  # a ciphertext, not a small tensor
        check_ciphertexts(public_ctx, list(content[CKKS_RECORD][CHUNKS]), layout)
        metrics = dict(content["metrics"])
        assert set(metrics) <= metric_keys and metrics["num-examples"] == ENCRYPTED_WEIGHT
        assert 0 < metrics["epsilon"] <= 3.0  # epsilon is public: it depends on the plan only
        for record in [*content.metric_records.values(), *content.config_records.values()]:
            for number in _numbers(record):
                assert all(abs(number - c) >= 0.5 for c in counts), (number, counts)

    # Only the release carries the model in clear, flooded, once.
    (released,) = release
    arrays = released.content["arrays"]
    assert {k: tuple(a.shape) for k, a in arrays.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }
    final = Generator.load(out / "model.fsg").state_dict()
    assert all(np.array_equal(arrays[k].numpy(), final[k]) for k in final)

    # What the coordinator sent after round 1 is the encrypted sum, not weights.
    sent = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    second = [m for m in sent if dict(m.content["config"])["server-round"] == 2]
    assert second and all(len(m.content["arrays"]) == 0 for m in second)
    assert all(len(m.content[CKKS_RECORD]["aggregate"]) == layout.n_chunks for m in second)


@pytest.mark.slow
def test_encrypted_simulation_completes_with_outputs(simulation):
    summary, out = simulation["summary"], simulation["out"]
    assert summary["rounds_completed"] == 2
    assert all(s["status"] == "trained" for r in summary["rounds"] for s in r["sites"])
    assert all(s["weight"] is None for r in summary["rounds"] for s in r["sites"])
    secure = summary["secure_aggregation"]
    assert secure["released_by"] in SITES
    assert secure["bytes_per_update"] > secure["plaintext_bytes_per_update"]
    for name in ("synthetic.csv", "model.fsg", "summary.json", "report.html"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint.fsg").exists()  # the coordinator has no model to save
    ckpt = read_encrypted_checkpoint(out / "checkpoint.ckks")
    assert ckpt.meta["round"] == 2 and len(ckpt.aggregate) == ckpt.layout.n_chunks
    assert len(pd.read_csv(out / "synthetic.csv")) == 200
    head = json.loads((out / "validation.json").read_text())["validation"]["headline"]
    assert 0.0 <= head["fidelity"] <= 1.0 and math.isfinite(head["tstr_auroc"])
    assert max(s["epsilon"] for s in summary["sites"].values()) <= 3.0
