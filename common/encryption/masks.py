"""Pairwise-masked sums: the coordinator reads the total of the sites' vectors, never one.

A site's vector leaves as ``encode(v) + sum of masks mod 2**64``, one mask per other site
of the study's *roster*: sites i < j (by name) share a mask ``m_ij`` that i adds and j
subtracts, so the masks cancel in the sum of every roster site's vector and nowhere else
(Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017, without its dropout recovery). Each masked vector alone is uniform on
``Z_{2**64}^n``: it says nothing about the site. Unlike CKKS with one shared key, no
party can open one site's vector: a site colluding with the coordinator removes its own
masks, and the others' stay on.

Why each piece is the way it is:

- **Pair keys from the sites' X25519 keys** (the pair ``fedsynth keys site-init``
  makes), agreed without the coordinator: HKDF-SHA256 over the X25519 secret, bound to
  the study id and both public keys. The roster (the other sites' public keys) is the
  site's own file (``peer-keys``), checked by fingerprint with each site as a key
  holder's key is: a coordinator that relayed public keys could substitute its own and
  read every vector.
- **Masks from AES-256-CTR** keyed by the pair key, its counter block the first 16 bytes
  of the *request digest*. Flower's SecAgg+ draws its masks from numpy's Mersenne
  Twister seeded with 32 bits folded from the key (flwrlabs/flower#7522, open in flwr
  1.41): a search of 2**32 seeds removes such a mask. Here the mask is a PRF output.
- **The digest binds the mask to the request** (every config value and array the
  coordinator sent). A coordinator that sends two sites different requests in one step
  gets masks that do not cancel, so it cannot add one site's answer to another kind of
  answer to cancel noise; a site never masks two vectors with one mask (it refuses a
  digest it already answered: ``client/measure.py``).
- **No dropout recovery.** SecAgg's recovery lets the coordinator ask the others for a
  silent site's mask shares; a coordinator that lies about who dropped then unmasks a
  live site unless extra consistency rounds are run. Here a step needs every roster
  site, and a missing one makes the step fail (asked again, it is a new release, charged
  again).
- **Fixed point.** Values are rounded to multiples of 2**-16 (post-processing of the
  site's own noisy vector; the noise std is at least 1) and must stay within +-2**30 (a
  billion patients), so sums stay exact in int64, and a sum whose masks did not cancel
  (uniform on +-2**47) shows: each entry lands within the bound with chance 2**-10.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .keys import (
    KeySetupError,
    _check_site_name,
    _ensure_dir,
    _exchange,
    _raw_public,
    _refuse_existing,
    _write_atomic,
    load_private_key,
    load_public_key,
    public_key_fingerprint,
)

FRACTION_BITS = 16
#: Largest absolute value a masked vector may carry (a site refuses to mask more).
MAX_ABS = float(2**30)
_SCALE = float(2**FRACTION_BITS)
_LABEL = b"fedsynth pairwise masks v1"
PEER_KEY_SUFFIX = ".pem"


class MaskError(ValueError):
    """A vector that cannot be masked, or masked sums that do not add up."""


@dataclass(frozen=True)
class Roster:
    """A site's view of the study's sites: its own private key and the others' public
    keys (from its ``peer-keys`` folder, one ``<site>.pem`` per other site)."""

    me: str
    private: X25519PrivateKey
    peers: Mapping[str, X25519PublicKey]

    @property
    def size(self) -> int:
        """Sites whose vectors the masks need: the peers and this one."""
        return len(self.peers) + 1

    def fingerprints(self) -> dict[str, str]:
        return {name: public_key_fingerprint(key) for name, key in sorted(self.peers.items())}


def load_roster(me: str, key_dir: str | os.PathLike[str], peer_dir: str | os.PathLike[str]
                ) -> Roster:
    """This site's roster; refused when the folder is empty, names this site, or holds
    one public key twice (a duplicated key would let one party stand for two sites)."""
    folder = Path(peer_dir)
    if not folder.is_dir():
        raise KeySetupError(f"peer-keys {folder} is not a folder; put the other sites' public "
                            f"keys there as <site>{PEER_KEY_SUFFIX} (fedsynth keys site-init "
                            "wrote each as x25519-public.pem)")
    peers = {_check_site_name(path.stem): load_public_key(path)
             for path in sorted(folder.glob(f"*{PEER_KEY_SUFFIX}"))}
    if not peers:
        raise KeySetupError(f"peer-keys {folder} holds no <site>{PEER_KEY_SUFFIX}: a masked sum "
                            "needs at least one other site")
    roster = Roster(me, load_private_key(key_dir), peers)
    try:
        _check_distinct(roster)
    except KeySetupError as exc:
        raise KeySetupError(f"peer-keys {folder}: {exc}") from None
    return roster


def write_roster(me: str, key_dir: str | os.PathLike[str], peers: Mapping[str, str],
                 out: str | os.PathLike[str], *, force: bool = False) -> Roster:
    """Copy the other sites' public keys into ``out`` as ``<site>.pem`` (the folder a
    site's ``peer-keys`` names), each checked as ``load_roster`` checks them; an
    existing file is kept unless ``force``. Returns the roster read back."""
    folder = Path(out)
    keys = {_check_site_name(name): load_public_key(path) for name, path in peers.items()}
    targets = [folder / f"{name}{PEER_KEY_SUFFIX}" for name in keys]
    _refuse_existing(targets, force)
    staging = Roster(me, load_private_key(key_dir), keys)
    _check_distinct(staging)
    _ensure_dir(folder)
    for name, key in keys.items():
        pem = key.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
        _write_atomic(folder / f"{name}{PEER_KEY_SUFFIX}", pem, force=force)
    return load_roster(me, key_dir, folder)


def _check_distinct(roster: Roster) -> None:
    own = _raw_public(roster.private.public_key())
    seen = {own: roster.me}
    for name, key in sorted(roster.peers.items()):
        raw = _raw_public(key)
        if name == roster.me or raw in seen:
            raise KeySetupError(
                f"{name}'s key is " + ("this site's own key" if raw == own or name == roster.me
                                       else f"the same key as {seen[raw]}'s")
                + "; each other site's public key must appear once")
        seen[raw] = name


def pair_keys(roster: Roster, study_id: str) -> dict[str, bytes]:
    """One 32-byte key per peer, the same at both ends of the pair."""
    mine = _raw_public(roster.private.public_key())
    out = {}
    for name, key in roster.peers.items():
        theirs = _raw_public(key)
        low, high = sorted([(roster.me, mine), (name, theirs)])
        info = b"\x00".join([_LABEL, study_id.encode(), low[0].encode(), low[1],
                             high[0].encode(), high[1]])
        shared = _exchange(roster.private, key, f"of site {name}")
        out[name] = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                         info=info).derive(shared)
    return out


def request_digest(kind: str, config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
                   ) -> bytes:
    """SHA-256 of everything a request asked: its message kind, its config (canonical
    JSON) and arrays. The kind keeps message types apart: a grid query and a marginal
    query with the same config would otherwise share one mask, and the difference of
    the two masked replies would be the site's two vectors' difference, in clear."""
    h = hashlib.sha256(_LABEL)
    h.update(kind.encode() + b"\x00")
    h.update(json.dumps({str(k): v for k, v in config.items()}, sort_keys=True,
                        default=str).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[name], dtype=np.float64))
        h.update(name.encode() + b"\x00" + str(a.shape).encode() + b"\x00" + a.tobytes())
    return h.digest()


def _stream(key: bytes, digest: bytes, n: int) -> np.ndarray:
    encryptor = Cipher(algorithms.AES(key), modes.CTR(digest[:16])).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * n)) + encryptor.finalize(),
                         dtype="<u8").copy()


def encode(values: np.ndarray) -> np.ndarray:
    """Fixed point on Z_{2**64}: round(v * 2**16), two's complement."""
    v = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(v)) or np.any(np.abs(v) > MAX_ABS):
        raise MaskError(f"a masked vector must hold finite values within +-{MAX_ABS:g}")
    return np.rint(v * _SCALE).astype(np.int64).view(np.uint64)


def mask(values: np.ndarray, roster: Roster, keys: Mapping[str, bytes], digest: bytes
         ) -> np.ndarray:
    """``encode(values)`` plus this site's masks for the request ``digest``."""
    out = encode(values)
    for name in sorted(roster.peers):
        m = _stream(keys[name], digest, out.size)
        out = out + m if roster.me < name else out - m  # uint64 wraps: mod 2**64
    return out


def unmask_sum(masked: Sequence[np.ndarray]) -> np.ndarray:
    """The sum of every roster site's masked vector: the masks cancel, the values add.

    Raises ``MaskError`` when the result cannot be a sum of the sites' vectors (a site
    of some roster did not answer, or the sites were asked different things): the
    masks then did not cancel and the total is uniform noise."""
    if not masked:
        raise MaskError("no masked vector to add")
    total = np.zeros_like(np.asarray(masked[0], dtype=np.uint64))
    for v in masked:
        v = np.asarray(v, dtype=np.uint64)
        if v.shape != total.shape:
            raise MaskError("masked vectors of different lengths")
        total = total + v
    values = total.view(np.int64).astype(np.float64) / _SCALE
    if np.any(np.abs(values) > MAX_ABS * len(masked)):
        raise MaskError(
            "the masks did not cancel: every site in the sites' peer-keys rosters must "
            "answer the same request, and no other site may (the sum is noise, unused)")
    return values
