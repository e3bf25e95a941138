"""Study key setup: one CKKS secret shared by the sites, never by the coordinator.

The sites of a study must all hold the same CKKS secret key (each decrypts the
aggregate), and the coordinator, who relays every message, must not. The setup:

1. Every site runs ``fedsynth keys site-init``: an X25519 key pair in its own folder.
   The private key never leaves the site; the public key goes to the key holder, and
   its fingerprint is read out over a second channel (phone, signed e-mail) so that a
   coordinator relaying public keys cannot substitute its own.
2. The key holder (one of the sites, chosen for the study) runs ``fedsynth keys
   study-init``: it creates the CKKS secret context and, for each site, wraps it with
   AES-256-GCM under a key derived from an X25519 agreement between the holder's
   private key and that site's public key (HKDF-SHA256, with the study id, both public
   keys and a random salt in the derivation; the study id and the blob's header as
   associated data). It writes the coordinator's folder: the public context (no key of
   any kind), the holder's public key, a manifest, and the wrapped blobs, which the
   coordinator relays but cannot open. The bare secret context is never written to
   disk, and in particular never to the coordinator's folder.
3. Each site runs ``fedsynth keys unwrap-check`` with its private key, the holder's
   public key and its blob; at study time the ClientApp calls
   :func:`unwrap_secret_context` the same way and keeps the context in memory.

Files at rest are created with owner-only permissions (0o600, folders 0o700), written
to a temporary file and renamed into place, so a crash never leaves half a key; an
existing key file is never replaced unless ``force`` is given, because overwriting a
site's private key would silently lock it out of the study.

Wrapped blob format (version 1)::

    b"FSYNWRAP" | header length (uint32, big-endian) | header (JSON, UTF-8)
               | HKDF salt (32 bytes) | AES-GCM nonce (12 bytes) | ciphertext + tag

The header (study id, site name, both key fingerprints) is readable so that a wrong
file gives a useful message before any cryptography runs; it is also authenticated,
so editing it breaks the tag.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import tenseal as ts
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import FedsynthError
from ..secret_files import ensure_dir, write_private
from .ckks import (
    COEFF_MOD_BIT_SIZES,
    POLY_MODULUS_DEGREE,
    SCALE_BITS,
    EncryptionContextError,
    add_encrypted,
    decrypt_state,
    encrypt_state,
    load_context,
    make_secret_context,
    public_context_bytes,
    secret_context_bytes,
)

PRIVATE_KEY_FILE = "x25519-private.pem"
PUBLIC_KEY_FILE = "x25519-public.pem"
PUBLIC_CONTEXT_FILE = "ckks-public-context.bin"
HOLDER_PUBLIC_KEY_FILE = "key-holder-x25519-public.pem"
MANIFEST_FILE = "study-keys.json"
WRAPPED_SUFFIX = ".ckks-context.wrapped"
WRAPPED_DIRNAME = "wrapped"


_MAGIC = b"FSYNWRAP"
_FORMAT = 1
_CIPHER = "X25519+HKDF-SHA256+AES-256-GCM"
_SALT_BYTES = 32
_NONCE_BYTES = 12
_MAX_HEADER_BYTES = 16_384
_HKDF_LABEL = b"fedsynth ckks secret-context wrap v1"
_AAD_LABEL = b"fedsynth study:"

_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_STUDY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class KeySetupError(FedsynthError):
    """A key file problem, stated with the file and what to do about it."""


@dataclass(frozen=True)
class SiteKeyPair:
    """Where a site's X25519 key pair was written, and the fingerprint to read out."""

    private_key_path: Path
    public_key_path: Path
    fingerprint: str


@dataclass(frozen=True)
class StudyKeys:
    """What ``create_study_keys`` wrote: the coordinator's files and one blob per site."""

    study_id: str
    public_context_path: Path
    holder_public_key_path: Path
    manifest_path: Path
    holder_fingerprint: str
    wrapped: dict[str, Path] = field(default_factory=dict)
    site_fingerprints: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- validation


def _check_site_name(name: str) -> str:
    if not isinstance(name, str) or not _SITE_NAME.fullmatch(name):
        raise KeySetupError(
            f"site name {name!r} is not usable: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _check_study_id(study_id: str) -> str:
    if not isinstance(study_id, str) or not _STUDY_ID.fullmatch(study_id):
        raise KeySetupError(
            f"study id {study_id!r} is not usable: use 1 to 128 letters, digits, '.', '_', "
            "':' or '-', starting with a letter or digit"
        )
    return study_id


# --------------------------------------------------------------------------- files


def _ensure_dir(path: Path) -> None:
    ensure_dir(path, KeySetupError)


def _write_atomic(path: Path, data: bytes, *, force: bool) -> None:
    write_private(
        path, data, force=force, error=KeySetupError,
        hint="key material (move it away, or pass --force / force=True)",
    )


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    if force:
        return
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise KeySetupError(
            f"{existing[0]} already exists; refusing to overwrite key material "
            "(move it away, or pass --force / force=True if you really mean to replace it)"
        )


def _read(path: Path, what: str, remedy: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeySetupError(f"{what} {path} not found; {remedy}") from None
    except IsADirectoryError:
        raise KeySetupError(f"{what} {path} is a folder, not a file; {remedy}") from None
    except OSError as exc:
        raise KeySetupError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _resolve_key_path(path: str | os.PathLike[str], default_name: str) -> Path:
    """Accept either the key file or the folder ``site-init`` wrote it into."""
    candidate = Path(path)
    return candidate / default_name if candidate.is_dir() else candidate


# --------------------------------------------------------------------------- keys


def public_key_fingerprint(key: X25519PublicKey | str | os.PathLike[str]) -> str:
    """SHA-256 of the raw public key, in groups of four hex digits to read aloud."""
    if not isinstance(key, X25519PublicKey):
        key = load_public_key(key)
    digest = hashlib.sha256(_raw_public(key)).hexdigest()
    return "SHA256:" + " ".join(digest[i : i + 4] for i in range(0, len(digest), 4))


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_private_key(path: str | os.PathLike[str]) -> X25519PrivateKey:
    """A site's private key, refused if other users can read it (as ssh does)."""
    path = _resolve_key_path(path, PRIVATE_KEY_FILE)
    data = _read(path, "private key", "run `fedsynth keys site-init` for this site first")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise KeySetupError(
            f"private key {path} can be read by other users; run `chmod 600 {path}` "
            "and check who may have copied it"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeySetupError(
            f"{path} is not a readable private key; give the {PRIVATE_KEY_FILE} that "
            "`fedsynth keys site-init` wrote"
        ) from None
    if not isinstance(key, X25519PrivateKey):
        raise KeySetupError(f"{path} is not an X25519 private key made by `fedsynth keys`")
    return key


def load_public_key(path: str | os.PathLike[str]) -> X25519PublicKey:
    """A public key file (or the folder holding ``x25519-public.pem``)."""
    path = _resolve_key_path(path, PUBLIC_KEY_FILE)
    data = _read(path, "public key", "ask its owner for the file `fedsynth keys site-init` wrote")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise KeySetupError(
            f"{path} is not a readable public key; ask its owner for their {PUBLIC_KEY_FILE}"
        ) from None
    if not isinstance(key, X25519PublicKey):
        raise KeySetupError(f"{path} is not an X25519 public key made by `fedsynth keys`")
    return key


def generate_site_keypair(site_dir: str | os.PathLike[str], *, force: bool = False) -> SiteKeyPair:
    """Create a site's X25519 key pair in ``site_dir`` (owner-only files)."""
    folder = Path(site_dir)
    private_path, public_path = folder / PRIVATE_KEY_FILE, folder / PUBLIC_KEY_FILE
    _refuse_existing([private_path, public_path], force)
    key = X25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # Private first: if the public write then fails, rerunning with force repairs it,
    # whereas a public key without its private key would be sent out and be useless.
    _write_atomic(private_path, private_pem, force=force)
    _write_atomic(public_path, public_pem, force=force)
    return SiteKeyPair(private_path, public_path, public_key_fingerprint(key.public_key()))


# --------------------------------------------------------------------------- wrapping


def _derive_key(
    shared: bytes, salt: bytes, study_id: str, holder: X25519PublicKey, site: X25519PublicKey
) -> bytes:
    info = _HKDF_LABEL + b"\x00" + study_id.encode() + b"\x00" + _raw_public(holder)
    info += _raw_public(site)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(shared)


def _aad(study_id: str, prefix: bytes) -> bytes:
    return _AAD_LABEL + study_id.encode() + b"\x00" + prefix


def _exchange(private: X25519PrivateKey, public: X25519PublicKey, where: object) -> bytes:
    try:
        return private.exchange(public)
    except ValueError:  # a low-order public key gives an all-zero secret
        raise KeySetupError(
            f"key agreement with the public key {where} failed: it is not a valid X25519 key"
        ) from None


def wrap_secret_context(
    study_id: str,
    site: str,
    secret_context: bytes,
    holder_private_key: X25519PrivateKey,
    site_public_key: X25519PublicKey,
) -> bytes:
    """Encrypt the serialized secret context for one site (see the module docstring)."""
    _check_study_id(study_id)
    _check_site_name(site)
    holder_public = holder_private_key.public_key()
    header = json.dumps(
        {
            "format": _FORMAT,
            "cipher": _CIPHER,
            "study_id": study_id,
            "site": site,
            "site_fingerprint": public_key_fingerprint(site_public_key),
            "holder_fingerprint": public_key_fingerprint(holder_public),
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    prefix = _MAGIC + struct.pack(">I", len(header)) + header
    salt, nonce = secrets.token_bytes(_SALT_BYTES), secrets.token_bytes(_NONCE_BYTES)
    shared = _exchange(holder_private_key, site_public_key, site)
    key = _derive_key(shared, salt, study_id, holder_public, site_public_key)
    sealed = AESGCM(key).encrypt(nonce, secret_context, _aad(study_id, prefix))
    return prefix + salt + nonce + sealed


def _parse_blob(blob: bytes, path: Path) -> tuple[dict[str, object], bytes, bytes]:
    not_ours = (
        f"{path} is not a fedsynth wrapped context (or is truncated); ask the key holder "
        "for your site's file from `fedsynth keys study-init`"
    )
    if len(blob) < len(_MAGIC) + 4 or not blob.startswith(_MAGIC):
        raise KeySetupError(not_ours)
    (length,) = struct.unpack(">I", blob[len(_MAGIC) : len(_MAGIC) + 4])
    end = len(_MAGIC) + 4 + length
    if length > _MAX_HEADER_BYTES or len(blob) < end + _SALT_BYTES + _NONCE_BYTES + 16:
        raise KeySetupError(not_ours)
    try:
        header = json.loads(blob[len(_MAGIC) + 4 : end])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KeySetupError(not_ours) from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise KeySetupError(
            f"{path} is a wrapped context in a format this fedsynth does not read; "
            "update fedsynth or ask the key holder to re-create it"
        )
    return header, blob[:end], blob[end:]


def unwrap_secret_context_bytes(
    study_id: str,
    site_private_key_path: str | os.PathLike[str],
    key_holder_public_key_path: str | os.PathLike[str],
    wrapped_blob_path: str | os.PathLike[str],
) -> bytes:
    """The serialized secret context, in memory only: for callers that store it elsewhere."""
    _check_study_id(study_id)
    blob_path = Path(wrapped_blob_path)
    private = load_private_key(site_private_key_path)
    holder_public = load_public_key(key_holder_public_key_path)
    blob = _read(
        blob_path,
        "wrapped context",
        "ask the coordinator or key holder for the file made for your site",
    )
    header, prefix, rest = _parse_blob(blob, blob_path)
    if header.get("study_id") != study_id:
        raise KeySetupError(
            f"{blob_path} was made for study {header.get('study_id')!r}, not {study_id!r}; "
            "check the study id or ask for this study's file"
        )
    own = public_key_fingerprint(private.public_key())
    if header.get("site_fingerprint") != own:
        raise KeySetupError(
            f"{blob_path} was wrapped for site {header.get('site')!r}, not for the private key "
            f"{_resolve_key_path(site_private_key_path, PRIVATE_KEY_FILE)}; use the file made "
            "for your site (or your site's own key)"
        )
    if header.get("holder_fingerprint") != public_key_fingerprint(holder_public):
        raise KeySetupError(
            f"{blob_path} was wrapped by a key holder whose key is "
            f"{header.get('holder_fingerprint')}, not the public key "
            f"{_resolve_key_path(key_holder_public_key_path, PUBLIC_KEY_FILE)}; get the key "
            "holder's public key for this study and check its fingerprint with them"
        )
    salt, nonce = rest[:_SALT_BYTES], rest[_SALT_BYTES : _SALT_BYTES + _NONCE_BYTES]
    sealed = rest[_SALT_BYTES + _NONCE_BYTES :]
    shared = _exchange(private, holder_public, key_holder_public_key_path)
    key = _derive_key(shared, salt, study_id, holder_public, private.public_key())
    try:
        return AESGCM(key).decrypt(nonce, sealed, _aad(study_id, prefix))
    except InvalidTag:
        raise KeySetupError(
            f"{blob_path} failed authentication: it was modified or corrupted on the way, or "
            "was not made with these keys; ask the key holder to send it again (re-run "
            "`fedsynth keys study-init`)"
        ) from None


def unwrap_secret_context(
    study_id: str,
    site_private_key_path: str | os.PathLike[str],
    key_holder_public_key_path: str | os.PathLike[str],
    wrapped_blob_path: str | os.PathLike[str],
) -> ts.Context:
    """Open this site's wrapped blob: the study's secret CKKS context, in memory."""
    data = unwrap_secret_context_bytes(
        study_id, site_private_key_path, key_holder_public_key_path, wrapped_blob_path
    )
    try:
        return load_context(data, require_secret=True)
    except EncryptionContextError as exc:
        raise KeySetupError(
            f"{wrapped_blob_path} opened but does not hold a usable secret context ({exc}); "
            "ask the key holder to re-create it with this fedsynth version"
        ) from None


def load_public_context(path: str | os.PathLike[str]) -> ts.Context:
    """The coordinator's context, refused if it holds a secret key."""
    path = Path(path)
    if path.is_dir():
        path = path / PUBLIC_CONTEXT_FILE
    data = _read(path, "public context", "run `fedsynth keys study-init` (the key holder does)")
    try:
        return load_context(data, require_secret=False)
    except EncryptionContextError as exc:
        raise KeySetupError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------- study setup


def create_study_keys(
    study_id: str,
    key_holder_dir: str | os.PathLike[str],
    site_public_keys: Mapping[str, str | os.PathLike[str]],
    coordinator_dir: str | os.PathLike[str],
    *,
    wrapped_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> StudyKeys:
    """Create the study's CKKS context and distribute it (run by the key holder).

    ``site_public_keys`` maps each site's name to its public key file (or folder);
    list the key holder's own site too if it takes part, since it gets its copy the
    same way. ``wrapped_dir`` defaults to ``<coordinator_dir>/wrapped``: the blobs are
    safe in the coordinator's hands, which relay them.
    """
    _check_study_id(study_id)
    if not site_public_keys:
        raise KeySetupError("no sites given; pass at least one --site NAME=PUBLIC_KEY")
    holder_dir = Path(key_holder_dir)
    coordinator = Path(coordinator_dir)
    blobs_dir = Path(wrapped_dir) if wrapped_dir is not None else coordinator / WRAPPED_DIRNAME
    if holder_dir.exists() and coordinator.exists() and holder_dir.samefile(coordinator):
        raise KeySetupError(
            f"the coordinator folder {coordinator} is the key holder's own key folder; "
            "write the coordinator's files to a separate folder"
        )
    if (coordinator / PRIVATE_KEY_FILE).exists():
        raise KeySetupError(
            f"{coordinator} holds a private key ({PRIVATE_KEY_FILE}); the coordinator's "
            "folder must hold no secret, choose another folder"
        )
    holder_private = load_private_key(holder_dir)
    holder_public = holder_private.public_key()
    site_keys = {
        _check_site_name(name): load_public_key(path) for name, path in site_public_keys.items()
    }
    fingerprints = {name: public_key_fingerprint(key) for name, key in site_keys.items()}
    duplicated = {fp for fp in fingerprints.values() if list(fingerprints.values()).count(fp) > 1}
    if duplicated:
        names = sorted(n for n, fp in fingerprints.items() if fp in duplicated)
        raise KeySetupError(
            f"sites {', '.join(names)} gave the same public key; each site needs its own "
            "(`fedsynth keys site-init` at each site)"
        )

    public_context_path = coordinator / PUBLIC_CONTEXT_FILE
    holder_copy_path = coordinator / HOLDER_PUBLIC_KEY_FILE
    manifest_path = coordinator / MANIFEST_FILE
    wrapped_paths = {name: blobs_dir / f"{name}{WRAPPED_SUFFIX}" for name in site_keys}
    _refuse_existing(
        [public_context_path, holder_copy_path, manifest_path, *wrapped_paths.values()], force
    )

    secret_ctx = make_secret_context()
    secret = secret_context_bytes(secret_ctx)
    public = public_context_bytes(secret_ctx)
    blobs = {
        name: wrap_secret_context(study_id, name, secret, holder_private, key)
        for name, key in site_keys.items()
    }
    del secret, secret_ctx  # the bare secret exists only inside the blobs from here on

    holder_fp = public_key_fingerprint(holder_public)
    manifest = {
        "format": _FORMAT,
        "study_id": study_id,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "ckks": {
            "library": f"tenseal {ts.__version__}",
            "poly_modulus_degree": POLY_MODULUS_DEGREE,
            "coeff_mod_bit_sizes": list(COEFF_MOD_BIT_SIZES),
            "scale_bits": SCALE_BITS,
            "encryption": "symmetric",
        },
        "public_context": {
            "file": PUBLIC_CONTEXT_FILE,
            "sha256": hashlib.sha256(public).hexdigest(),
        },
        "key_holder": {"public_key_file": HOLDER_PUBLIC_KEY_FILE, "fingerprint": holder_fp},
        "wrapping": _CIPHER,
        "sites": {
            name: {
                "public_key_fingerprint": fingerprints[name],
                "wrapped_file": _manifest_path(wrapped_paths[name], coordinator),
                "wrapped_sha256": hashlib.sha256(blobs[name]).hexdigest(),
            }
            for name in site_keys
        },
    }
    holder_pem = holder_public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for name, blob in blobs.items():
        _write_atomic(wrapped_paths[name], blob, force=force)
    _write_atomic(public_context_path, public, force=force)
    _write_atomic(holder_copy_path, holder_pem, force=force)
    # The manifest last: its presence says the set is complete.
    _write_atomic(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode(), force=force)
    return StudyKeys(
        study_id=study_id,
        public_context_path=public_context_path,
        holder_public_key_path=holder_copy_path,
        manifest_path=manifest_path,
        holder_fingerprint=holder_fp,
        wrapped=wrapped_paths,
        site_fingerprints=fingerprints,
    )


def _manifest_path(path: Path, coordinator: Path) -> str:
    """Relative to the coordinator's folder when inside it, so the folder can be moved."""
    try:
        return str(path.resolve().relative_to(coordinator.resolve()))
    except ValueError:
        return str(path.resolve())


def self_test(secret_ctx: ts.Context, public_ctx: ts.Context | None = None) -> None:
    """Encrypt, add (with the public context if given) and decrypt a small vector."""
    probe = {"probe": np.linspace(-1.0, 1.0, 17)}
    adder = public_ctx if public_ctx is not None else secret_ctx
    first = encrypt_state(secret_ctx, probe, 0.25)
    second = encrypt_state(secret_ctx, probe, 0.75)
    summed = add_encrypted(adder, [first.chunks, second.chunks])
    result = decrypt_state(secret_ctx, summed, first.layout)["probe"]
    if not np.allclose(result, probe["probe"], atol=1e-6):
        raise KeySetupError("the CKKS self-test gave a wrong sum; the context is unusable")


# --------------------------------------------------------------------------- CLI


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: error: {message} (see --help)")


def _site_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PUBLIC_KEY, got {text!r}")
    return name, path


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedsynth keys",
        description=(
            "Key setup for an encrypted study. Every site runs site-init; the key holder "
            "collects the public keys and runs study-init; each site checks its wrapped "
            "copy with unwrap-check. For masked sums, every site runs site-init, then "
            "peers with the others' public keys. No command prints secret material."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    site = sub.add_parser(
        "site-init",
        help="create this site's X25519 key pair",
        description="Create this site's key pair. Keep the private key; send the public key.",
    )
    site.add_argument("--site", required=True, help="this site's name in the study")
    site.add_argument("--out", required=True, type=Path, help="folder for the key pair")
    site.add_argument("--force", action="store_true", help="replace an existing key pair")

    study = sub.add_parser(
        "study-init",
        help="(key holder) create the CKKS context and wrap it for every site",
        description=(
            "Create the study's CKKS secret context, wrap one copy per site, and write the "
            "coordinator's folder (public context, key holder public key, manifest). "
            "Include your own site with --site if it takes part."
        ),
    )
    study.add_argument("--study-id", required=True)
    study.add_argument(
        "--key-holder", required=True, type=Path, help="the key holder's site-init folder"
    )
    study.add_argument(
        "--site",
        dest="sites",
        action="append",
        required=True,
        type=_site_arg,
        metavar="NAME=PUBLIC_KEY",
        help="a site and its public key file or folder; repeat for every site",
    )
    study.add_argument("--coordinator-out", required=True, type=Path)
    study.add_argument(
        "--wrapped-out",
        type=Path,
        help=f"folder for the blobs (default: <coordinator-out>/{WRAPPED_DIRNAME})",
    )
    study.add_argument("--force", action="store_true", help="replace existing study files")

    check = sub.add_parser(
        "unwrap-check",
        help="check that this site can open its wrapped context",
        description="Open the wrapped context in memory and run an encrypt/add/decrypt test.",
    )
    check.add_argument("--study-id", required=True)
    check.add_argument("--site-key", required=True, type=Path, help="private key or its folder")
    check.add_argument(
        "--holder-public", required=True, type=Path, help="the key holder's public key"
    )
    check.add_argument("--wrapped", required=True, type=Path, help="this site's wrapped file")
    check.add_argument(
        "--public-context", type=Path, help="also check the coordinator's public context"
    )

    peers = sub.add_parser(
        "peers",
        help="(every site, masked sums) collect the other sites' public keys",
        description=(
            "Copy the other sites' public keys into the folder this site's peer-keys "
            "names (one <site>.pem each), refusing this site's own key and any key given "
            "twice, and print each fingerprint to check with that site over a second "
            "channel."
        ),
    )
    peers.add_argument("--site", required=True, help="this site's name in the study")
    peers.add_argument("--site-key", required=True, type=Path,
                       help="this site's site-init folder")
    peers.add_argument("--peer", dest="peers", action="append", required=True,
                       type=_site_arg, metavar="NAME=PUBLIC_KEY",
                       help="another site and its public key file; repeat for every site")
    peers.add_argument("--out", required=True, type=Path, help="the peer-keys folder")
    peers.add_argument("--force", action="store_true", help="replace existing key files")

    finger = sub.add_parser(
        "fingerprint",
        help="print the fingerprint of public keys, to compare over a second channel",
    )
    finger.add_argument("keys", nargs="+", type=Path, metavar="PUBLIC_KEY")
    return parser


def _cmd_site_init(args: argparse.Namespace) -> None:
    _check_site_name(args.site)
    pair = generate_site_keypair(args.out, force=args.force)
    print(f"Created the key pair of site {args.site!r}:")
    print(f"  private key  {pair.private_key_path}  (stays here; never send it)")
    print(f"  public key   {pair.public_key_path}  (send it to the study's key holder)")
    print(f"  fingerprint  {pair.fingerprint}")
    print("Read the fingerprint to the key holder over a second channel (phone, video call).")


def _cmd_study_init(args: argparse.Namespace) -> None:
    sites = dict(args.sites)
    if len(sites) != len(args.sites):
        raise KeySetupError("a site name was given twice with --site")
    result = create_study_keys(
        args.study_id,
        args.key_holder,
        sites,
        args.coordinator_out,
        wrapped_dir=args.wrapped_out,
        force=args.force,
    )
    print(f"Study {result.study_id!r}: CKKS context created and wrapped for {len(sites)} sites.")
    print(f"  key holder fingerprint  {result.holder_fingerprint}")
    for name, path in result.wrapped.items():
        print(f"  {name}: {path}")
        print(f"      made for key {result.site_fingerprints[name]}")
    print(f"Coordinator folder (no secret key in it): {args.coordinator_out}")
    print(
        "Check each site's fingerprint above with that site before the study starts; send "
        "each site its wrapped file and the key holder's public key "
        f"({result.holder_public_key_path})."
    )


def _cmd_unwrap_check(args: argparse.Namespace) -> None:
    ctx = unwrap_secret_context(args.study_id, args.site_key, args.holder_public, args.wrapped)
    public = load_public_context(args.public_context) if args.public_context else None
    self_test(ctx, public)
    print(f"OK: {args.wrapped} opens with this site's key for study {args.study_id!r}.")
    print(f"  key holder fingerprint  {public_key_fingerprint(args.holder_public)}")
    if public is not None:
        print(f"  the coordinator's context {args.public_context} adds this site's ciphertexts")
    print("Compare the key holder fingerprint with the one the key holder gave you.")


def _cmd_peers(args: argparse.Namespace) -> None:
    from .masks import write_roster

    peers = dict(args.peers)
    if len(peers) != len(args.peers):
        raise KeySetupError("a site name was given twice with --peer")
    roster = write_roster(_check_site_name(args.site), args.site_key, peers, args.out,
                          force=args.force)
    print(f"Roster of site {args.site!r} for masked sums: {roster.size - 1} other sites "
          f"in {args.out}")
    for name, fingerprint in roster.fingerprints().items():
        print(f"  {name}: {fingerprint}")
    print("Check each fingerprint with its site over a second channel, then start the "
          f"SuperNode with key-dir='{args.site_key}' peer-keys='{args.out}'.")


def _cmd_fingerprint(args: argparse.Namespace) -> None:
    for path in args.keys:
        print(f"{public_key_fingerprint(path)}  {path}")


def keys_command(argv: Sequence[str]) -> int:
    """``fedsynth keys ...``: returns the exit status; errors are one line on stderr."""
    parser = _build_parser()
    try:
        args = parser.parse_args(list(argv))
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    handlers = {
        "site-init": _cmd_site_init,
        "study-init": _cmd_study_init,
        "unwrap-check": _cmd_unwrap_check,
        "fingerprint": _cmd_fingerprint,
        "peers": _cmd_peers,
    }
    try:
        handlers[args.command](args)
    except (KeySetupError, EncryptionContextError) as exc:
        print(f"fedsynth keys {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0
