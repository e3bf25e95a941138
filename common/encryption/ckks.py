"""CKKS packing of model updates, so the coordinator can add what it cannot read.

Who holds what
--------------
Every site holds the same *secret* context (the key holder created it and wrapped one
copy per site, see :mod:`fedsynth.common.encryption.keys`). The coordinator holds a
*public* context: the encryption parameters and nothing else. With it, it can parse
ciphertexts and add them, which is all FedAvg needs; it cannot decrypt and, because
the contexts use symmetric encryption (below), it cannot even encrypt.

Flow of one round (the integration into the Flower apps builds on these calls)::

    # coordinator, once per study: the model's public layout, sent in a ConfigRecord
    layout_json = StateLayout.from_state(global_state).to_json()

    # site
    update = encrypt_weighted_update(secret_ctx, new_state, count=n_rows)
    reply_chunks = update.chunks                       # list[bytes], into the reply

    # coordinator
    check_ciphertexts(public_ctx, reply_chunks, layout)   # refuse a malformed reply
    summed = add_encrypted(public_ctx, [chunks_site_a, chunks_site_b, ...])

    # site, next round (or at the end, before release)
    mean_state, total_rows = decrypt_weighted_mean(secret_ctx, summed, layout)

Weights without disclosure
--------------------------
FedAvg weights site *i* by its row count ``n_i``; a count in clear would tell the
coordinator the size of each hospital's cohort, which hospitals often may not disclose.
Each site therefore multiplies its update by ``n_i / B`` *before* encryption and
appends ``n_i / B`` itself as one extra slot, where ``B`` (``count_bound``) is a public
upper bound on a site's row count carried in the layout. The coordinator adds
ciphertexts only, so it learns neither ``n_i`` nor the total; the sites decrypt
``sum(n_i w_i) / B`` and ``sum(n_i) / B`` and divide, and only they learn the total.
The alternative, a public total ``N`` announced by the coordinator, would need the
sites to tell someone their counts first, which is the disclosure being avoided.

Why ``n_i / B`` and not ``n_i``: CKKS is fixed-point arithmetic with one global scale.
With raw counts a slot could hold ``100_000 * 10`` per site and ``1e8`` summed over 100
sites, which forces a scale of at most ``2**32`` and an absolute error near ``1e-6``
on *every* update, including the unweighted ones. Dividing by ``B`` keeps every slot
within the same +-64 as any other update, so one scale serves both.

Parameters (measured by ``tests/test_encryption.py`` and
``research/bench_encryption.py``)
------------------------------------------------------------------------------------
- poly modulus degree 8192 (4096 real slots per ciphertext), as the study design asks.
- coefficient modulus ``[60, 60]``: one 60-bit prime that carries the data plus the
  "special" prime SEAL keeps for key switching. Sums need no rescaling, so one data
  prime is all the depth required; every further prime would grow every ciphertext by
  64 KiB (the data prime alone gives 8x the float32 bytes, two would give 16x). TenSEAL
  refuses a single-prime chain because it always generates relinearisation keys, which
  need the special prime; we then drop those keys. 120 bits in all, far below the 218
  that 128-bit security allows at this degree.
- global scale ``2**45``: a slot carries ``value * 2**45`` in a prime of about
  ``2**60``, so decryption stays correct while ``|sum| < 2**59 / 2**45 = 16384``. We
  bound each encrypted slot to +-64 (:data:`MAX_ABS_VALUE`) and a sum to 128 updates
  (:data:`MAX_SUMMANDS`): ``128 * 64 = 8192``, half the capacity, the other half a
  margin for noise. The noise of a fresh symmetric encryption decodes to about
  ``1e-11`` absolute at this scale, so a sum of 100 updates of magnitude 10 comes back
  within about ``1e-12`` relative error (max-norm). The weighted mean divides by the
  summed count slot, so its error grows as ``B / sum(n_i)``: about ``1e-10`` when the
  counts are near ``B``, about ``3e-8`` for four sites with 98 to 242 rows under
  ``B = 100_000`` (both measured on a 15k-parameter MLP), and ``1e-6`` would only be
  reached below roughly 20 rows in total (weights of magnitude 0.2). A study of small
  sites can pick a smaller ``count_bound``; it only has to bound every site's count.
- symmetric encryption: every site holds the secret key anyway, and a symmetric fresh
  ciphertext carries less noise than a public-key one (no ``u * e`` term, about 8x
  smaller here); it also means the coordinator's context holds no public key (84 bytes
  instead of about 260 KB) and the coordinator cannot encrypt values of its choosing
  under the study's key.
- no Galois keys (rotations are never needed), no relinearisation keys (no products).

Releasing a decrypted aggregate
-------------------------------
CKKS decryption is approximate, and the approximation error is a function of the secret
key. Li and Micciancio (Eurocrypt 2021) showed that whoever holds a ciphertext *and*
its exact decrypted values can solve for the secret key. The coordinator holds every
aggregate ciphertext, so handing it the decrypted final generator unchanged would let
it recover the study key and read every site's past updates. Before a decrypted
aggregate leaves the sites, pass it through :func:`flood_for_release`, which adds
Gaussian noise far above the CKKS error (but far below anything that changes the
model) and casts back to each tensor's dtype. Inside a site, between rounds, the exact decryption is
used and never leaves the site in clear.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import tenseal as ts

# Importing the SEAL bindings registers the C++ types (``seal::Modulus``...) that the
# parameter checks read; without it TenSEAL cannot convert them to Python.
from tenseal import sealapi

from ..errors import FedsynthError

POLY_MODULUS_DEGREE = 8192
SLOTS_PER_CIPHERTEXT = POLY_MODULUS_DEGREE // 2
COEFF_MOD_BIT_SIZES: tuple[int, ...] = (60, 60)
SCALE_BITS = 45
GLOBAL_SCALE = float(2**SCALE_BITS)
MAX_SUMMANDS = 128
MAX_ABS_VALUE = 64.0
DEFAULT_COUNT_BOUND = 100_000.0
LAYOUT_VERSION = 1

# Slot values whose sum is this close to zero mean "no rows" rather than a count.
_MIN_COUNT_FRACTION = 1e-9
# An honest sum stays within MAX_SUMMANDS * MAX_ABS_VALUE plus CKKS noise (~1e-10); a
# ciphertext under another key or a garbled one decodes to values far beyond this.
_DECRYPT_LIMIT = MAX_SUMMANDS * MAX_ABS_VALUE * 1.001


class EncryptionContextError(FedsynthError, ValueError):
    """A serialized context that is not a fedsynth CKKS context, or the wrong kind of one."""


class EncryptedUpdateError(FedsynthError, ValueError):
    """Ciphertexts that do not belong to the expected model: refuse the reply or aggregate."""


@dataclass(frozen=True)
class StateLayout:
    """Where every tensor of a flat state dict sits in the encrypted slot vector.

    The layout is public (it says nothing about any site's data) and travels from the
    coordinator to the sites, so both sides agree on the slot order without sending a
    single weight. Keys are sorted so that two processes that built the same model get
    the same order regardless of dict insertion order.
    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    count_bound: float | None = None

    def __post_init__(self) -> None:
        if not (len(self.keys) == len(self.shapes) == len(self.dtypes)):
            raise ValueError("layout keys, shapes and dtypes must have the same length")
        if not all(isinstance(key, str) for key in self.keys):
            raise ValueError("layout keys must be strings")
        if list(self.keys) != sorted(set(self.keys)):
            raise ValueError("layout keys must be unique and sorted")
        for key, shape, dtype in zip(self.keys, self.shapes, self.dtypes, strict=True):
            if not isinstance(shape, tuple) or any(
                not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape
            ):
                raise ValueError(f"layout shape of {key!r} is not a tuple of sizes: {shape!r}")
            if not isinstance(dtype, str) or _dtype_kind(dtype) not in "fiu":
                raise ValueError(f"layout dtype of {key!r} is not numeric: {dtype!r}")
        if self.count_bound is not None and not (
            math.isfinite(self.count_bound) and self.count_bound > 0
        ):
            raise ValueError(f"count_bound must be a positive number, not {self.count_bound!r}")
        if self.n_values == 0:
            raise ValueError("layout of an empty state: there is nothing to encrypt")

    @classmethod
    def from_state(
        cls, state: Mapping[str, Any], *, count_bound: float | None = None
    ) -> StateLayout:
        """The layout of ``state``; ``count_bound`` adds the count slot of the weighted mean."""
        keys = tuple(sorted(state))
        arrays = [np.asarray(state[k]) for k in keys]
        for key, arr in zip(keys, arrays, strict=True):
            if arr.dtype.kind not in "fiu":
                raise ValueError(
                    f"state entry {key!r} has dtype {arr.dtype}; only numeric tensors can be "
                    "encrypted"
                )
        return cls(
            keys=keys,
            shapes=tuple(tuple(int(d) for d in a.shape) for a in arrays),
            dtypes=tuple(a.dtype.name for a in arrays),
            count_bound=None if count_bound is None else float(count_bound),
        )

    @property
    def n_params(self) -> int:
        """Number of model values (without the count slot)."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def has_count_slot(self) -> bool:
        return self.count_bound is not None

    @property
    def n_values(self) -> int:
        """Number of encrypted slots, the count slot included."""
        return self.n_params + (1 if self.has_count_slot else 0)

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_values / SLOTS_PER_CIPHERTEXT)

    def chunk_lengths(self) -> list[int]:
        """Slots used in each ciphertext: all full but the last."""
        full, rest = divmod(self.n_values, SLOTS_PER_CIPHERTEXT)
        return [SLOTS_PER_CIPHERTEXT] * full + ([rest] if rest else [])

    def flatten(self, state: Mapping[str, Any]) -> np.ndarray:
        """``state`` as one float64 vector in layout order, after checking it matches."""
        missing = [k for k in self.keys if k not in state]
        extra = [k for k in state if k not in set(self.keys)]
        if missing or extra:
            raise ValueError(
                "state does not match the layout: "
                + "; ".join(
                    part
                    for part in (
                        f"missing {missing[:5]}" if missing else "",
                        f"unexpected {extra[:5]}" if extra else "",
                    )
                    if part
                )
            )
        parts = []
        for key, shape in zip(self.keys, self.shapes, strict=True):
            arr = np.asarray(state[key])
            if tuple(arr.shape) != shape:
                raise ValueError(
                    f"state entry {key!r} has shape {tuple(arr.shape)}, the layout says {shape}"
                )
            if arr.dtype.kind not in "fiu":
                raise ValueError(f"state entry {key!r} has non-numeric dtype {arr.dtype}")
            parts.append(arr.astype(np.float64, copy=False).ravel())
        flat = np.concatenate(parts) if parts else np.zeros(0)
        if not np.all(np.isfinite(flat)):
            bad = next(k for k in self.keys if not np.all(np.isfinite(np.asarray(state[k]))))
            raise ValueError(f"state entry {bad!r} holds NaN or infinite values")
        return flat

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Inverse of :meth:`flatten`, restoring each tensor's dtype (integers rounded)."""
        if flat.shape != (self.n_params,):
            raise ValueError(f"expected {self.n_params} values, got {flat.shape}")
        out: dict[str, np.ndarray] = {}
        offset = 0
        for key, shape, dtype in zip(self.keys, self.shapes, self.dtypes, strict=True):
            size = math.prod(shape)
            values = flat[offset : offset + size].reshape(shape)
            offset += size
            target = np.dtype(dtype)
            if target.kind in "iu":
                values = np.rint(values)
            out[key] = values.astype(target)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (lists, strings, numbers)."""
        return {
            "version": LAYOUT_VERSION,
            "keys": list(self.keys),
            "shapes": [list(s) for s in self.shapes],
            "dtypes": list(self.dtypes),
            "count_bound": self.count_bound,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StateLayout:
        """Rebuild a layout received from another party, refusing anything malformed."""
        if not isinstance(data, Mapping):
            raise ValueError("layout must be a mapping")
        if data.get("version") != LAYOUT_VERSION:
            raise ValueError(f"layout version {data.get('version')!r} is not {LAYOUT_VERSION}")
        try:
            keys = tuple(data["keys"])
            shapes = tuple(tuple(s) for s in data["shapes"])
            dtypes = tuple(data["dtypes"])
            bound = data.get("count_bound")
        except (KeyError, TypeError) as exc:
            raise ValueError(f"layout is missing or mangles a field: {exc}") from None
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int | float)):
            raise ValueError(f"layout count_bound {bound!r} is not a number")
        return cls(
            keys=keys,
            shapes=shapes,
            dtypes=dtypes,
            count_bound=None if bound is None else float(bound),
        )

    def to_json(self) -> str:
        """The layout as one string, the form a Flower ConfigRecord can carry."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> StateLayout:
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"layout is not valid JSON: {exc}") from None
        return cls.from_dict(data)


@dataclass(frozen=True)
class EncryptedUpdate:
    """One site's encrypted contribution: the ciphertexts and the public layout they follow."""

    chunks: list[bytes]
    layout: StateLayout

    @property
    def nbytes(self) -> int:
        """Bytes on the wire for the ciphertexts (what the reply grows by)."""
        return sum(len(c) for c in self.chunks)


def _dtype_kind(name: str) -> str:
    try:
        return np.dtype(name).kind
    except TypeError:
        return ""


# --------------------------------------------------------------------------- contexts


def make_secret_context() -> ts.Context:
    """A fresh CKKS context with a new secret key: run once per study, by the key holder."""
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        POLY_MODULUS_DEGREE,
        coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    ctx.global_scale = GLOBAL_SCALE
    # TenSEAL always generates relinearisation keys; a round trip without them drops them,
    # so no copy of the context (wrapped or in memory) carries keys sums never use.
    return ts.context_from(secret_context_bytes(ctx))


def secret_context_bytes(ctx: ts.Context) -> bytes:
    """The full context *with* the secret key. Only ever to be wrapped, never stored bare."""
    if not ctx.is_private():
        raise EncryptionContextError("this context holds no secret key to serialize")
    return ctx.serialize(
        save_public_key=False,
        save_secret_key=True,
        save_galois_keys=False,
        save_relin_keys=False,
    )


def public_context_bytes(ctx: ts.Context) -> bytes:
    """The context the coordinator gets: parameters and scale, no key of any kind."""
    data = ctx.serialize(
        save_public_key=False,
        save_secret_key=False,
        save_galois_keys=False,
        save_relin_keys=False,
    )
    if ts.context_from(data).is_private():  # defence in depth: never hand out a secret
        raise EncryptionContextError("serialized public context unexpectedly holds a secret")
    return data


def load_context(data: bytes, *, require_secret: bool | None = None) -> ts.Context:
    """Parse a serialized context and check it is this module's CKKS setup.

    ``require_secret=True`` is what a site wants (it must be able to decrypt),
    ``False`` what the coordinator wants (it must *not* hold the key); ``None`` accepts
    either. Parameters are checked because a site and a coordinator on different
    parameters would exchange ciphertexts that fail in confusing ways much later.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EncryptionContextError(f"a context is bytes, not {type(data).__name__}")
    try:
        ctx = ts.context_from(bytes(data))
    except Exception as exc:  # TenSEAL raises ValueError/RuntimeError for bad streams
        raise EncryptionContextError(f"not a TenSEAL context ({exc})") from None
    _check_parameters(ctx)
    if require_secret is True and not ctx.is_private():
        raise EncryptionContextError(
            "this is a public context (no secret key); a site needs its unwrapped secret context"
        )
    if require_secret is False and ctx.is_private():
        raise EncryptionContextError(
            "this context holds the secret key; the coordinator must only get the public one"
        )
    return ctx


def _check_parameters(ctx: ts.Context) -> None:
    seal = ctx.seal_context().data
    key_parms = seal.key_context_data().parms()
    bits = tuple(m.bit_count() for m in key_parms.coeff_modulus())
    if key_parms.scheme().name != sealapi.SCHEME_TYPE.CKKS.name:
        raise EncryptionContextError("context is not a CKKS context")
    if key_parms.poly_modulus_degree() != POLY_MODULUS_DEGREE or bits != COEFF_MOD_BIT_SIZES:
        raise EncryptionContextError(
            f"context has poly modulus {key_parms.poly_modulus_degree()} and coefficient "
            f"chain {list(bits)}; fedsynth uses {POLY_MODULUS_DEGREE} and "
            f"{list(COEFF_MOD_BIT_SIZES)}"
        )
    try:
        scale = ctx.global_scale
    except ValueError:
        raise EncryptionContextError("context has no global scale") from None
    if scale != GLOBAL_SCALE:
        raise EncryptionContextError(f"context scale is {scale}, fedsynth uses 2**{SCALE_BITS}")
    if ctx.has_galois_keys():
        raise EncryptionContextError("context carries Galois keys, which fedsynth never uses")


# --------------------------------------------------------------------------- encryption


def encrypt_state(
    ctx: ts.Context,
    state: Mapping[str, Any],
    weight: float,
    *,
    layout: StateLayout | None = None,
) -> EncryptedUpdate:
    """Encrypt ``weight * state`` for a plain sum at the coordinator.

    The weight is applied here, before encryption, so that the coordinator's only
    operation is addition. Pass ``layout`` (the one the coordinator published) to make
    a mismatch between the local model and the study's model fail here, at the site,
    rather than as a refused reply.
    """
    if layout is None:
        layout = StateLayout.from_state(state)
    elif layout.has_count_slot:
        raise ValueError("this layout has a count slot; use encrypt_weighted_update")
    if not math.isfinite(weight):
        raise ValueError(f"weight must be a finite number, not {weight!r}")
    values = layout.flatten(state) * float(weight)
    return EncryptedUpdate(_encrypt_flat(ctx, values), layout)


def encrypt_weighted_update(
    ctx: ts.Context,
    state: Mapping[str, Any],
    count: float,
    *,
    count_bound: float = DEFAULT_COUNT_BOUND,
    layout: StateLayout | None = None,
) -> EncryptedUpdate:
    """Encrypt ``(count / B) * state`` and ``count / B`` for a weighted mean.

    ``count`` is the site's FedAvg weight (its row count, possibly DP-noised, so a float
    is accepted). ``B`` is ``layout.count_bound`` when a layout is given, else
    ``count_bound``; it must be the same at every site, which is why it lives in the
    public layout. See the module docstring for why the count is divided by ``B``.
    """
    if layout is None:
        layout = StateLayout.from_state(state, count_bound=count_bound)
    if layout.count_bound is None:
        raise ValueError("this layout has no count slot; build it with a count_bound")
    if not (math.isfinite(count) and count > 0):
        raise ValueError(f"count must be a positive number, not {count!r}")
    factor = float(count) / layout.count_bound
    values = np.append(layout.flatten(state) * factor, factor)
    return EncryptedUpdate(_encrypt_flat(ctx, values), layout)


def _encrypt_flat(ctx: ts.Context, values: np.ndarray) -> list[bytes]:
    if not ctx.is_private():
        raise EncryptionContextError(
            "encryption needs the site's secret context (fedsynth encrypts symmetrically)"
        )
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if peak > MAX_ABS_VALUE:
        raise ValueError(
            f"an encrypted value would be {peak:.4g}, beyond the +-{MAX_ABS_VALUE:g} that "
            f"{MAX_SUMMANDS} updates can be summed with at scale 2**{SCALE_BITS}; "
            "a weight that large usually means training diverged (or, for the weighted "
            "mean, that count_bound is below the site's row count)"
        )
    return [
        ts.ckks_vector(ctx, values[start : start + SLOTS_PER_CIPHERTEXT]).serialize()
        for start in range(0, values.size, SLOTS_PER_CIPHERTEXT)
    ]


# --------------------------------------------------------------------------- coordinator


def add_encrypted(public_ctx: ts.Context, updates: Sequence[Sequence[bytes]]) -> list[bytes]:
    """Sum the sites' ciphertexts chunk by chunk; the only operation the coordinator runs.

    Works with a context that holds no key at all. Replies should have passed
    :func:`check_ciphertexts` first; this still refuses mismatched chunk counts, because
    adding the wrong chunks together would silently corrupt the global model.
    """
    if not updates:
        raise EncryptedUpdateError("no encrypted updates to add")
    if len(updates) > MAX_SUMMANDS:
        raise EncryptedUpdateError(
            f"{len(updates)} updates exceed the {MAX_SUMMANDS} the CKKS parameters can sum "
            "without overflow"
        )
    n_chunks = len(updates[0])
    if any(len(u) != n_chunks for u in updates):
        counts = sorted({len(u) for u in updates})
        raise EncryptedUpdateError(f"updates have different numbers of ciphertexts: {counts}")
    summed: list[bytes] = []
    for index in range(n_chunks):
        total = _load_vector(public_ctx, updates[0][index], index)
        for update in updates[1:]:
            vector = _load_vector(public_ctx, update[index], index)
            if vector.size() != total.size():
                raise EncryptedUpdateError(
                    f"ciphertext {index} holds {vector.size()} values in one update and "
                    f"{total.size()} in another"
                )
            total.add_(vector)
        summed.append(total.serialize())
    return summed


def check_ciphertexts(public_ctx: ts.Context, chunks: Sequence[bytes], layout: StateLayout) -> None:
    """Refuse a reply whose ciphertexts cannot be this model's encrypted update.

    Checks, without any key: the number of ciphertexts, the exact byte size of each
    (what an honest encryption of that many slots serializes to), and that each parses
    as one ciphertext of two polynomials at this study's parameters and scale, holding
    the expected number of slots. A malformed reply that slipped through would make
    the aggregate undecryptable for everyone, so it is cheaper to drop it here.
    """
    lengths = layout.chunk_lengths()
    if not isinstance(chunks, Sequence) or isinstance(chunks, bytes | str):
        raise EncryptedUpdateError("ciphertexts must be a list of bytes")
    if len(chunks) != len(lengths):
        raise EncryptedUpdateError(
            f"reply has {len(chunks)} ciphertexts; the model's layout needs {len(lengths)}"
        )
    for index, (chunk, n_slots) in enumerate(zip(chunks, lengths, strict=True)):
        if not isinstance(chunk, bytes | bytearray):
            raise EncryptedUpdateError(f"ciphertext {index} is {type(chunk).__name__}, not bytes")
        expected = ciphertext_nbytes(n_slots)
        if len(chunk) != expected:
            raise EncryptedUpdateError(
                f"ciphertext {index} is {len(chunk)} bytes; {n_slots} slots at these "
                f"parameters serialize to {expected}"
            )
        vector = _load_vector(public_ctx, chunk, index)
        if vector.size() != n_slots:
            raise EncryptedUpdateError(
                f"ciphertext {index} holds {vector.size()} values; the layout needs {n_slots}"
            )
        _check_vector_structure(public_ctx, vector, index)


@lru_cache(maxsize=8)
def ciphertext_nbytes(n_slots: int) -> int:
    """Serialized size of one honest ciphertext holding ``n_slots`` values.

    Measured on a throwaway context rather than derived from SEAL's and TenSEAL's
    formats, so it stays right if a library update changes a header. The size depends
    only on the public parameters and the slot count (a ciphertext is uniformly random
    and does not compress), never on the key, so any context with the study's
    parameters gives the study's size.
    """
    if not 1 <= n_slots <= SLOTS_PER_CIPHERTEXT:
        raise ValueError(f"a ciphertext holds 1 to {SLOTS_PER_CIPHERTEXT} values, not {n_slots}")
    return len(ts.ckks_vector(_scratch_context(), np.zeros(n_slots)).serialize())


@lru_cache(maxsize=1)
def _scratch_context() -> ts.Context:
    return make_secret_context()


def _load_vector(ctx: ts.Context, chunk: bytes, index: int) -> ts.CKKSVector:
    if not isinstance(chunk, bytes | bytearray):
        raise EncryptedUpdateError(f"ciphertext {index} is {type(chunk).__name__}, not bytes")
    try:
        vector = ts.ckks_vector_from(ctx, bytes(chunk))
    except Exception as exc:  # TenSEAL/SEAL raise ValueError or RuntimeError on bad input
        raise EncryptedUpdateError(f"ciphertext {index} does not deserialize ({exc})") from None
    _check_vector_structure(ctx, vector, index)
    return vector


def _check_vector_structure(ctx: ts.Context, vector: ts.CKKSVector, index: int) -> None:
    ciphertexts = vector.ciphertext()
    if len(ciphertexts) != 1:
        raise EncryptedUpdateError(
            f"ciphertext {index} packs {len(ciphertexts)} ciphertexts; fedsynth sends one each"
        )
    ct = ciphertexts[0]
    seal = ctx.seal_context().data
    if ct.size() != 2 or ct.parms_id() != seal.first_parms_id():
        raise EncryptedUpdateError(
            f"ciphertext {index} is not a fresh or summed ciphertext at this study's parameters"
        )
    if ct.scale != GLOBAL_SCALE:
        raise EncryptedUpdateError(
            f"ciphertext {index} is at scale {ct.scale:g}, not this study's 2**{SCALE_BITS}"
        )


# --------------------------------------------------------------------------- decryption


def decrypt_state(
    secret_ctx: ts.Context, chunks: Sequence[bytes], layout: StateLayout
) -> dict[str, np.ndarray]:
    """Decrypt a sum of :func:`encrypt_state` updates back into a state dict.

    Raises :class:`EncryptedUpdateError` when the aggregate cannot be this model's:
    a site must not load a model of the wrong shape or a garbled one.
    """
    if layout.has_count_slot:
        raise ValueError("this layout carries a count slot; use decrypt_weighted_mean")
    return layout.unflatten(_decrypt_flat(secret_ctx, chunks, layout))


def decrypt_weighted_mean(
    secret_ctx: ts.Context, summed_chunks: Sequence[bytes], layout: StateLayout
) -> tuple[dict[str, np.ndarray], float]:
    """Decrypt a sum of :func:`encrypt_weighted_update` updates into the weighted mean.

    Returns the mean state and the total count ``sum(n_i)`` (a float: CKKS is
    approximate and counts may be DP-noised; round it if yours are integers). Only
    sites can call this, so only sites learn the total.
    """
    if layout.count_bound is None:
        raise ValueError("this layout has no count slot; use decrypt_state")
    flat = _decrypt_flat(secret_ctx, summed_chunks, layout)
    count_fraction = float(flat[-1])
    if not count_fraction > _MIN_COUNT_FRACTION:
        raise EncryptedUpdateError(
            f"the aggregate's count slot decrypts to {count_fraction:.3g}, not a positive "
            "total; the aggregate is not a sum of weighted updates"
        )
    mean = flat[:-1] / count_fraction
    return layout.unflatten(mean), count_fraction * layout.count_bound


def _decrypt_flat(
    secret_ctx: ts.Context, chunks: Sequence[bytes], layout: StateLayout
) -> np.ndarray:
    if not secret_ctx.is_private():
        raise EncryptionContextError("decryption needs the secret context; this one is public")
    lengths = layout.chunk_lengths()
    if isinstance(chunks, bytes | str) or len(chunks) != len(lengths):
        got = "one bytes object" if isinstance(chunks, bytes | str) else str(len(chunks))
        raise EncryptedUpdateError(
            f"aggregate has {got} ciphertexts; the model's layout needs {len(lengths)}"
        )
    parts = []
    for index, (chunk, n_slots) in enumerate(zip(chunks, lengths, strict=True)):
        if isinstance(chunk, bytes | bytearray) and len(chunk) != ciphertext_nbytes(n_slots):
            raise EncryptedUpdateError(
                f"ciphertext {index} is {len(chunk)} bytes; {n_slots} slots at these "
                f"parameters serialize to {ciphertext_nbytes(n_slots)}"
            )
        vector = _load_vector(secret_ctx, chunk, index)
        try:
            values = np.asarray(vector.decrypt(), dtype=np.float64)
        except Exception as exc:
            raise EncryptedUpdateError(f"ciphertext {index} does not decrypt ({exc})") from None
        if values.shape != (n_slots,):
            raise EncryptedUpdateError(
                f"ciphertext {index} decrypts to {values.size} values; the layout needs {n_slots}"
            )
        parts.append(values)
    flat = np.concatenate(parts)
    if not np.all(np.isfinite(flat)) or float(np.max(np.abs(flat))) > _DECRYPT_LIMIT:
        raise EncryptedUpdateError(
            "aggregate decrypts to values outside the encryptable range: it was not produced "
            "under this study's key, or more updates were added than the parameters allow"
        )
    return flat


def flood_for_release(
    state: Mapping[str, Any],
    *,
    relative_std: float = 2.0**-20,
    floor: float = 0.0,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """A copy of a decrypted aggregate that is safe to hand to the coordinator.

    Adds Gaussian noise of standard deviation ``relative_std`` times the state's largest
    absolute value to every float tensor, then casts back to the tensor's dtype
    (integer tensors are copied unchanged). With the default ``2**-20`` (about ``1e-6``)
    the noise is hundreds to tens of thousands of times the CKKS decryption error
    (depending on how far the total count is below the layout's ``count_bound``),
    which turns the exact-error equations of the Li-Micciancio key recovery into a
    noisier lattice problem, while it stays at the level of float32 rounding and many
    orders below the DP noise already in the weights. See the module docstring.

    ``floor`` sets the smallest peak the noise is scaled by. A decryption a coordinator
    can ask for more than once needs it: with the noise relative to the peak alone, it
    subtracts the first answer from the ciphertext (no key needed), asks again, and the
    residual's peak, hence its flooding, is at the CKKS error itself (the twelfth
    session's audit recovered the exact decryption in three requests). A count vector
    floors at its layout's ``count-bound``.
    """
    if not (math.isfinite(relative_std) and relative_std > 0):
        raise ValueError(f"relative_std must be a positive number, not {relative_std!r}")
    rng = rng if rng is not None else np.random.default_rng()
    arrays = {k: np.asarray(v) for k, v in state.items()}
    peak = max((float(np.max(np.abs(a))) for a in arrays.values() if a.size), default=0.0)
    sigma = relative_std * max(peak, floor, 1e-12)
    out: dict[str, np.ndarray] = {}
    for key, arr in arrays.items():
        if arr.dtype.kind == "f":
            noisy = arr.astype(np.float64) + rng.normal(0.0, sigma, size=arr.shape)
            out[key] = noisy.astype(arr.dtype)
        else:
            out[key] = arr.copy()
    return out
