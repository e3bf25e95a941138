"""A record of every message that crosses the network, by layout only: the audit trail.

With ``record-messages`` set in the run config, the ServerApp's Grid is wrapped so each
message the coordinator sends and each reply it receives is described in one JSON line:
direction, message type, node, round, and for every record its kind and, per key, the
array shape and dtype or the value's type and length. It sits below the coordinator's
packing (``packed_grid.py``), so it sees each message as it crosses the network: an
array record as one packed array, which it describes by its size and by the key, shape
and dtype of every array the packed bytes decode to. Values are never written: the
file is evidence of *what kind* of data travelled (model arrays, counts, metrics), kept
on the coordinator's disk, and must not become a copy of what it describes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from ..common.protocol import PACKED, WireFormatError, is_packed, unpack_arrays
from .wrapped_grid import WrappedGrid


def _value_layout(value: Any) -> dict[str, Any]:
    """Type and size of a config or metric value, never the value itself."""
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        sizes = [len(v) for v in value if isinstance(v, str | bytes)]
        return {"type": "list", "items": kinds, "length": len(value),
                "max_item_length": max(sizes, default=0)}
    if isinstance(value, str | bytes):
        return {"type": type(value).__name__, "length": len(value)}
    return {"type": type(value).__name__}


def describe_content(content: RecordDict) -> dict[str, Any]:
    """Every record of a message: its kind and the layout of each entry."""
    out: dict[str, Any] = {}
    for name, record in content.items():
        if is_packed(record):  # one array on the wire: described by what it holds
            blob = record[PACKED].numpy()
            try:
                arrays, decodes = unpack_arrays(blob), True
            except WireFormatError:
                arrays, decodes = {}, False
            out[name] = {
                "kind": "arrays",
                "packed_bytes": int(blob.size),
                "decodes": decodes,
                "entries": {k: {"shape": list(a.shape), "dtype": str(a.dtype)}
                            for k, a in arrays.items()},
            }
        elif isinstance(record, ArrayRecord):
            out[name] = {
                "kind": "arrays",
                "entries": {k: {"shape": list(a.shape), "dtype": str(a.dtype)}
                            for k, a in record.items()},
            }
        elif isinstance(record, MetricRecord | ConfigRecord):
            kind = "metrics" if isinstance(record, MetricRecord) else "config"
            out[name] = {"kind": kind,
                         "entries": {k: _value_layout(v) for k, v in record.items()}}
        else:
            out[name] = {"kind": type(record).__name__, "entries": {}}
    return out


def describe(message: Message, direction: str) -> dict[str, Any]:
    meta = message.metadata
    entry: dict[str, Any] = {
        "time": time.time(),
        "direction": direction,
        "message_type": meta.message_type,
        "group_id": meta.group_id,
        "node": meta.dst_node_id if direction == "sent" else meta.src_node_id,
    }
    if message.has_error():
        entry["error"] = {"code": int(message.error.code)}
        entry["records"] = {}
    else:
        entry["records"] = describe_content(message.content)
    return entry


class RecordingGrid(WrappedGrid):
    """A Grid that passes everything to the real one and logs each message's layout."""

    def __init__(self, inner: Grid, path: Path) -> None:
        super().__init__(inner)
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def _log(self, messages: Iterable[Message], direction: str) -> None:
        lines = [json.dumps(describe(m, direction)) for m in messages]
        if not lines:
            return
        with self._lock, self.path.open("a") as fh:
            fh.write("\n".join(lines) + "\n")

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._log(messages, "sent")
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self._log(replies, "received")
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        self._log(messages, "sent")
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self._log(replies, "received")
        return replies
