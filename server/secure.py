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

After the last round, :meth:`SecureAggregation.release` asks one site at a time (a
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
from typing import Any

import numpy as np
import tenseal as ts
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..common.encryption import (
    EncryptedUpdateError,
    EncryptionContextError,
    StateLayout,
    add_encrypted,
    check_ciphertexts,
)
from ..common.protocol import (
    AGGREGATE,
    AGGREGATE_ROUND,
    ARRAYS,
    CHUNKS,
    CKKS,
    CONFIG,
    ENCRYPTED_WEIGHT,
    EPSILON,
    KIND,
    LAYOUT,
    METRICS,
    NUM_EXAMPLES,
    RELEASE,
    SERVER_ROUND,
    QueryKind,
    SiteReply,
    Status,
)
from ..common.study import SECURE_AGGREGATION, ConfigError, check_strategy
from .guards import ClearUpdate, PlausibleEpsilon, ReplyGuard, RoundContext
from .rounds import RoundLog, SiteRound
from .strategy import SiteAware, make_strategy

log = logging.getLogger("fedsynth.coordinator")

CHECKPOINT_MAGIC = b"FSYNCKKS"
CHECKPOINT_FORMAT = 1


class Ciphertexts:
    """An encrypted reply: no weights in clear, the study's layout, well-formed
    ciphertexts (checked without a key: count, sizes, structure). A malformed ciphertext
    added in would make the aggregate undecryptable for everyone."""

    def __init__(self, public_ctx: ts.Context, layout: StateLayout) -> None:
        self.public_ctx = public_ctx
        self.layout = layout

    def check(self, content: RecordDict, site: str, ctx: RoundContext) -> str:
        arrays = content.get(ARRAYS) if ARRAYS in content else None
        if isinstance(arrays, ArrayRecord) and len(arrays) > 0:
            return (
                "model weights in clear in an encrypted study (is the site configured for "
                "secure-aggregation?); refused without being read"
            )
        record = content.get(CKKS) if CKKS in content else None
        if not isinstance(record, ConfigRecord):
            return "no ciphertexts in a 'trained' reply"
        try:
            theirs = StateLayout.from_json(str(record.get(LAYOUT)))
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


class EncryptedWeight:
    """``num-examples`` must be the public constant: the real weight is inside the
    ciphertexts. The reason never quotes the value: if it is a real count, logging it
    would write the disclosed count into the coordinator's log."""

    def check(self, content: RecordDict, site: str, ctx: RoundContext) -> str:
        metrics = content.get(METRICS) if METRICS in content else None
        if not isinstance(metrics, MetricRecord):
            return "no metrics record"
        if metrics.get(NUM_EXAMPLES) != ENCRYPTED_WEIGHT:
            return (
                "a 'num-examples' other than the public constant 1.0: an encrypted study's "
                "sites keep their row count inside the ciphertexts"
            )
        return ""


def encrypted_guards(public_ctx: ts.Context, layout: StateLayout) -> list[ReplyGuard]:
    """The checks of an encrypted study: the clear ones that read weights are replaced."""
    return [Ciphertexts(public_ctx, layout), EncryptedWeight(), PlausibleEpsilon()]


class SecureAggregation(Strategy):
    """Encrypted aggregation around a site-aware strategy, as Flower wraps one for DP.

    The wrapped strategy asks the sites, logs and checks their replies (with the guards
    of ``encrypted_guards``); this wrapper adds the CKKS record to every request, adds
    the accepted ciphertexts instead of averaging weights (the sites pre-weighted them),
    keeps that sum between rounds and, at the end, asks for its release. It holds a
    context with no key of any kind.
    """

    def __init__(
        self,
        strategy: SiteAware,
        public_ctx: ts.Context,
        layout: StateLayout,
        *,
        aggregate: list[bytes] | None = None,
        aggregate_round: int = 0,
    ) -> None:
        if public_ctx.is_private():
            raise EncryptionContextError(
                "the coordinator was given a context that holds the secret key; give it the "
                "public context from `fedsynth keys study-init` and nothing else"
            )
        if not layout.has_count_slot:
            raise ValueError("an encrypted study's layout needs the count slot (count_bound)")
        self.strategy = strategy
        self.public_ctx = public_ctx
        self.layout = layout
        self.aggregate = aggregate or None
        self.aggregate_round = aggregate_round if aggregate else 0
        self.trained_nodes: list[int] = []
        self.releases: list[SiteRound] = []

    @property
    def history(self) -> list[RoundLog]:
        return self.strategy.history

    def summary(self) -> None:
        self.strategy.summary()  # type: ignore[attr-defined]

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
        messages = list(self.strategy.configure_train(server_round, send, config, grid))
        record = self.ckks_record()
        for message in messages:
            message.content[CKKS] = record
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Add the accepted ciphertexts; the sum stays here and goes out next round."""
        usable = self.strategy.accept(server_round, replies)
        if usable is None:
            return None, None
        chunks = [list(msg.content[CKKS][CHUNKS]) for msg in usable]
        self.aggregate = add_encrypted(self.public_ctx, chunks)
        self.aggregate_round = server_round + self.strategy.round_offset
        self.trained_nodes = [msg.metadata.src_node_id for msg in usable]
        metrics = self.strategy.train_metrics_aggr_fn(  # type: ignore[attr-defined]
            [msg.content for msg in usable], NUM_EXAMPLES
        )
        # An empty record, not None: Flower's loop then passes it back to configure_train,
        # which sends the encrypted sum instead. No weight exists here in clear.
        return ArrayRecord(), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # no model in clear to evaluate at the sites between rounds

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def release(
        self, grid: Grid, final_round: int, timeout: float = 3600.0
    ) -> dict[str, np.ndarray] | None:
        """Ask one site at a time to decrypt, flood and return the final model.

        Sites that trained in the last round are asked first (they are up and hold the
        key); one valid reply ends the step. Asking one site rather than all matters:
        every release carries fresh flooding noise, and many copies would average it
        away (each site also answers once per study). Returns None when there is no sum
        or no site released it.
        """
        if self.aggregate is None:
            return None
        config = ConfigRecord({**self.strategy.extra_config, SERVER_ROUND: final_round,
                               KIND: QueryKind.RELEASE, RELEASE: True})
        nodes = [*self.trained_nodes]
        nodes += [n for n in sorted(grid.get_node_ids()) if n not in nodes]
        for node in nodes:
            content = RecordDict({CONFIG: config, CKKS: self.ckks_record()})
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
            return None, SiteRound(site=f"node {node}", status=Status.FAILED, reason="no reply")
        msg = replies[0]
        if msg.has_error():
            reason = str(msg.error.reason)[:300]
            return None, SiteRound(site=f"node {node}", status=Status.FAILED, reason=reason)
        name, reply = SiteReply.from_content(msg.content)
        entry = SiteRound(site=name or f"node {node}", status=reply.status,
                          epsilon=reply.metrics.get(EPSILON), problems=reply.problems)
        if entry.status != Status.RELEASED:
            entry.reason = "; ".join(entry.problems) or "did not release"
            return None, entry
        ctx = RoundContext({}, self._reference(), [])
        reason = ClearUpdate().check(msg.content, entry.site, ctx)
        if reason:
            entry.status, entry.reason = Status.REFUSED, reason
            return None, entry
        return {k: v.numpy() for k, v in msg.content[ARRAYS].items()}, entry

    def _reference(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {k: (tuple(shape), dtype) for k, shape, dtype in
                zip(self.layout.keys, self.layout.shapes, self.layout.dtypes, strict=True)}


def make_secure_strategy(
    name: str,
    *,
    min_sites: int,
    proximal_mu: float,
    extra_config: dict[str, Any],
    public_ctx: ts.Context,
    layout: StateLayout,
    aggregate: list[bytes] | None = None,
    aggregate_round: int = 0,
    **site_aware: Any,
) -> SecureAggregation:
    """The study's strategy wrapped for encryption, refusing a non-linear one with the
    reason why (its aggregate is not a sum the coordinator could form on ciphertexts)."""
    problem = check_strategy(name, SECURE_AGGREGATION[1])
    if problem:
        raise ConfigError(problem)
    inner = make_strategy(
        name,
        min_sites=min_sites,
        proximal_mu=proximal_mu,
        extra_config=extra_config,
        guards=encrypted_guards(public_ctx, layout),
        weights_in_clear=False,
        **site_aware,
    )
    return SecureAggregation(inner, public_ctx, layout, aggregate=aggregate,
                             aggregate_round=aggregate_round)


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
