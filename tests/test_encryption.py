"""CKKS aggregation on real TenSEAL ciphertexts and model-like weights.

The claims checked here are the ones the study relies on: the coordinator's context
cannot decrypt; what the sites decrypt is the plaintext FedAvg within 1e-6; malformed
replies and aggregates are refused on both sides, not silently averaged in.
"""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
import torch

from fedsynth.common.encryption import (
    MAX_ABS_VALUE,
    MAX_SUMMANDS,
    SLOTS_PER_CIPHERTEXT,
    EncryptedUpdateError,
    EncryptionContextError,
    StateLayout,
    add_encrypted,
    check_ciphertexts,
    ciphertext_nbytes,
    decrypt_state,
    decrypt_weighted_mean,
    encrypt_state,
    encrypt_weighted_update,
    flood_for_release,
    load_context,
    make_secret_context,
    public_context_bytes,
    secret_context_bytes,
)

COUNTS = [242, 235, 98, 160]
TOLERANCE = 1e-6


def _relative_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """Max-norm relative error over the whole state: per-element ratios blow up near 0."""
    keys = sorted(want)
    g = np.concatenate([np.asarray(got[k], dtype=np.float64).ravel() for k in keys])
    w = np.concatenate([np.asarray(want[k], dtype=np.float64).ravel() for k in keys])
    return float(np.max(np.abs(g - w)) / np.max(np.abs(w)))


def _per_tensor_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    return max(
        float(np.max(np.abs(got[k].astype(np.float64) - want[k])) / np.max(np.abs(want[k])))
        for k in want
    )


@pytest.fixture(scope="module")
def secret_ctx() -> ts.Context:
    return make_secret_context()


@pytest.fixture(scope="module")
def public_ctx(secret_ctx: ts.Context) -> ts.Context:
    return load_context(public_context_bytes(secret_ctx), require_secret=False)


@pytest.fixture(scope="module")
def site_states() -> list[dict[str, np.ndarray]]:
    """Four sites' versions of a ~15k-parameter MLP, as after different local training."""
    torch.manual_seed(7)
    model = torch.nn.Sequential(
        torch.nn.Linear(40, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 24),
    )
    base = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    assert 14_000 < sum(v.size for v in base.values()) < 16_000
    rng = np.random.default_rng(11)
    return [
        {
            k: (v * (1 + 0.1 * site) + rng.normal(0.0, 0.02 * (site + 1), v.shape)).astype(
                np.float32
            )
            for k, v in base.items()
        }
        for site in range(len(COUNTS))
    ]


def _fedavg(states: list[dict[str, np.ndarray]], counts: list[float]) -> dict[str, np.ndarray]:
    total = float(sum(counts))
    return {
        k: sum(c * s[k].astype(np.float64) for s, c in zip(states, counts, strict=True)) / total
        for k in states[0]
    }


@pytest.fixture(scope="module")
def weighted(secret_ctx, public_ctx, site_states):
    updates = [
        encrypt_weighted_update(secret_ctx, s, c) for s, c in zip(site_states, COUNTS, strict=True)
    ]
    summed = add_encrypted(public_ctx, [u.chunks for u in updates])
    return updates, summed


# --------------------------------------------------------------------------- who can read


def test_coordinator_context_has_no_secret_and_cannot_decrypt(secret_ctx, public_ctx, weighted):
    updates, summed = weighted
    assert secret_ctx.is_private()
    assert not public_ctx.is_private()
    assert not public_ctx.has_secret_key()
    vector = ts.ckks_vector_from(public_ctx, summed[0])
    with pytest.raises(ValueError, match="secret"):
        vector.decrypt()
    with pytest.raises(EncryptionContextError):
        decrypt_weighted_mean(public_ctx, summed, updates[0].layout)
    # Symmetric encryption: without the secret key the coordinator cannot encrypt either.
    with pytest.raises(EncryptionContextError):
        encrypt_state(public_ctx, {"w": np.ones(3)}, 1.0)


def test_load_context_enforces_the_side(secret_ctx):
    with pytest.raises(EncryptionContextError, match="secret key"):
        load_context(secret_context_bytes(secret_ctx), require_secret=False)
    with pytest.raises(EncryptionContextError, match="public context"):
        load_context(public_context_bytes(secret_ctx), require_secret=True)
    with pytest.raises(EncryptionContextError, match="not a TenSEAL context"):
        load_context(b"\x00not a context")


def test_context_parameters_are_checked():
    other = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
    other.global_scale = 2**40
    with pytest.raises(EncryptionContextError, match="coefficient"):
        load_context(other.serialize(save_secret_key=True))


def test_contexts_carry_no_galois_or_relin_keys(secret_ctx):
    public = public_context_bytes(secret_ctx)
    secret = secret_context_bytes(secret_ctx)
    for data in (public, secret):
        ctx = ts.context_from(data)
        assert not ctx.has_galois_keys()
        assert not ctx.has_relin_keys()
    # Parameters only for the coordinator; one secret key (two 64 KiB polynomials) for sites.
    assert len(public) < 1_000
    assert len(secret) < 300_000


# --------------------------------------------------------------------------- precision


def test_weighted_mean_equals_plaintext_fedavg(secret_ctx, site_states, weighted):
    updates, summed = weighted
    mean, total = decrypt_weighted_mean(secret_ctx, summed, updates[0].layout)
    reference = _fedavg(site_states, COUNTS)
    assert set(mean) == set(reference)
    for key, value in mean.items():
        assert value.dtype == np.float32
        assert value.shape == reference[key].shape
    assert _relative_error(mean, reference) <= TOLERANCE
    assert _per_tensor_error(mean, reference) <= TOLERANCE
    assert abs(total - sum(COUNTS)) / sum(COUNTS) <= TOLERANCE


def test_weighted_mean_precision_before_float32_rounding(secret_ctx, public_ctx, site_states):
    """The CKKS error itself, at large and small counts, away from float32 rounding."""
    states64 = [{k: v.astype(np.float64) for k, v in s.items()} for s in site_states]
    for counts in (COUNTS, [100_000, 87_000, 1_500, 42_000]):
        updates = [
            encrypt_weighted_update(secret_ctx, s, c) for s, c in zip(states64, counts, strict=True)
        ]
        summed = add_encrypted(public_ctx, [u.chunks for u in updates])
        mean, total = decrypt_weighted_mean(secret_ctx, summed, updates[0].layout)
        assert _relative_error(mean, _fedavg(states64, counts)) <= TOLERANCE / 10
        assert abs(total - sum(counts)) / sum(counts) <= TOLERANCE / 10


def test_plain_weighted_sum_with_public_weights(secret_ctx, public_ctx, site_states):
    total = sum(COUNTS)
    updates = [
        encrypt_state(secret_ctx, s, c / total) for s, c in zip(site_states, COUNTS, strict=True)
    ]
    summed = add_encrypted(public_ctx, [u.chunks for u in updates])
    result = decrypt_state(secret_ctx, summed, updates[0].layout)
    assert _relative_error(result, _fedavg(site_states, COUNTS)) <= TOLERANCE


def test_sum_of_100_updates_of_magnitude_10(secret_ctx, public_ctx):
    rng = np.random.default_rng(3)
    states = [{"w": rng.uniform(-10, 10, 5000)} for _ in range(100)]
    updates = [encrypt_state(secret_ctx, s, 1.0) for s in states]
    summed = add_encrypted(public_ctx, [u.chunks for u in updates])
    result = decrypt_state(secret_ctx, summed, updates[0].layout)
    assert _relative_error(result, {"w": sum(s["w"] for s in states)}) <= TOLERANCE


def test_capacity_bound_decrypts_without_overflow(secret_ctx, public_ctx):
    update = encrypt_state(secret_ctx, {"w": np.full(10, MAX_ABS_VALUE)}, 1.0)
    summed = add_encrypted(public_ctx, [update.chunks] * MAX_SUMMANDS)
    result = decrypt_state(secret_ctx, summed, update.layout)["w"]
    np.testing.assert_allclose(result, MAX_SUMMANDS * MAX_ABS_VALUE, rtol=1e-9)


def test_values_beyond_the_bound_are_refused_before_encryption(secret_ctx):
    with pytest.raises(ValueError, match="beyond"):
        encrypt_state(secret_ctx, {"w": np.array([1.0, 2 * MAX_ABS_VALUE])}, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        encrypt_state(secret_ctx, {"w": np.array([np.nan])}, 1.0)
    with pytest.raises(ValueError, match="count"):
        encrypt_weighted_update(secret_ctx, {"w": np.ones(2)}, 0)


def test_too_many_summands_are_refused(public_ctx, weighted):
    updates, _ = weighted
    with pytest.raises(EncryptedUpdateError, match="exceed"):
        add_encrypted(public_ctx, [updates[0].chunks] * (MAX_SUMMANDS + 1))


def test_integer_tensors_round_trip(secret_ctx, public_ctx):
    state = {"steps": np.array([3, 5], dtype=np.int64), "w": np.ones((2, 2), np.float32)}
    updates = [encrypt_state(secret_ctx, state, 0.5) for _ in range(2)]
    summed = add_encrypted(public_ctx, [u.chunks for u in updates])
    result = decrypt_state(secret_ctx, summed, updates[0].layout)
    assert result["steps"].dtype == np.int64
    np.testing.assert_array_equal(result["steps"], [3, 5])


# --------------------------------------------------------------------------- layout


def test_layout_packing_and_json_round_trip(site_states, weighted):
    updates, _ = weighted
    layout = updates[0].layout
    n_params = sum(v.size for v in site_states[0].values())
    assert layout.keys == tuple(sorted(site_states[0]))
    assert layout.n_values == n_params + 1  # the count slot
    assert len(updates[0].chunks) == layout.n_chunks == -(-(n_params + 1) // 4096)
    assert all(len(c) == ciphertext_nbytes(SLOTS_PER_CIPHERTEXT) for c in updates[0].chunks[:-1])
    again = StateLayout.from_json(layout.to_json())
    assert again == layout
    assert StateLayout.from_dict(layout.to_dict()) == layout
    # Nothing in the public layout depends on a site's data or count.
    assert layout == updates[1].layout == updates[3].layout


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d.update(version=99),
        lambda d: d.update(keys=list(reversed(d["keys"]))),
        lambda d: d.update(shapes=d["shapes"][:-1]),
        lambda d: d.update(dtypes=["object"] * len(d["dtypes"])),
        lambda d: d.update(count_bound=-1),
        lambda d: d.pop("keys"),
    ],
)
def test_malformed_layouts_are_refused(weighted, mangle):
    data = weighted[0][0].layout.to_dict()
    mangle(data)
    with pytest.raises(ValueError):
        StateLayout.from_dict(data)


def test_state_that_does_not_match_the_layout_is_refused(secret_ctx, site_states, weighted):
    layout = weighted[0][0].layout
    state = dict(site_states[0])
    key = layout.keys[0]
    state[key] = state[key][:-1]
    with pytest.raises(ValueError, match="shape"):
        encrypt_weighted_update(secret_ctx, state, 10, layout=layout)
    state = {k: v for k, v in site_states[0].items() if k != key}
    with pytest.raises(ValueError, match="missing"):
        encrypt_weighted_update(secret_ctx, state, 10, layout=layout)


# --------------------------------------------------------------------------- refusals


def _both_sides_refuse(secret_ctx, public_ctx, chunks, layout, match: str) -> None:
    with pytest.raises(EncryptedUpdateError, match=match):
        check_ciphertexts(public_ctx, chunks, layout)
    with pytest.raises(EncryptedUpdateError, match=match):
        decrypt_weighted_mean(secret_ctx, chunks, layout)


def test_honest_reply_and_aggregate_pass_the_checks(secret_ctx, public_ctx, weighted):
    updates, summed = weighted
    for update in updates:
        check_ciphertexts(public_ctx, update.chunks, update.layout)
    check_ciphertexts(public_ctx, summed, updates[0].layout)
    check_ciphertexts(secret_ctx, summed, updates[0].layout)


def test_wrong_ciphertext_count_is_refused(secret_ctx, public_ctx, weighted):
    updates, summed = weighted
    layout = updates[0].layout
    _both_sides_refuse(secret_ctx, public_ctx, summed[:-1], layout, "ciphertexts")
    _both_sides_refuse(secret_ctx, public_ctx, [*summed, summed[0]], layout, "ciphertexts")
    with pytest.raises(EncryptedUpdateError, match="different numbers"):
        add_encrypted(public_ctx, [updates[0].chunks, updates[1].chunks[:-1]])


def test_wrong_chunk_size_is_refused(secret_ctx, public_ctx, weighted):
    _, summed = weighted
    layout = weighted[0][0].layout
    for bad in (summed[0][:-1], summed[0] + b"\x00", summed[0][: len(summed[0]) // 2]):
        _both_sides_refuse(secret_ctx, public_ctx, [bad, *summed[1:]], layout, "bytes")


def test_garbage_bytes_are_refused(secret_ctx, public_ctx, weighted):
    _, summed = weighted
    layout = weighted[0][0].layout
    garbage = np.random.default_rng(5).bytes(len(summed[0]))
    _both_sides_refuse(secret_ctx, public_ctx, [garbage, *summed[1:]], layout, "ciphertext 0")
    _both_sides_refuse(secret_ctx, public_ctx, [*summed[:-1], "not bytes"], layout, "not bytes")
    with pytest.raises(EncryptedUpdateError, match="deserialize"):
        add_encrypted(public_ctx, [[garbage, *summed[1:]], summed])


def test_ciphertext_for_another_layout_is_refused(secret_ctx, public_ctx, weighted):
    _, summed = weighted
    layout = weighted[0][0].layout
    other = encrypt_weighted_update(secret_ctx, {"w": np.ones(300)}, 5).chunks[0]
    assert len(other) == len(summed[-1])  # same byte size: only the slot count differs
    _both_sides_refuse(secret_ctx, public_ctx, [*summed[:-1], other], layout, "values")


def test_site_refuses_an_aggregate_it_cannot_have_made(secret_ctx, public_ctx, weighted):
    """Flipped bytes or another key pass the coordinator's check; the site must refuse."""
    _, summed = weighted
    layout = weighted[0][0].layout
    flipped = bytearray(summed[0])
    flipped[len(flipped) // 2] ^= 0x01
    check_ciphertexts(public_ctx, [bytes(flipped), *summed[1:]], layout)
    with pytest.raises(EncryptedUpdateError, match="outside the encryptable range"):
        decrypt_weighted_mean(secret_ctx, [bytes(flipped), *summed[1:]], layout)
    with pytest.raises(EncryptedUpdateError, match="outside the encryptable range"):
        decrypt_weighted_mean(make_secret_context(), summed, layout)


def test_decrypt_state_and_weighted_mean_refuse_each_others_layouts(secret_ctx, weighted):
    updates, summed = weighted
    with pytest.raises(ValueError, match="decrypt_weighted_mean"):
        decrypt_state(secret_ctx, summed, updates[0].layout)


# --------------------------------------------------------------------------- release


def test_flood_for_release_stays_within_tolerance_and_keeps_dtypes(secret_ctx, weighted):
    updates, summed = weighted
    mean, _ = decrypt_weighted_mean(secret_ctx, summed, updates[0].layout)
    released = flood_for_release(mean, rng=np.random.default_rng(0))
    assert {k: v.dtype for k, v in released.items()} == {k: v.dtype for k, v in mean.items()}
    assert any(not np.array_equal(released[k], mean[k]) for k in mean)
    assert _relative_error(released, mean) <= 1e-5
