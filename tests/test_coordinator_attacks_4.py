"""The fourth audit (twelfth session): the secret draws' entropy, the CKKS decryption
step of a marginal study, a release CKKS cannot hold, and a split changed mid-study.

Each test plays the coordinator against a site's real code on real heart-disease rows
(or against the real generators a site draws its DP noise from), and each failed on the
code before the audit.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import torch

from fedsynth.client.measure import answer
from fedsynth.client.secure import site_context
from fedsynth.client.site import SiteState
from fedsynth.common import protocol as P
from fedsynth.common.encryption import StateLayout, check_ciphertexts, load_public_context
from fedsynth.common.encryption.ckks import decrypt_state
from fedsynth.common.generators.marginal.model import study_discretizer
from fedsynth.common.generators.marginal.plan import MarginalPlan, calibrate
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.privacy.secure_noise import secure_gaussian
from fedsynth.common.schema import Schema
from fedsynth.common.study import SiteConfig, StudyConfig, schema_fingerprint
from fedsynth.simulations.simulate import (
    SimulationOptions,
    prepare_sites,
    setup_mask_keys,
    setup_simulation_keys,
)

SITES = ("cleveland", "hungarian", "switzerland")


# ------------------------------------------------------------- the secret draws' entropy

def test_a_secret_generator_is_not_replayed_from_any_seed_the_coordinator_can_search():
    """torch's Mersenne Twister keeps only a seed's low 32 bits: seeded with 63 secret
    bits, a site's DP-SGD noise and Poisson batches were one of 2**32 streams, which a
    coordinator can try one by one against a returned update (the audit's correlation
    test picked the true seed out of one round's weights, 0.67 against at most 0.025
    for 200 wrong ones). Now the whole 19,937-bit state comes from the OS: neither the
    generator's reported seed nor its low 32 bits replays a draw."""
    randomness = DPRandomness.secret()
    for stream in ("gradient-noise", "sampler"):
        drawn = randomness.torch(stream)
        seed = drawn.initial_seed()
        twins = [torch.Generator().manual_seed(seed & 0xFFFFFFFF),
                 torch.Generator().manual_seed(seed)]
        noise = secure_gaussian(1.0, 4096, drawn)
        for twin in twins:
            assert not torch.equal(noise, secure_gaussian(1.0, 4096, twin))
    # the draws inside a DP-SGD step read torch's global generator
    randomness.seed_global("model")
    seed = torch.initial_seed()
    inside = torch.rand(4096)
    torch.manual_seed(seed & 0xFFFFFFFF)
    assert not torch.equal(inside, torch.rand(4096))
    # two secret generators never share a stream; a reproducible one replays (tests only)
    assert not torch.equal(torch.rand(64, generator=randomness.torch("sampler")),
                           torch.rand(64, generator=randomness.torch("sampler")))
    again = [torch.rand(8, generator=DPRandomness.reproducible(3).torch("sampler"))
             for _ in range(2)]
    assert torch.equal(*again)


# --------------------------------------------------- a marginal study's CKKS decryption

@pytest.fixture()
def ckks_sites(tmp_path: Path) -> tuple[StudyConfig, list[SiteConfig], Schema]:
    study = StudyConfig(generator="marginal", min_sites=2, output_dir=str(tmp_path / "s"),
                        secure_aggregation="ckks", study_id="decrypt-oracle")
    sites, _, _ = prepare_sites(SimulationOptions(sites=SITES[:2], epsilon=3.0,
                                                  study=study), tmp_path)
    study, sites = setup_simulation_keys(tmp_path, study, sites)
    return study, sites, Schema.load(sites[0].schema_path)


def _measure(study: StudyConfig, schema: Schema, step: int) -> dict:
    plan = MarginalPlan(attributes=14, rounds=4, candidates=1, per_round=1,
                        one_way_share=0.2, select_share=0.2)  # four measurements' budget
    return {**study.to_flat(), P.SCHEMA_FINGERPRINT: schema_fingerprint(schema),
            P.OP: P.MEASURE_OP, P.PLAN: json.dumps(plan.to_dict()),
            P.CLIQUES: json.dumps([["age"]]), P.RELEASE_KIND: "measure", P.STEP: step}


def test_the_decryption_step_is_no_oracle(ckks_sites):
    """The coordinator holds a key-less context: it can subtract a plaintext from a
    ciphertext. Flooding relative to the decrypted peak let it ask for a site's vector,
    subtract the answer, ask again, and read the exact decryption the flooding exists
    to hide (Li-Micciancio key recovery starts there); the decrypt step answered any
    layout, any number of times, in any CKKS study. Now a site decrypts one sum per
    vector it encrypted, laid out as that vector, only in a marginal study, and floods
    at its count-bound's scale whatever the ciphertext holds."""
    study, (site, _), schema = ckks_sites
    state = SiteState().for_study(study.study_id)
    released = [answer(site, study, _measure(study, schema, step), {}, {}, state)
                for step in (1, 2)]
    chunks, layout = released[0].chunks, released[0].layout_json
    assert chunks is not None and len(state.decryptable) == 2, released[1].reply
    public = load_public_context(study.public_context)
    decrypt = {**study.to_flat(), P.SCHEMA_FINGERPRINT: schema_fingerprint(schema),
               P.OP: P.DECRYPT_OP}

    def ask(ciphertexts: list[bytes]) -> np.ndarray | None:
        reply = answer(site, study, dict(decrypt), {},
                       {P.CHUNKS: ciphertexts, P.LAYOUT: layout}, state)
        return None if reply.values is None else np.asarray(reply.values)

    def minus(ciphertexts: list[bytes], estimate: np.ndarray) -> list[bytes]:
        vec = ts.ckks_vector_from(public, ciphertexts[0]) - list(estimate / study.count_bound)
        out = [vec.serialize()]
        check_ciphertexts(public, out, StateLayout.from_json(layout))  # passes unkeyed
        return out

    ctx = site_context(site, study.study_id)
    first = ask(list(chunks))
    assert first is not None
    residual = minus(list(chunks), first)
    second = ask(residual)
    assert second is not None
    residual_exact = decrypt_state(ctx, residual, StateLayout.from_json(layout))[P.VALUES] \
        * study.count_bound
    # relative to the residual's peak (the old rule) the flooding would be ~1e-7 count;
    # at the count-bound's scale its std is ~0.1 (six cells: their largest)
    flood = np.max(np.abs(second - residual_exact))
    assert flood > 2.0**-20 * study.count_bound * 0.3
    assert ask(minus(list(chunks), first + second)) is None  # two vectors, two sums

    # a training study's sites decrypt nothing through this step
    tvae = replace(study, generator="tvae")
    refused = answer(site, tvae, {**decrypt, **tvae.to_flat()}, {},
                     {P.CHUNKS: list(chunks), P.LAYOUT: layout}, SiteState())
    assert refused.values is None and refused.reply.status == P.Status.REFUSED


def test_a_release_ckks_cannot_hold_is_charged_and_kept(ckks_sites):
    """``count-bound`` is the coordinator's: set below a known count, the encryption of
    the noisy vector failed after the draw and the charge, as an exception that skipped
    saving the state. The coordinator read failure or success (one bit of a fresh noisy
    vector) for free, as often as it liked. Now the failure is a reply, so the state
    with its charge is saved like any other."""
    study, (site, _), schema = ckks_sites
    tight = replace(study, count_bound=1.0)  # ~64 counts fit; cleveland's ages do not
    state = SiteState().for_study(tight.study_id)
    reply = answer(site, tight, _measure(tight, schema, 1), {}, {}, state)
    assert reply.reply.status == P.Status.ENCRYPTION_FAILED
    assert reply.chunks is None and reply.values is None
    assert "count-bound" in reply.reply.problems[0]
    assert len(state.ledger.history) == 1  # charged, as the release was drawn
    assert not state.decryptable


# ------------------------------------------------------------- one split per study

def test_a_study_keeps_the_split_of_its_first_release(tmp_path):
    """With honest-sites H > 1 a site's 1-way release carries 1/H of the noise (only the
    sum is a DP release), and its noisy count is that share. Asked next for scores at
    H = 1, the site scored against that count at sensitivity 1, for about twice the
    epsilon it charged. A study's releases now all keep the split of its first."""
    study = StudyConfig(generator="marginal", min_sites=3, output_dir=str(tmp_path / "s"),
                        secure_aggregation="masks", study_id="split-switch", honest_sites=3)
    sites, _, _ = prepare_sites(SimulationOptions(sites=SITES, epsilon=3.0, study=study),
                                tmp_path)
    sites = [replace(s, honest_sites=3) for s in setup_mask_keys(tmp_path, sites, 3)]
    schema = Schema.load(sites[0].schema_path)
    discretizer = study_discretizer(schema, {}, "")
    names = discretizer.names
    plan = MarginalPlan(attributes=len(names), rounds=1, candidates=1, per_round=1,
                        one_way_share=0.2, select_share=0.2)
    base = {P.SCHEMA_FINGERPRINT: schema_fingerprint(schema), P.PLAN: json.dumps(plan.to_dict())}
    one_way = {**study.to_flat(), **base, P.OP: P.MEASURE_OP, P.STEP: 1,
               P.RELEASE_KIND: "one-way", P.CLIQUES: json.dumps([[a] for a in names]),
               P.NOISE_LEVELS: calibrate(plan, 3.0, 1e-5).to_json()}
    state = SiteState().for_study(study.study_id)
    first = answer(sites[0], study, one_way, {}, {}, state)
    assert first.masked is not None and state.split_h == 3
    charged = list(state.ledger.history)

    at_one = replace(study, honest_sites=1)
    size = discretizer.shape[names[0]]
    p = np.full(size, 1.0 / size)
    score = {**at_one.to_flat(), **base, P.OP: P.SCORE_OP, P.STEP: 2,
             P.CLIQUES: json.dumps([[names[0]]])}
    reply = answer(sites[0], at_one, score, {"p.0": p}, {}, state)
    assert reply.masked is None and reply.values is None
    assert reply.reply.status == P.Status.REFUSED
    assert "honest-sites = 3" in reply.reply.problems[0]
    assert state.ledger.history == charged


# ------------------------------------------------------- a failure is charged like a success

def _client_send(site: SiteConfig, content, kind: str):
    from flwr.app import Context, Message, RecordDict

    from fedsynth.client.app import make_client_app
    from tests.flower_support import stamp, task_identity

    context = Context(run_id=7, node_id=1, node_config={**site.to_dict(),
                                                         "site-name": site.name},
                      state=RecordDict(), run_config={})
    with task_identity():
        return make_client_app()(stamp(Message(content, dst_node_id=1, message_type=kind)),
                                 context)


def _train(study: StudyConfig, schema: Schema):
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from fedsynth.common.generators import get_generator

    arrays = get_generator(study.generator)(schema, seed=study.seed,
                                            **study.generator_params).state_dict()
    config = ConfigRecord({**study.to_flat(), "server-round": 1,
                           "schema-fingerprint": schema_fingerprint(schema)})
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                       "config": config})


TINY_PLAN = StudyConfig(study_id="fails", num_server_rounds=3, sample_rate=0.5,
                        grid_share=0.0, generator_params={"hidden": 16, "latent": 4})


def test_a_round_that_fails_after_its_draws_is_charged(tmp_path, heart_files,
                                                       heart_schema_path, monkeypatch):
    """The coordinator can make a round fail on some tables only (the audit: a ddpm
    multiplicity whose per-sample norms outgrow memory exactly above a row count). The
    failure reached it as an error with the ledger as it was: a free answer, as often as
    asked. Now the round's whole cost is saved before the first draw, so a failure
    (here injected after the training steps) is charged what a success is."""
    import fedsynth.client.site as site_module
    from fedsynth.client.app import SiteFailure
    from fedsynth.client.site import load_site_state

    site = SiteConfig("cleveland", str(heart_files["cleveland"]), str(heart_schema_path),
                      epsilon=3.0, state_dir=str(tmp_path / "state"))
    schema = Schema.load(heart_schema_path)

    def fault(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(site_module, "dp_loss_report", fault)
    with pytest.raises(SiteFailure):
        _client_send(site, _train(TINY_PLAN, schema), "train")
    failed = load_site_state(site, TINY_PLAN.study_id).ledger
    monkeypatch.undo()
    other = replace(site, state_dir=str(tmp_path / "other"))
    reply = _client_send(other, _train(TINY_PLAN, schema), "train")
    assert dict(reply.content["site"])["status"] == P.Status.TRAINED
    trained = load_site_state(other, TINY_PLAN.study_id).ledger
    assert failed.history == trained.history  # the failure cost what the round costs
    assert failed.epsilon(site.delta) > 0


def test_a_lost_ledger_is_not_a_fresh_budget(tmp_path, heart_files, heart_schema_path):
    """A ledger file deleted (a wrong clean-up, a partial restore) or emptied used to
    read as a new site with its whole budget; the state-dir still shows it was used,
    and the site now refuses until the ledger is restored."""
    from fedsynth.client.app import SiteFailure
    from fedsynth.client.site import LostLedgerError, ledger_path, load_site_state

    site = SiteConfig("cleveland", str(heart_files["cleveland"]), str(heart_schema_path),
                      epsilon=3.0, state_dir=str(tmp_path / "state"))
    schema = Schema.load(heart_schema_path)
    reply = _client_send(site, _train(TINY_PLAN, schema), "train")
    assert dict(reply.content["site"])["status"] == P.Status.TRAINED
    path = ledger_path(site)
    kept = path.read_text()
    for damage in ("delete", "{}"):
        if damage == "delete":
            path.unlink()
        else:
            path.write_text(damage)
        with pytest.raises(LostLedgerError, match="(?i)restore it from a backup"):
            load_site_state(site, "another-study")
        with pytest.raises(SiteFailure):
            _client_send(site, _train(replace(TINY_PLAN, study_id="b"), schema), "train")
    path.write_text(kept)  # restored: the site answers again, its spending intact
    assert load_site_state(site, "b").ledger.epsilon(site.delta) > 0


def test_a_generator_size_is_bounded_before_any_site_trains(heart_schema_path):
    """A per-row multiplicity or a width the coordinator sets multiplies a round's
    memory by its batch's rows: unbounded, it let a round fail exactly above a row
    count. The sizes are bounded where the generator is built."""
    from fedsynth.common.generators import get_generator

    schema = Schema.load(heart_schema_path)
    for name, params in (("ddpm", {"multiplicity": 900}), ("ddpm", {"depth": 100}),
                         ("tvae", {"hidden": 100_000})):
        with pytest.raises(ValueError, match=next(iter(params))):
            get_generator(name)(schema, **params)
    assert get_generator("ddpm")(schema, multiplicity=8).hparams["multiplicity"] == 8


def test_a_study_without_a_name_is_refused():
    """A site keeps each study's once-only answers (its validation, its release, the
    digests it masked) under the study's id; an empty id was filed under no name and
    came back reset after any other study's message. Such a study is refused."""
    from fedsynth.common.study import ConfigError

    with pytest.raises(ConfigError, match="study-id must not be empty"):
        StudyConfig(study_id="  ")


def test_refused_requests_under_new_study_ids_do_not_grow_the_state(
        tmp_path, heart_files, heart_schema_path):
    """Each study id a site hears is kept in its state file, read and rewritten on every
    message: a coordinator sending refused requests under ever new ids (a wrong schema
    fingerprint: nothing read, nothing charged) grew the file by 300 studies in 5 s. A
    study that released nothing is no longer kept; one that did is."""
    from fedsynth.client.site import ledger_path, load_site_state

    site = SiteConfig("cleveland", str(heart_files["cleveland"]), str(heart_schema_path),
                      epsilon=3.0, state_dir=str(tmp_path / "state"))
    schema = Schema.load(heart_schema_path)
    trained = _client_send(site, _train(TINY_PLAN, schema), "train")
    assert dict(trained.content["site"])["status"] == P.Status.TRAINED
    for i in range(20):
        content = _train(replace(TINY_PLAN, study_id=f"probe-{i}"), schema)
        content["config"]["schema-fingerprint"] = "not-this-schema"
        refused = _client_send(site, content, "train")
        assert dict(refused.content["site"])["status"] != P.Status.TRAINED
    state = load_site_state(site, "another")
    assert set(state.other_studies) == {TINY_PLAN.study_id}
    assert state.ledger.history and ledger_path(site).stat().st_size < 20_000
