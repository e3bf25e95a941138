"""The coordinator's side of encrypted aggregation: check, add, relay; never decrypt.

With ``secure-aggregation = "ckks"`` the coordinator holds a context with no key of any
kind (``load_public_context`` refuses one that holds the secret). Each round it:

1. sends the sites the sum of the previous round's accepted ciphertexts (in round 1,
   or while no site has trained yet, the public initial model in clear), with the
   model's public slot layout;
2. checks every "trained" reply without a key: a reply that carries weights in clear,
   follows another layout, has the wrong number of ciphertexts or a ciphertext of the
   wrong size or structure is refused with a reason naming the site, and the round
   goes on with the others (a malformed ciphertext added in would make the aggregate
   undecryptable for everyone);
3. adds the accepted ciphertexts (:func:`add_encrypted`) and keeps the sum; that sum,
   with the layout and the round, is all a checkpoint can hold.

Only FedAvg and FedProx run: their server step is a weighted sum, which the sites'
pre-weighted ciphertexts make a plain sum (FedProx differs only at the sites, whose
proximal anchor is the decrypted global model). The others need the updates in clear
(``common.study.check_strategy`` says why, per strategy) and are refused.

FedAvg's ``num-examples`` is the public constant 1.0 in every encrypted reply and this
strategy never weights with it: the weights ``n_i / B`` are inside the ciphertexts.

After the last round, :meth:`SecureAggregationMixin.release` asks one site at a time (a
Flower QUERY: no training, no privacy spent) to decrypt the final sum, flood it and
return it; the first valid model is the study's released generator.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import tenseal as ts
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from ..client.secure import (
    AGGREGATE,
    AGGREGATE_ROUND,
    CHUNKS,
    CKKS_RECORD,
    ENCRYPTED_WEIGHT,
    LAYOUT,
    RELEASE,
    RELEASED,
)
from ..common.encryption import (
    EncryptedUpdateError,
    EncryptionContextError,
    StateLayout,
    add_encrypted,
    check_ciphertexts,
)
from ..common.study import ConfigError, check_strategy
from .strategy import SiteAwareMixin, SiteRound, make_strategy

log = logging.getLogger("fedsynth.coordinator")

CHECKPOINT_MAGIC = b"FSYNCKKS"
CHECKPOINT_FORMAT = 1


class SecureAggregationMixin(SiteAwareMixin):
    """SiteAwareMixin whose updates are CKKS ciphertexts the coordinator only adds."""

    weights_in_clear = False

    def init_secure(
        self,
        public_ctx: ts.Context,
        layout: StateLayout,
        aggregate: list[bytes] | None = None,
        aggregate_round: int = 0,
    ) -> None:
        """Give the strategy its key-less context, the public layout and a resumed sum."""
        if public_ctx.is_private():
            raise EncryptionContextError(
                "the coordinator was given a context that holds the secret key; give it the "
                "public context from `fedsynth keys study-init` and nothing else"
            )
        if not layout.has_count_slot:
            raise ValueError("an encrypted study's layout needs the count slot (count_bound)")
        self.public_ctx = public_ctx
        self.layout = layout
        self.aggregate = aggregate or None
        self.aggregate_round = aggregate_round if aggregate else 0
        self.reference = {
            k: (shape, dtype)
            for k, shape, dtype in zip(layout.keys, layout.shapes, layout.dtypes, strict=True)
        }
        self.trained_nodes: list[int] = []
        self.releases: list[SiteRound] = []

    def ckks_record(self) -> ConfigRecord:
        """What the sites need besides the config: the layout and the current sum, if any."""
        record: dict[str, Any] = {LAYOUT: self.layout.to_json(), AGGREGATE_ROUND: 0}
        if self.aggregate is not None:
            record[AGGREGATE] = list(self.aggregate)
            record[AGGREGATE_ROUND] = self.aggregate_round
        return ConfigRecord(record)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Once a sum exists, Flower's loop passes the empty record aggregate_train
        # returned; before that, ``arrays`` is the public initial model.
        send = arrays if self.aggregate is None else ArrayRecord()
        messages = list(super().configure_train(server_round, send, config, grid))
        record = self.ckks_record()
        for message in messages:
            message.content[CKKS_RECORD] = record
        return messages

    def _check_update(self, content: Any, site: str) -> str:
        arrays = content.get("arrays") if "arrays" in content else None
        if isinstance(arrays, ArrayRecord) and len(arrays) > 0:
            return (
                "model weights in clear in an encrypted study (is the site configured for "
                "secure-aggregation?); refused without being read"
            )
        record = content.get(CKKS_RECORD) if CKKS_RECORD in content else None
        if not isinstance(record, ConfigRecord):
            return "no ciphertexts in a 'trained' reply"
        layout_json = record.get(LAYOUT)
        try:
            theirs = StateLayout.from_json(str(layout_json))
        except ValueError as exc:
            return f"unreadable model layout: {exc}"
        if theirs != self.layout:
            return (
                f"the reply follows another model layout ({theirs.n_params} values, count "
                f"bound {theirs.count_bound}; the study's has {self.layout.n_params}, "
                f"{self.layout.count_bound})"
            )
        chunks = record.get(CHUNKS)
        try:
            check_ciphertexts(self.public_ctx, chunks if isinstance(chunks, list) else [],
                              self.layout)
        except EncryptedUpdateError as exc:
            return str(exc)
        return ""

    def _check_weight(self, weight: Any) -> str:
        # Never put the value in the reason: if it is a real count, logging it would
        # write the disclosed count into the coordinator's log.
        if weight != ENCRYPTED_WEIGHT:
            return (
                "a 'num-examples' other than the public constant 1.0: an encrypted study's "
                "sites keep their row count inside the ciphertexts"
            )
        return ""

    def _aggregate(
        self, server_round: int, usable: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Add the accepted ciphertexts; the sum stays here and goes out next round."""
        chunks = [list(msg.content[CKKS_RECORD][CHUNKS]) for msg in usable]
        self.aggregate = add_encrypted(self.public_ctx, chunks)
        self.aggregate_round = server_round + self.round_offset
        self.trained_nodes = [msg.metadata.src_node_id for msg in usable]
        metrics = self.train_metrics_aggr_fn(  # type: ignore[attr-defined]
            [msg.content for msg in usable], self.weighted_by_key  # type: ignore[attr-defined]
        )
        # An empty record, not None: Flower's loop then passes it back to configure_train,
        # which sends the encrypted sum instead. No weight exists here in clear.
        return ArrayRecord(), metrics

    def release(
        self, grid: Grid, final_round: int, timeout: float = 3600.0
    ) -> dict[str, np.ndarray] | None:
        """Ask one site at a time to decrypt, flood and return the final model.

        Sites that trained in the last round are asked first (they are up and hold the
        key); one valid reply ends the step. Asking one site rather than all matters:
        every release carries fresh flooding noise, and many copies would average it
        away. Returns None when there is no sum or no site released it.
        """
        if self.aggregate is None:
            return None
        config = ConfigRecord({**self.extra_config, "server-round": final_round, RELEASE: True})
        nodes = [*self.trained_nodes]
        nodes += [n for n in sorted(grid.get_node_ids()) if n not in nodes]
        for node in nodes:
            content = RecordDict({"config": config, CKKS_RECORD: self.ckks_record()})
            query = Message(content, dst_node_id=node, message_type=MessageType.QUERY)
            replies = list(grid.send_and_receive([query], timeout=timeout))
            state, entry = self._check_release(replies, node)
            self.releases.append(entry)
            if state is not None:
                log.info("final model released by %s", entry.site)
                return state
            log.warning("release: %s did not release the final model (%s): %s", entry.site,
                        entry.status, entry.reason)
        return None

    def _check_release(
        self, replies: list[Message], node: int
    ) -> tuple[dict[str, np.ndarray] | None, SiteRound]:
        if not replies:
            return None, SiteRound(site=f"node {node}", status="failed", reason="no reply")
        msg = replies[0]
        if msg.has_error():
            reason = str(msg.error.reason)[:300]
            return None, SiteRound(site=f"node {node}", status="failed", reason=reason)
        info = dict(msg.content["site"]) if "site" in msg.content else {}
        metrics = dict(msg.content["metrics"]) if "metrics" in msg.content else {}
        eps = metrics.get("epsilon")
        entry = SiteRound(
            site=str(info.get("name", f"node {node}")),
            status=str(info.get("status", "unknown")),
            epsilon=float(eps) if isinstance(eps, int | float) else None,
            problems=[str(p) for p in info.get("problems", [])],
        )
        if entry.status != RELEASED:
            entry.reason = "; ".join(entry.problems) or "did not release"
            return None, entry
        reason = SiteAwareMixin._check_update(self, msg.content, entry.site)
        if reason:
            entry.status, entry.reason = "refused", reason
            return None, entry
        return {k: v.numpy() for k, v in msg.content["arrays"].items()}, entry


class SecureFedAvg(SecureAggregationMixin, FedAvg):
    """FedAvg on ciphertexts: the sites pre-weight, the coordinator adds."""


class SecureFedProx(SecureAggregationMixin, FedProx):
    """FedProx on ciphertexts: the proximal anchor is the global model each site decrypts."""


SECURE_CLASSES: dict[str, type[SiteAwareMixin]] = {
    "fedavg": SecureFedAvg,
    "fedprox": SecureFedProx,
}


def make_secure_strategy(
    name: str,
    *,
    min_sites: int,
    proximal_mu: float,
    extra_config: dict[str, Any],
    public_ctx: ts.Context,
    layout: StateLayout,
    round_offset: int = 0,
    aggregate: list[bytes] | None = None,
    aggregate_round: int = 0,
) -> SecureAggregationMixin:
    """The encrypted strategy, refusing a non-linear one with the reason why."""
    problem = check_strategy(name, "ckks")
    if problem:
        raise ConfigError(problem)
    strategy = make_strategy(
        name,
        num_sites=0,
        min_sites=min_sites,
        proximal_mu=proximal_mu,
        extra_config=extra_config,
        round_offset=round_offset,
        classes=SECURE_CLASSES,
    )
    secure = cast(SecureAggregationMixin, strategy)  # SECURE_CLASSES holds only those
    secure.init_secure(public_ctx, layout, aggregate, aggregate_round)
    return secure


# --------------------------------------------------------------------------- checkpoint


@dataclass
class EncryptedCheckpoint:
    """A resumable encrypted study: the last sum, its layout, and the round log."""

    meta: dict[str, Any]
    layout: StateLayout
    aggregate: list[bytes]


def write_encrypted_checkpoint(
    path: Path, meta: dict[str, Any], layout: StateLayout, aggregate: list[bytes] | None
) -> None:
    """Save the summed ciphertexts (none yet: the initial model) atomically.

    The coordinator cannot checkpoint a model it cannot read; the ciphertexts plus the
    layout are what the sites need to go on. Format: magic, header length (uint32,
    big-endian), JSON header (``meta``, layout, each ciphertext's size), ciphertexts.
    """
    chunks = list(aggregate or [])
    header = json.dumps(
        {
            "format": CHECKPOINT_FORMAT,
            "meta": meta,
            "layout": layout.to_dict(),
            "sizes": [len(c) for c in chunks],
        }
    ).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(CHECKPOINT_MAGIC + struct.pack(">I", len(header)) + header)
            for chunk in chunks:
                handle.write(chunk)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_encrypted_checkpoint(path: Path) -> EncryptedCheckpoint:
    """Load what :func:`write_encrypted_checkpoint` wrote, refusing a damaged file."""
    data = path.read_bytes()
    bad = f"{path} is not a fedsynth encrypted checkpoint (or is truncated)"
    start = len(CHECKPOINT_MAGIC) + 4
    if len(data) < start or not data.startswith(CHECKPOINT_MAGIC):
        raise ConfigError(bad)
    (length,) = struct.unpack(">I", data[len(CHECKPOINT_MAGIC) : start])
    try:
        header = json.loads(data[start : start + length])
        layout = StateLayout.from_dict(header["layout"])
        sizes = [int(n) for n in header["sizes"]]
        meta = dict(header["meta"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(bad) from None
    if header.get("format") != CHECKPOINT_FORMAT or start + length + sum(sizes) != len(data):
        raise ConfigError(bad)
    chunks, offset = [], start + length
    for size in sizes:
        chunks.append(data[offset : offset + size])
        offset += size
    return EncryptedCheckpoint(meta, layout, chunks)
