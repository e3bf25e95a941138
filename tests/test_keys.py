"""Study key setup: wrapping, refusals, files at rest, and the ``fedsynth keys`` command."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from fedsynth.common.encryption import (
    KeySetupError,
    add_encrypted,
    create_study_keys,
    decrypt_state,
    encrypt_state,
    generate_site_keypair,
    keys_command,
    load_public_context,
    public_key_fingerprint,
    unwrap_secret_context,
)
from fedsynth.common.encryption.keys import (
    MANIFEST_FILE,
    PRIVATE_KEY_FILE,
    PUBLIC_CONTEXT_FILE,
    PUBLIC_KEY_FILE,
    unwrap_secret_context_bytes,
)

STUDY = "heart-2025"
SITES = ("cleveland", "hungary", "switzerland")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def study(tmp_path: Path) -> dict:
    """Three sites with key pairs; the first is also the key holder."""
    pairs = {name: generate_site_keypair(tmp_path / "sites" / name) for name in SITES}
    coordinator = tmp_path / "coordinator"
    result = create_study_keys(
        STUDY,
        tmp_path / "sites" / SITES[0],
        {name: pair.public_key_path for name, pair in pairs.items()},
        coordinator,
    )
    return {"root": tmp_path, "pairs": pairs, "coordinator": coordinator, "keys": result}


def _unwrap(study: dict, site: str, study_id: str = STUDY) -> ts.Context:
    return unwrap_secret_context(
        study_id,
        study["pairs"][site].private_key_path,
        study["keys"].holder_public_key_path,
        study["keys"].wrapped[site],
    )


def test_every_site_unwraps_the_same_secret_context(study):
    contexts = {site: _unwrap(study, site) for site in SITES}
    assert all(ctx.is_private() for ctx in contexts.values())
    assert not any(ctx.has_galois_keys() for ctx in contexts.values())
    public = load_public_context(study["keys"].public_context_path)
    assert not public.is_private()
    # Encrypted at one site, added by the coordinator, decrypted at another: one key.
    state = {"w": np.linspace(-3, 3, 50)}
    a = encrypt_state(contexts["hungary"], state, 0.5)
    b = encrypt_state(contexts["switzerland"], state, 0.5)
    summed = add_encrypted(public, [a.chunks, b.chunks])
    result = decrypt_state(contexts["cleveland"], summed, a.layout)
    np.testing.assert_allclose(result["w"], state["w"], atol=1e-8)


def test_wrong_study_id_is_refused(study):
    with pytest.raises(KeySetupError, match="made for study 'heart-2025', not 'other-study'"):
        _unwrap(study, "hungary", study_id="other-study")


def test_header_edited_to_another_study_fails_authentication(study):
    path = study["keys"].wrapped["hungary"]
    blob = path.read_bytes()
    edited = blob.replace(b'"study_id":"heart-2025"', b'"study_id":"heart-2026"')
    assert edited != blob and len(edited) == len(blob)
    path.write_bytes(edited)
    with pytest.raises(KeySetupError, match="failed authentication"):
        _unwrap(study, "hungary", study_id="heart-2026")


def test_tampered_blob_is_refused(study):
    path = study["keys"].wrapped["hungary"]
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(KeySetupError, match=f"{path}.*failed authentication"):
        _unwrap(study, "hungary")


def test_truncated_and_foreign_files_are_refused(study):
    path = study["keys"].wrapped["hungary"]
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(KeySetupError, match="not a fedsynth wrapped context"):
        _unwrap(study, "hungary")
    path.write_bytes(b"hello")
    with pytest.raises(KeySetupError, match="not a fedsynth wrapped context"):
        _unwrap(study, "hungary")


def test_another_sites_blob_or_key_is_refused(study):
    with pytest.raises(KeySetupError, match="wrapped for site 'switzerland'"):
        unwrap_secret_context(
            STUDY,
            study["pairs"]["hungary"].private_key_path,
            study["keys"].holder_public_key_path,
            study["keys"].wrapped["switzerland"],
        )
    with pytest.raises(KeySetupError, match="key holder"):
        unwrap_secret_context(
            STUDY,
            study["pairs"]["hungary"].private_key_path,
            study["pairs"]["hungary"].public_key_path,
            study["keys"].wrapped["hungary"],
        )


def test_missing_key_file_names_the_file(study, tmp_path):
    missing = tmp_path / "nowhere" / PRIVATE_KEY_FILE
    with pytest.raises(KeySetupError, match=f"{missing} not found.*site-init"):
        unwrap_secret_context(
            STUDY, missing, study["keys"].holder_public_key_path, study["keys"].wrapped["hungary"]
        )


def test_files_are_owner_only(study):
    root = study["root"]
    for pair in study["pairs"].values():
        assert _mode(pair.private_key_path) == 0o600
        assert _mode(pair.public_key_path) == 0o600
        assert _mode(pair.private_key_path.parent) == 0o700
    assert _mode(root / "sites") == 0o700
    for path in study["coordinator"].rglob("*"):
        assert _mode(path) == (0o700 if path.is_dir() else 0o600), path
    assert _mode(study["coordinator"]) == 0o700
    leftovers = [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_coordinator_folder_holds_no_secret_key(study):
    secret = unwrap_secret_context_bytes(
        STUDY,
        study["pairs"]["hungary"].private_key_path,
        study["keys"].holder_public_key_path,
        study["keys"].wrapped["hungary"],
    )
    files = [p for p in study["coordinator"].rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {PUBLIC_CONTEXT_FILE, MANIFEST_FILE}
    assert len(files) == 3 + len(SITES)  # context, manifest, holder key, one blob per site
    loaded = 0
    for path in files:
        data = path.read_bytes()
        assert PRIVATE_KEY_FILE not in path.name
        assert secret[-4096:] not in data  # not even a fragment of the secret context
        try:
            ctx = ts.context_from(data)
        except Exception:
            continue
        loaded += 1
        assert not ctx.is_private(), path
        assert not ctx.has_secret_key(), path
    assert loaded == 1  # exactly the public context parses as a TenSEAL context
    manifest = json.loads((study["coordinator"] / MANIFEST_FILE).read_text())
    assert manifest["study_id"] == STUDY
    assert set(manifest["sites"]) == set(SITES)


def test_no_overwrite_without_force(study):
    site_dir = study["pairs"]["hungary"].private_key_path.parent
    before = study["pairs"]["hungary"].private_key_path.read_bytes()
    with pytest.raises(KeySetupError, match="already exists"):
        generate_site_keypair(site_dir)
    assert study["pairs"]["hungary"].private_key_path.read_bytes() == before
    replaced = generate_site_keypair(site_dir, force=True)
    assert replaced.private_key_path.read_bytes() != before
    assert _mode(replaced.private_key_path) == 0o600

    args = (
        STUDY,
        study["pairs"]["cleveland"].private_key_path.parent,
        {"cleveland": study["pairs"]["cleveland"].public_key_path},
        study["coordinator"],
    )
    blob = study["keys"].wrapped["cleveland"].read_bytes()
    with pytest.raises(KeySetupError, match="already exists"):
        create_study_keys(*args)
    assert study["keys"].wrapped["cleveland"].read_bytes() == blob
    create_study_keys(*args, force=True)
    assert study["keys"].wrapped["cleveland"].read_bytes() != blob


def test_coordinator_folder_cannot_be_a_key_folder(study, tmp_path):
    holder = study["pairs"]["cleveland"].private_key_path.parent
    with pytest.raises(KeySetupError, match="separate folder|private key"):
        create_study_keys(
            STUDY, holder, {"hungary": study["pairs"]["hungary"].public_key_path}, holder
        )


def test_loose_private_key_permissions_are_refused(study):
    path = study["pairs"]["hungary"].private_key_path
    os.chmod(path, 0o644)
    with pytest.raises(KeySetupError, match="chmod 600"):
        _unwrap(study, "hungary")


def test_same_public_key_for_two_sites_is_refused(study, tmp_path):
    pub = study["pairs"]["hungary"].public_key_path
    with pytest.raises(KeySetupError, match="same public key"):
        create_study_keys(
            STUDY,
            study["pairs"]["cleveland"].private_key_path.parent,
            {"a": pub, "b": pub},
            tmp_path / "other-coordinator",
        )


# --------------------------------------------------------------------------- CLI


def test_cli_full_setup(tmp_path, capsys):
    sites = tmp_path / "sites"
    for name in ("a", "b"):
        assert keys_command(["site-init", "--site", name, "--out", str(sites / name)]) == 0
    out = capsys.readouterr().out
    assert "fingerprint  SHA256:" in out
    assert public_key_fingerprint(sites / "a" / PUBLIC_KEY_FILE) in out

    coordinator = tmp_path / "coordinator"
    status = keys_command(
        [
            "study-init",
            "--study-id", STUDY,
            "--key-holder", str(sites / "a"),
            "--site", f"a={sites / 'a'}",
            "--site", f"b={sites / 'b' / PUBLIC_KEY_FILE}",
            "--coordinator-out", str(coordinator),
        ]
    )  # fmt: skip
    assert status == 0
    out = capsys.readouterr().out
    assert "wrapped for 2 sites" in out

    status = keys_command(
        [
            "unwrap-check",
            "--study-id", STUDY,
            "--site-key", str(sites / "b"),
            "--holder-public", str(coordinator / "key-holder-x25519-public.pem"),
            "--wrapped", str(coordinator / "wrapped" / "b.ckks-context.wrapped"),
            "--public-context", str(coordinator / PUBLIC_CONTEXT_FILE),
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert captured.out.startswith("OK:")
    private_pem = (sites / "b" / PRIVATE_KEY_FILE).read_text()
    body = "".join(private_pem.splitlines()[1:-1])
    assert body not in captured.out + captured.err

    assert keys_command(["fingerprint", str(sites / "b" / PUBLIC_KEY_FILE)]) == 0
    assert "SHA256:" in capsys.readouterr().out


def test_cli_errors_are_one_line_and_non_zero(tmp_path, capsys):
    site = tmp_path / "site"
    assert keys_command(["site-init", "--site", "a", "--out", str(site)]) == 0
    capsys.readouterr()
    assert keys_command(["site-init", "--site", "a", "--out", str(site)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err

    status = keys_command(
        [
            "unwrap-check",
            "--study-id", STUDY,
            "--site-key", str(site),
            "--holder-public", str(site),
            "--wrapped", str(tmp_path / "missing.wrapped"),
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1 and "missing.wrapped not found" in err

    assert keys_command(["site-init", "--site", "bad name!", "--out", str(tmp_path / "x")]) == 1
    assert "site name" in capsys.readouterr().err
    assert keys_command(["study-init", "--study-id", STUDY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "required" in err
    assert keys_command(["--help"]) == 0
