"""A curious coordinator attacks the sites, holding only what a coordinator holds.

The coordinator is one of the parties differential privacy protects patients from. Each
test here plays it with the public run config, the messages it sends and the replies it
gets (and the summary it may publish), and checks that the attack fails. Every one of
these attacks succeeded on the code before issue 11 (the demonstrated defects):

1. replaying a site's round from the public study seed reproduced its noise exactly;
2. a new study id gave a site a fresh budget;
3. a round sent in clear made an encryption-ready site send its weights in clear;
4. federated validation scored any table, as often as asked;
5. table-check problems carried exact counts;
6. the reply's ``train-seconds`` tracked the row count;
plus the end-of-study release, which a site answered as often as asked.

Real Flower messages, the real ClientApp, real Opacus, the real heart-disease tables.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedsynth.client.app import make_client_app
from fedsynth.client.evaluate import ROWS_KEY, SEED_KEY
from fedsynth.client.preflight import PreflightInput, run_preflight
from fedsynth.client.site import (
    BUDGET_EXHAUSTED,
    ENCRYPTION_REQUIRED,
    INVALID_DATA,
    TRAINED,
    SiteState,
    load_site_state,
    train_site,
)
from fedsynth.common.generators import get_generator
from fedsynth.common.schema import Schema
from fedsynth.common.study import ConfigError, SiteConfig, StudyConfig, schema_fingerprint
from fedsynth.common.table import read_table
from tests.flower_support import stamp, task_identity

TINY = {"hidden": 16, "latent": 4}
#: The one study plan of these attacks: small, DP on, the TVAE with its outcome histogram.
PLAN = StudyConfig(study_id="attack", num_server_rounds=3, local_epochs=1, sample_rate=0.5,
                   generator_params=TINY, seed=42)


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    with task_identity():
        yield


_stamp = stamp


def _initial(schema: Schema, study: StudyConfig = PLAN) -> dict[str, np.ndarray]:
    return get_generator(study.generator)(schema, seed=study.seed,
                                          **study.generator_params).state_dict()


def _send(site: SiteConfig, content: RecordDict, kind: str,
          state: RecordDict | None = None) -> RecordDict:
    """One message through the site's real ClientApp, as a deployed SuperNode gets it."""
    app = make_client_app()
    context = Context(run_id=7, node_id=1, node_config={**site.to_dict(), "site-name": site.name},
                      state=state if state is not None else RecordDict(), run_config={})
    return app(_stamp(Message(content, dst_node_id=1, message_type=kind)), context).content


def _train_message(study: StudyConfig, arrays: dict[str, np.ndarray], server_round: int,
                   fingerprint: str) -> RecordDict:
    config = ConfigRecord({**study.to_flat(), "server-round": server_round,
                           "schema-fingerprint": fingerprint})
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                       "config": config})


@pytest.fixture()
def site(tmp_path: Path, heart_files: dict[str, Path], heart_schema_path: Path) -> SiteConfig:
    return SiteConfig("cleveland", str(heart_files["cleveland"]), str(heart_schema_path),
                      epsilon=3.0, state_dir=str(tmp_path / "state"))


# ------------------------------------------------------------ 1. noise from public values


def test_replaying_a_round_from_public_inputs_does_not_reproduce_the_reply(
    site: SiteConfig, heart_schema: Schema
) -> None:
    """The coordinator replays the site's round on the true table (it knows the seed,
    the round, the site's name and the model it sent) and compares with the reply: a
    bit-identical replay would tell neighbouring tables apart with certainty and give
    the count release's noise away. Two identical calls must not agree either."""
    fp = schema_fingerprint(heart_schema)
    initial = _initial(heart_schema)
    plain = SiteConfig(site.name, site.data_path, site.schema_path, epsilon=3.0)
    reply = train_site(plain, PLAN, fp, initial, SiteState(), 1)
    replay = train_site(plain, PLAN, fp, initial, SiteState(), 1)
    assert reply.status == replay.status == TRAINED
    assert reply.arrays is not None and replay.arrays is not None
    # the outcome histogram the site released (its cond.freq buffer) and its DP count
    freq = [k for k in reply.arrays if k.endswith("freq")]
    assert freq, "the TVAE carries the released histogram"
    assert not np.array_equal(reply.arrays[freq[0]], replay.arrays[freq[0]])
    assert reply.metrics["num-examples"] != replay.metrics["num-examples"] or not np.array_equal(
        reply.arrays[freq[0]], replay.arrays[freq[0]])
    differs = [k for k in reply.arrays if not np.array_equal(reply.arrays[k], replay.arrays[k])]
    assert len(differs) > len(reply.arrays) // 2  # the weights too, not only the buffer
    # the released frequencies are not the exact ones the coordinator would solve for
    exact = read_table(site.data_path, heart_schema)["num"].value_counts(normalize=True)
    released = reply.arrays[freq[0]].ravel()
    assert not np.allclose(np.sort(released), np.sort(exact.to_numpy()), atol=1e-9)


def test_reproducible_noise_is_identical_labelled_and_refused_on_a_real_node(
    site: SiteConfig, heart_schema: Schema, tmp_path: Path
) -> None:
    """The test-only option repeats the draws, says so in every reply, and a deployed
    ClientApp and preflight refuse it."""
    fp = schema_fingerprint(heart_schema)
    initial = _initial(heart_schema)
    seeded = SiteConfig(site.name, site.data_path, site.schema_path, reproducible_noise_seed=5)
    one = train_site(seeded, PLAN, fp, initial, SiteState(), 1)
    two = train_site(seeded, PLAN, fp, initial, SiteState(), 1)
    assert one.arrays is not None and two.arrays is not None
    assert all(np.array_equal(one.arrays[k], two.arrays[k]) for k in one.arrays)
    assert one.metrics["reproducible-noise"] == 1.0
    assert one.metrics["num-examples"] == two.metrics["num-examples"]
    # the next round draws new noise, still reproducibly
    three = train_site(seeded, PLAN, fp, initial, SiteState(), 2)
    assert three.arrays is not None
    assert not all(np.array_equal(one.arrays[k], three.arrays[k]) for k in one.arrays)

    deployed = SiteConfig(site.name, site.data_path, site.schema_path, state_dir=site.state_dir,
                          reproducible_noise_seed=5)
    with pytest.raises(ConfigError, match="reproducible-noise-seed"):
        _send(deployed, _train_message(PLAN, initial, 1, fp), "train")
    report = run_preflight(PreflightInput(node=deployed.to_dict(), superlink="", insecure=True))
    assert any("reproducible-noise-seed" in p for p in report.problems)


@pytest.mark.slow
def test_published_summary_holds_no_exact_statistic_of_private_rows(
    tmp_path: Path, heart_schema: Schema
) -> None:
    """The coordinator (or anyone) reads the summary.json a study may publish and looks
    for every site's exact row count and outcome histogram cell: none may be there, nor
    a timing (a round's wall time grows with the rows; on the old code summary.json held
    ``seconds_federated``). The real rows the simulation wrote are owner-only (on the
    old code ``real/*.csv`` had the umask's 0644)."""
    from fedsynth.simulations.simulate import SimulationOptions, simulate

    out = tmp_path / "study"
    opts = SimulationOptions(
        sites=("cleveland", "switzerland"),
        study=StudyConfig(num_server_rounds=2, local_epochs=1, generator_params=TINY,
                          output_dir=str(out), n_synthetic=300),
    )
    simulate(opts)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"].startswith("DP release")
    exact: set[float] = set()
    for part in ("site-cleveland", "site-switzerland", "holdout", "train"):
        frame = read_table(out / "real" / f"{part}.csv", heart_schema)
        exact.add(float(len(frame)))
        exact |= {float(v) for v in frame["num"].value_counts()}
    # Every number that equals an exact statistic of the rows must be a DP release the
    # sites recorded (a noisy count can land on the exact one by chance; std 10).
    released: set[float] = set()
    for cfg in summary["sites_config"]:
        site_state = load_site_state(SiteConfig.from_node_config(cfg), summary["study"]["study-id"])
        assert site_state.noisy_count is not None
        released.add(float(site_state.noisy_count))
    released.add(float(summary["n_synthetic"]))  # their sum, post-processing
    leaked = sorted((exact & set(_numbers(summary))) - released)
    assert not leaked, leaked
    assert "rows" not in summary and "validation" not in summary
    assert "train-seconds" not in json.dumps(summary)
    assert not _keys_with("seconds", summary), _keys_with("seconds", summary)
    local = json.loads((out / "validation.json").read_text())
    assert local["rows"]["train"] + local["rows"]["holdout"] == 303 + 123
    assert local["seconds_federated"] > 0  # the timings stay with the data
    real = sorted((out / "real").iterdir())
    assert len(real) == 4
    assert all(p.stat().st_mode & 0o077 == 0 for p in real), {
        p.name: oct(p.stat().st_mode) for p in real}


def _keys_with(word: str, value: Any) -> list[str]:
    """Every key of a JSON value, at any depth, that contains ``word``."""
    if isinstance(value, dict):
        return [k for k in value if word in k] + [
            x for v in value.values() for x in _keys_with(word, v)]
    if isinstance(value, list):
        return [x for v in value for x in _keys_with(word, v)]
    return []


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)] if math.isfinite(value) else []
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return []


# ------------------------------------------------------------- 2. a new study id, a new budget


def test_new_study_ids_do_not_reset_the_tables_budget(
    site: SiteConfig, heart_schema: Schema
) -> None:
    """Studies A, B, C on the same rows: the budget is the table's, for all of them."""
    fp = schema_fingerprint(heart_schema)
    spent: list[float] = []
    statuses: list[str] = []
    for study_id in ("A", "B", "C"):
        study = StudyConfig(**{**PLAN.__dict__, "study_id": study_id})
        initial = _initial(heart_schema, study)
        for r in range(1, study.num_server_rounds + 1):
            reply = _send(site, _train_message(study, initial, r, fp), "train")
            statuses.append(str(dict(reply["site"])["status"]))
            spent.append(float(dict(reply["metrics"])["epsilon"]))
    assert statuses[:3] == [TRAINED] * 3
    assert BUDGET_EXHAUSTED in statuses[3:]  # B or C hits what A left
    assert max(spent) <= site.epsilon * (1 + 1e-9)
    assert spent == sorted(spent)  # one ledger: it only grows, across studies


def test_a_deployed_site_without_state_dir_refuses_to_train(
    site: SiteConfig, heart_schema: Schema
) -> None:
    no_state = SiteConfig(site.name, site.data_path, site.schema_path)
    message = _train_message(PLAN, _initial(heart_schema), 1, schema_fingerprint(heart_schema))
    with pytest.raises(ConfigError, match="state-dir"):
        _send(no_state, message, "train")


# ---------------------------------------------------------------- 3. switching encryption off


def _encryption_ready(site: SiteConfig, keys: Path) -> tuple[SiteConfig, Any]:
    """The site with its own CKKS key files in its node config (a study's real key set)."""
    from dataclasses import replace

    from fedsynth.common.encryption import create_study_keys, generate_site_keypair

    generate_site_keypair(keys / site.name)
    made = create_study_keys("attack", keys / site.name, {site.name: keys / site.name},
                             keys / "coordinator")
    ready = replace(site, key_dir=str(keys / site.name),
                    holder_public_key=str(made.holder_public_key_path),
                    wrapped_context=str(made.wrapped[site.name]))
    return ready, made


def test_an_encryption_ready_site_refuses_a_round_in_clear(
    site: SiteConfig, heart_schema: Schema, tmp_path: Path
) -> None:


    ready, made = _encryption_ready(site, tmp_path / "keys")
    clear = StudyConfig(**{**PLAN.__dict__, "secure_aggregation": "none"})
    reply = _send(ready, _train_message(clear, _initial(heart_schema), 1,
                                        schema_fingerprint(heart_schema)), "train")
    assert dict(reply["site"])["status"] == ENCRYPTION_REQUIRED
    assert "arrays" not in reply
    assert "num-examples" not in dict(reply["metrics"])
    assert dict(reply["metrics"])["epsilon"] == 0.0  # nothing was spent


# ----------------------------------------------------------- 4. federated validation as oracle


def _evaluate_message(study: StudyConfig, schema: Schema, arrays: dict[str, np.ndarray] | None,
                      rows: int, extra: dict[str, Any] | None = None) -> RecordDict:
    config = {**study.to_flat(), "schema-fingerprint": schema_fingerprint(schema),
              ROWS_KEY: rows, SEED_KEY: 1, **(extra or {})}
    content = RecordDict({"config": ConfigRecord(config)})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return content


def test_federated_validation_scores_no_crafted_table_and_answers_once(
    site: SiteConfig, heart_schema: Schema
) -> None:
    """The coordinator sends a crafted two-row table (on the old code a TVD revealed
    an exact category count), then asks the membership screen about a real record, then
    asks twice: the site scores only the released model's own sample, once."""
    from dataclasses import replace

    opted = replace(site, validation_scores="all")
    real = read_table(site.data_path, heart_schema)
    crafted = pd.concat([real.iloc[:1], real.iloc[:1]], ignore_index=True)
    attack = _evaluate_message(PLAN, heart_schema, None, 2,
                               {"synthetic-csv": crafted.to_csv(index=False)})
    reply = _send(opted, attack, "evaluate")
    assert dict(reply["site"])["status"] != "evaluated"
    assert not any(k.startswith(("tvd", "ks", "exact_copies")) for k in dict(reply["metrics"]))

    too_small = _send(opted, _evaluate_message(PLAN, heart_schema, _initial(heart_schema), 2),
                      "evaluate")
    assert dict(too_small["site"])["status"] != "evaluated"

    # the site scores only a study it took part in: it trains round 1 first
    trained = _send(opted, _train_message(PLAN, _initial(heart_schema), 1,
                                          schema_fingerprint(heart_schema)), "train")
    assert dict(trained["site"])["status"] == TRAINED

    honest = _send(opted, _evaluate_message(PLAN, heart_schema, _initial(heart_schema), 300),
                   "evaluate")
    assert dict(honest["site"])["status"] == "evaluated"
    scores = dict(honest["metrics"])
    # in clear the site cannot check the model is the release: no per-patient screens
    assert "exact_copies" not in scores and "dcr_min" not in scores
    again = _send(opted, _evaluate_message(PLAN, heart_schema, _initial(heart_schema), 300),
                  "evaluate")
    assert dict(again["site"])["status"] == "already-validated"
    assert not (set(dict(again["metrics"])) - {"epsilon", "delta", "epsilon-budget",
                                               "reproducible-noise"})


def test_a_validation_that_fails_while_scoring_is_spent(
    site: SiteConfig, heart_schema: Schema, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table the coordinator crafts can make the scoring fail on some sites' rows and
    not others; the study's one validation was marked used only on success, so the
    failure was a free answer and the coordinator could ask again with another table.
    Now it is spent before the rows are scored, whatever happens next."""
    from dataclasses import replace

    import fedsynth.client.evaluate as evaluate_module
    from fedsynth.client.app import SiteFailure

    opted = replace(site, validation_scores="quality")
    trained = _send(opted, _train_message(PLAN, _initial(heart_schema), 1,
                                          schema_fingerprint(heart_schema)), "train")
    assert dict(trained["site"])["status"] == TRAINED

    def fails(*args: Any, **kwargs: Any) -> dict[str, float]:
        raise ValueError("a value this site's rows cannot score")

    monkeypatch.setattr(evaluate_module, "evaluate_site", fails)
    message = _evaluate_message(PLAN, heart_schema, _initial(heart_schema), 300)
    with pytest.raises(SiteFailure):
        _send(opted, message, "evaluate")
    monkeypatch.undo()
    again = _send(opted, _evaluate_message(PLAN, heart_schema, _initial(heart_schema), 300),
                  "evaluate")
    assert dict(again["site"])["status"] == "already-validated"


def test_encrypted_validation_refuses_a_model_that_is_not_the_release(
    site: SiteConfig, heart_schema: Schema, tmp_path: Path
) -> None:
    """Under CKKS the site checks the model against the one it decrypted at release: a
    crafted model (here the untrained one) is refused."""
    from dataclasses import replace

    from fedsynth.client.site import released_model_path

    encrypted = StudyConfig(**{**PLAN.__dict__, "secure_aggregation": "ckks",
                               "public_context": "unused"})
    opted = replace(site, validation_scores="quality")
    reply = _send(opted, _evaluate_message(encrypted, heart_schema, _initial(heart_schema), 300),
                  "evaluate")
    assert dict(reply["site"])["status"] == "not-the-release"
    released = _initial(heart_schema)
    released = {k: v + 0.5 if v.dtype.kind == "f" else v for k, v in released.items()}
    took_part = load_site_state(site, encrypted.study_id)  # as if it trained round 1
    took_part.rounds_trained, took_part.noisy_count = 1, 303.0
    took_part.save(Path(site.state_dir) / "site-ledger.json")
    path = released_model_path(site, encrypted.study_id)  # and released the model
    assert path is not None
    np.savez(path, **released)
    crafted = _send(opted, _evaluate_message(encrypted, heart_schema, _initial(heart_schema),
                                             300), "evaluate")
    assert dict(crafted["site"])["status"] == "not-the-release"
    genuine = _send(opted, _evaluate_message(encrypted, heart_schema, released, 300), "evaluate")
    assert dict(genuine["site"])["status"] == "evaluated"


# -------------------------------------------------------------- 5. counts in table problems


def test_table_problems_reach_the_coordinator_without_counts(
    tmp_path: Path, heart_files: dict[str, Path], heart_schema_path: Path, heart_schema: Schema
) -> None:
    """One patient's age out of the domain: the coordinator learns which column and what
    kind of problem, not how many values (on the old code: '1 value(s) outside ...')."""
    lines = Path(heart_files["cleveland"]).read_text().splitlines()
    fields = lines[0].split(",")
    fields[0] = "250"  # age
    lines[0] = ",".join(fields)
    bad = tmp_path / "cleveland.csv"
    bad.write_text("\n".join(lines) + "\n")
    site = SiteConfig("cleveland", str(bad), str(heart_schema_path),
                      state_dir=str(tmp_path / "state"))
    reply = _send(site, _train_message(PLAN, _initial(heart_schema), 1,
                                       schema_fingerprint(heart_schema)), "train")
    info = dict(reply["site"])
    assert info["status"] == INVALID_DATA
    problems = [str(p) for p in info["problems"]]
    assert any("'age'" in p and "outside" in p for p in problems)
    assert not any(ch.isdigit() for p in problems for ch in p.split("[")[0]), problems


# -------------------------------------------------------------------- 6. timing in replies


def test_reply_metrics_do_not_track_the_row_count(
    tmp_path: Path, heart_files: dict[str, Path], heart_schema_path: Path, heart_schema: Schema
) -> None:
    """The same site with 303 and with 3,030 rows: every metric it sends in clear is a DP
    release or a public figure; no timing (0.76 s against 3.2 s on the old code)."""
    fp = schema_fingerprint(heart_schema)
    text = Path(heart_files["cleveland"]).read_text()
    big = tmp_path / "big.csv"
    big.write_text(text * 10)
    keys = []
    for path in (heart_files["cleveland"], big):
        site = SiteConfig("cleveland", str(path), str(heart_schema_path), epsilon=3.0)
        reply = train_site(site, PLAN, fp, _initial(heart_schema), SiteState(), 1)
        assert reply.status == TRAINED
        keys.append(set(reply.metrics))
    documented = {"num-examples", "loss", "steps", "noise-multiplier", "epsilon", "delta",
                  "epsilon-budget", "reproducible-noise"}
    assert keys[0] == keys[1] == documented


# ------------------------------------------------------------ the release, asked again


def test_the_final_release_is_answered_once(
    site: SiteConfig, heart_schema: Schema, tmp_path: Path
) -> None:
    """A coordinator that asks again for the decrypted final model could average the
    flooding noise away: the second request is refused."""

    from fedsynth.client.secure import CKKS_RECORD, model_layout
    from fedsynth.common.encryption import (
        encrypt_weighted_update,
        unwrap_secret_context,
    )
    from fedsynth.common.protocol import AGGREGATE, LAYOUT, RELEASE

    ready, made = _encryption_ready(site, tmp_path / "keys")
    study = StudyConfig(**{**PLAN.__dict__, "secure_aggregation": "ckks",
                           "public_context": str(made.public_context_path)})
    ctx = unwrap_secret_context("attack", ready.key_dir, ready.holder_public_key,
                                ready.wrapped_context)
    layout = model_layout(heart_schema, study)
    update = encrypt_weighted_update(ctx, _initial(heart_schema), 250.0, layout=layout)
    config = ConfigRecord({**study.to_flat(), RELEASE: True,
                           "schema-fingerprint": schema_fingerprint(heart_schema)})
    content = RecordDict({"config": config,
                          CKKS_RECORD: ConfigRecord({AGGREGATE: update.chunks,
                                                     LAYOUT: layout.to_json()})})
    first = _send(ready, content, "query")
    assert dict(first["site"])["status"] == "released" and "arrays" in first
    second = _send(ready, content, "query")
    assert dict(second["site"])["status"] == "already-released" and "arrays" not in second


# ------------------------------------------------- a model that overflows on one patient


def _overflow_model(schema: Schema, data: np.ndarray, row: int, study: StudyConfig
                    ) -> tuple[dict[str, np.ndarray], int]:
    """The coordinator's crafted TVAE: its first layer reads one column and is zero
    below a threshold that only ``row`` passes; above it, its activations reach 1e58,
    past float32, so that row's loss and gradient are inf or NaN and no other's is. The
    coordinator needs no data for this, only the public encoding and a guess."""
    model = get_generator(study.generator)(schema, seed=study.seed, **study.generator_params)
    column = next(c for c in range(data.shape[1])
                  if int(np.argmax(data[:, c])) == row
                  and int(np.sum(data[:, c] == data[:, c].max())) == 1)
    top = np.sort(data[:, column])
    threshold = float(top[-1] + top[-2]) / 2.0
    state = model.state_dict()
    first, second = state["vae.encoder.0.weight"], state["vae.encoder.2.weight"]
    first[:] = 0.0
    first[:, column] = 1e30
    state["vae.encoder.0.bias"][:] = -1e30 * threshold
    second[:] = 1e30
    return state, column


@pytest.mark.parametrize("mode", ["auto", "hooks", "ghost"])
def test_a_model_that_overflows_on_one_patient_does_not_reveal_them(
    tmp_path: Path, heart_files: dict[str, Path], heart_schema_path: Path, heart_schema: Schema,
    mode: str,
) -> None:
    """Neighbouring tables: cleveland, and cleveland without its oldest patient (77, the
    only one). The coordinator sends a model that overflows on that patient's row alone.
    On the old code a NaN per-sample gradient made the clipped sum, hence every weight of
    the reply, NaN, and the DP loss report NaN (sent as -1): the reply told the two
    tables apart with certainty, whatever the noise. A row whose gradient norm is not
    finite now contributes zero (a clipped contribution like any other), in every
    clipping mode, and its loss counts as the bound."""
    from fedsynth.common.encoding import TabularEncoder
    from fedsynth.common.privacy import DPSettings, PrivacyLedger, train_round
    from fedsynth.common.privacy.randomness import DPRandomness

    study = StudyConfig(study_id="overflow", num_server_rounds=3, local_epochs=1,
                        sample_rate=1.0, generator_params=TINY, seed=42, grid_share=0.0)
    lines = Path(heart_files["cleveland"]).read_text().splitlines(keepends=True)
    rows = read_table(heart_files["cleveland"], heart_schema)
    oldest = int(np.argmax(rows["age"].to_numpy()))
    assert int((rows["age"] == rows["age"].max()).sum()) == 1
    tables = {"with": tmp_path / "with.data", "without": tmp_path / "without.data"}
    tables["with"].write_text("".join(lines))
    tables["without"].write_text("".join(lines[:oldest] + lines[oldest + 1:]))
    probe = get_generator(study.generator)(heart_schema, seed=study.seed, **TINY)
    encoded = probe.encoder.reencode(TabularEncoder(heart_schema).encode(rows),
                                     TabularEncoder(heart_schema))
    crafted, _ = _overflow_model(heart_schema, encoded, oldest, study)
    fp = schema_fingerprint(heart_schema)
    for name, path in tables.items():
        site = SiteConfig("cleveland", str(path), str(heart_schema_path), epsilon=3.0)
        if mode == "auto":  # the site's real round: book-keeping clipping, loss report
            reply = train_site(site, study, fp, crafted, SiteState(), 1)
            assert reply.status == TRAINED and reply.arrays is not None
            weights, loss = reply.arrays, reply.metrics["loss"]
            assert loss > 0, (name, loss)  # -1: the report was NaN
        else:
            model = get_generator(study.generator)(heart_schema, seed=study.seed, **TINY)
            model.load_state_dict(crafted)
            data = model.encoder.reencode(
                TabularEncoder(heart_schema).encode(read_table(path, heart_schema)),
                TabularEncoder(heart_schema))
            train_round(model, data, epochs=1, sample_rate=1.0, dp=DPSettings(1.0, 1.0),
                        ledger=PrivacyLedger(), randomness=DPRandomness.secret(), mode=mode)
            weights = model.state_dict()
        broken = [k for k, v in weights.items() if not np.all(np.isfinite(v))]
        assert not broken, (name, mode, broken)


def test_federated_validation_answers_no_study_the_site_took_no_part_in(
    site: SiteConfig, heart_schema: Schema
) -> None:
    """Study ids are the coordinator's to pick, so "once per study" alone was no limit: on
    the old code a coordinator named a fresh study for each question and got scores every
    time, with no release charged (here: three fresh studies, three answers). A site
    now scores only a study in which it made a DP release, charged to its ledger."""
    from dataclasses import replace

    opted = replace(site, validation_scores="quality")
    answered = []
    for i in range(3):
        study = replace(PLAN, study_id=f"fresh-{i}")
        reply = _send(opted, _evaluate_message(study, heart_schema, _initial(heart_schema),
                                               300), "evaluate")
        answered.append(dict(reply["site"])["status"])
        assert not any(k.startswith(("tvd", "ks", "tstr")) for k in dict(reply["metrics"]))
    assert answered == ["not-the-release"] * 3
    assert load_site_state(opted, "fresh-0").ledger.epsilon(opted.delta) == 0.0


def test_an_exception_on_the_sites_rows_reaches_the_coordinator_as_a_fixed_text(
    site: SiteConfig, heart_schema: Schema, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Flower sends a handler's exception text to the coordinator as the error reply's
    reason (``str(exc)``). An exception raised while the site works on its rows may
    quote them; here one names the table's row count, as a shape error would. On the
    old code that text reached the coordinator as it was; now the coordinator gets a
    fixed text and the site's log keeps the detail."""
    import fedsynth.client.site as site_module

    def failing(model: Any, data: np.ndarray, **_: Any) -> Any:
        raise ValueError(f"a batch does not fit: {len(data)} rows against 64")

    monkeypatch.setattr(site_module, "train_round", failing)
    rows = len(read_table(site.data_path, heart_schema))
    with caplog.at_level("ERROR", logger="fedsynth.site"), pytest.raises(Exception) as failed:
        _send(site, _train_message(PLAN, _initial(heart_schema), 1,
                                   schema_fingerprint(heart_schema)), "train")
    reason = str(type(failed.value)) + ":<'" + str(failed.value) + "'>"  # as Flower sends it
    assert str(rows) not in reason and "rows against" not in reason, reason
    assert "site's own log" in reason
    assert f"{rows} rows against 64" in caplog.text  # the site keeps the detail
    # an error of the coordinator's own settings still says what is wrong
    bad = {**PLAN.to_flat(), "sample-rate": 2.0}
    content = _train_message(PLAN, _initial(heart_schema), 1, schema_fingerprint(heart_schema))
    content["config"] = ConfigRecord({**bad, "server-round": 1,
                                      "schema-fingerprint": schema_fingerprint(heart_schema)})
    with pytest.raises(ConfigError, match="sample-rate"):
        _send(site, content, "train")


def test_a_marginal_release_under_the_same_study_id_does_not_skip_the_count_check(
    site: SiteConfig, heart_schema: Schema
) -> None:
    """A site that fixes its own noise multiplier (its policy) and a coordinator that
    first asks a marginal 1-way release under study id S, then a training round under
    the same S with a count noise of 0.01. The 1-way release set the site's noisy count
    but made no histogram, and the round's budget check counted the count release only
    when no noisy count was set: on the old code the site trained, released its
    outcome histogram with std 0.01 (exact to the patient) and only then charged it,
    far past its budget. The check now follows the release it guards."""
    from dataclasses import replace

    from fedsynth.common import protocol as P
    from fedsynth.common.generators.marginal import MarginalGenerator

    fixed = replace(site, noise_multiplier=10.0)
    fp = schema_fingerprint(heart_schema)
    small = {"bins": 6, "rounds": 2, "per_round": 2, "candidates": 10, "iters": 150}
    measured = StudyConfig(study_id="shared-id", generator="marginal", generator_params=small)
    model = MarginalGenerator(heart_schema, **small)
    config = {**measured.to_flat(), "schema-fingerprint": fp,
              P.PLAN: json.dumps(model.plan().to_dict()), P.OP: P.MEASURE_OP,
              P.RELEASE_KIND: "one-way", P.STEP: 1,
              P.CLIQUES: json.dumps([[a] for a in model.discretizer.names])}
    one_way = _send(fixed, RecordDict({"config": ConfigRecord(config)}), P.MARGINAL_MESSAGE)
    assert dict(one_way["site"])["status"] == TRAINED  # a measured release, charged

    sharp = replace(PLAN, study_id="shared-id", count_noise=0.01, grid_share=0.0)
    reply = _send(fixed, _train_message(sharp, _initial(heart_schema, sharp), 1, fp), "train")
    status = dict(reply["site"])["status"]
    spent = float(dict(reply["metrics"])["epsilon"])
    assert spent <= fixed.epsilon * (1 + 1e-9), (status, spent)
    assert status == BUDGET_EXHAUSTED and "arrays" not in reply


def test_concurrent_requests_are_all_in_the_ledger(
    site: SiteConfig, heart_schema: Schema
) -> None:
    """Flower's SuperExec starts a ClientApp process per message without waiting for the
    last, so a coordinator can have two requests at a site at once (two studies, two
    runs). Each read the ledger, checked its budget against it, released and wrote it
    back: on the old code the second write dropped the first's releases, so the site had
    released two studies, each calibrated to the whole budget, and its ledger showed
    one. A site now answers one request at a time (a lock in its state-dir), so every
    release it sends is in its ledger."""
    import threading

    fp = schema_fingerprint(heart_schema)
    replies: dict[str, RecordDict] = {}

    def ask(study_id: str) -> None:
        study = StudyConfig(**{**PLAN.__dict__, "study_id": study_id, "grid_share": 0.0})
        replies[study_id] = _send(site, _train_message(study, _initial(heart_schema), 1, fp),
                                  "train")

    threads = [threading.Thread(target=ask, args=(s,)) for s in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trained = [s for s, r in replies.items() if dict(r["site"])["status"] == TRAINED]
    assert trained, {s: dict(r["site"])["status"] for s, r in replies.items()}
    ledger = load_site_state(site, "first").ledger
    count_releases = [r for r in ledger.history if r[1] == 1.0 and r[0] == PLAN.count_noise]
    assert len(count_releases) == len(trained), (trained, ledger.history)
    assert ledger.epsilon(site.delta) <= site.epsilon * (1 + 1e-9)


def test_an_encryption_ready_site_scores_nothing_in_clear(
    site: SiteConfig, heart_schema: Schema, tmp_path: Path
) -> None:
    """The site took part in encrypted study "attack" (its ledger says so), then the
    coordinator asks for validation under the same study id with the study config saying
    ``secure-aggregation = "none"``. On the old code the site took the study for one in
    clear: it skipped its check that the model is the one it released, scored the
    coordinator's model and sent its DP count in clear, which encryption had hidden.
    Encryption is the site's decision: it refuses, as it refuses a round in clear."""
    from dataclasses import replace

    ready, _ = _encryption_ready(site, tmp_path / "keys")
    ready = replace(ready, validation_scores="quality")
    took_part = load_site_state(ready, PLAN.study_id)
    took_part.rounds_trained, took_part.noisy_count = 1, 303.0
    took_part.save(Path(ready.state_dir) / "site-ledger.json")
    reply = _send(ready, _evaluate_message(PLAN, heart_schema, _initial(heart_schema), 300),
                  "evaluate")
    assert dict(reply["site"])["status"] == ENCRYPTION_REQUIRED
    metrics = dict(reply["metrics"])
    assert "n-rows-dp" not in metrics and not any(k.startswith(("ks", "tvd")) for k in metrics)


def test_the_update_is_divided_by_the_dp_count_not_the_row_count(
    site: SiteConfig, heart_schema: Schema, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DP-SGD divides the noisy sum by the expected batch, q x rows. With the exact row
    count (the old code) the released weights were a function of a private statistic
    the analysis does not cover; the site divides by its DP count, released before."""
    from dataclasses import replace

    from fedsynth.common.privacy import trainer

    seen: list[float] = []
    original = trainer._DPStep.__init__

    def spy(self: Any, mode: str, module: Any, dp: Any, lr: float, expected_batch: float,
            randomness: Any) -> None:
        seen.append(expected_batch)
        original(self, mode, module, dp, lr, expected_batch, randomness)

    monkeypatch.setattr(trainer._DPStep, "__init__", spy)
    seeded = replace(site, state_dir="", reproducible_noise_seed=3)  # a count != 303
    state = SiteState()
    reply = train_site(seeded, PLAN, schema_fingerprint(heart_schema), _initial(heart_schema),
                       state, 1)
    assert reply.status == TRAINED and state.noisy_count is not None
    rows = len(read_table(site.data_path, heart_schema))
    assert state.noisy_count != rows
    assert seen == [PLAN.sample_rate * state.noisy_count]


def test_the_coordinator_cannot_name_an_accountant_the_site_does_not_trust(
    site: SiteConfig, heart_schema: Schema
) -> None:
    """The study config names the accountant the site composes its releases with, and
    Opacus also has ``gdp``, a central-limit approximation that is no upper bound (on
    (1.0, q 0.02, 5 steps) it says epsilon 0.19 where PRV says 0.66). On the old code the
    study config was not checked: a grid request with ``accountant = "gdp"`` set it on
    the site's ledger, which the site saved, and every later request failed on a ledger
    it could no longer read. The site now refuses the config, with a clear error, and
    its ledger is untouched."""
    from fedsynth.common.protocol import GRID_MESSAGE

    fp = schema_fingerprint(heart_schema)
    gdp = {**PLAN.to_flat(), "accountant": "gdp", "schema-fingerprint": fp}
    with pytest.raises(ConfigError, match="accountant"):
        _send(site, RecordDict({"config": ConfigRecord(gdp)}), GRID_MESSAGE)
    ledger = Path(site.state_dir) / "site-ledger.json"
    assert not ledger.exists() or json.loads(ledger.read_text())["mechanism"] in ("rdp", "prv")
    honest = _send(site, _train_message(PLAN, _initial(heart_schema), 1, fp), "train")
    assert dict(honest["site"])["status"] == TRAINED
