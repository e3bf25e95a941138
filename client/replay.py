"""A site's answer to a round it already trained: replayed, never trained (and charged) twice.

A coordinator that stops after the sites trained round r but before it checkpointed r
asks for round r again when it resumes, with the same global model. Training again
would spend the site's budget a second time for a round the study keeps only once.
So a site keeps its last trained reply in its ``state-dir``, keyed by the round and a
digest of the model it received, and sends that same reply again. Sending a release
again is not a new release: it costs no privacy. A different model under the same
round number is a new question: the site trains, and is charged.

Order of writes, so that a crash at any point never under-counts: the reply file is
written first, then the ledger (atomically) that names it by checksum. A ledger that
names no reply, or a reply whose checksum differs, means "train again" (charged), never
"replay something the ledger did not pay for".
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from ..common.study import SiteConfig
from .site import SiteState

log = logging.getLogger("fedsynth.site")


def model_digest(content: RecordDict, model_records: tuple[str, ...]) -> str:
    """SHA-256 of the starting point a round's message carries (arrays, ciphertexts).

    The study config is left out on purpose: a resumed run differs from the first in
    ``resume`` and nothing about the model; the round number is part of the key.
    """
    h = hashlib.sha256()
    for name in sorted(model_records):
        if name not in content:
            continue
        record = content[name]
        h.update(f"[{name}]".encode())
        if isinstance(record, ArrayRecord):
            for key in sorted(record.keys()):
                arr = np.ascontiguousarray(record[key].numpy())
                h.update(f"{key}:{arr.dtype.str}:{arr.shape}".encode())
                h.update(arr.tobytes())
        elif isinstance(record, ConfigRecord):
            for key in sorted(record.keys()):
                h.update(f"{key}=".encode())
                value = record[key]
                for item in value if isinstance(value, list) else [value]:
                    h.update(item if isinstance(item, bytes) else repr(item).encode())
    return h.hexdigest()


def reply_path(site: SiteConfig, study_id: str, server_round: int) -> Path | None:
    """Where the site keeps its reply of ``server_round`` (None without a state-dir)."""
    if not site.state_dir:
        return None
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in study_id)
    return Path(site.state_dir) / f"reply-{safe}-r{server_round}.bin"


def cached_reply(
    site: SiteConfig, study_id: str, state: SiteState, server_round: int, digest: str
) -> RecordDict | None:
    """The stored reply when this exact question was answered (and paid for) before."""
    if state.replay_round != server_round or state.replay_digest != digest:
        return None
    path = reply_path(site, study_id, server_round)
    if path is None or not path.is_file():
        return None
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != state.replay_checksum:
        log.warning("site %s: stored reply of round %d does not match its ledger entry; "
                    "training again (charged)", site.name, server_round)
        return None
    proto = ProtoRecordDict()
    proto.ParseFromString(blob)
    log.info("site %s: round %d was trained before on this same model; sending the same "
             "reply again (no new release, no privacy spent)", site.name, server_round)
    return recorddict_from_proto(proto)


def keep_reply(
    site: SiteConfig, study_id: str, state: SiteState, server_round: int, digest: str,
    content: RecordDict,
) -> None:
    """Store a trained reply (owner-only, atomic) and note it in ``state``.

    The caller saves ``state`` (the ledger) afterwards; older stored replies of the
    study are removed once they can no longer be asked for again.
    """
    path = reply_path(site, study_id, server_round)
    if path is None:
        return
    blob = recorddict_to_proto(content).SerializeToString()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".reply-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(blob)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    state.replay_round = server_round
    state.replay_digest = digest
    state.replay_checksum = hashlib.sha256(blob).hexdigest()


def drop_older_replies(site: SiteConfig, study_id: str, keep_round: int) -> None:
    """Remove stored replies of rounds before ``keep_round`` (after the ledger is saved)."""
    path = reply_path(site, study_id, keep_round)
    if path is None:
        return
    prefix = path.name[: path.name.rindex("-r") + 2]
    for other in path.parent.glob(prefix + "*.bin"):
        if other != path and other.name[len(prefix) : -len(".bin")].isdigit():
            other.unlink(missing_ok=True)
