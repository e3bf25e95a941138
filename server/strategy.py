"""Flower strategies that know about sites: who trained, who stopped, and why.

Flower's FedAvg and FedProx expect every reply to carry weights. A fedsynth site may
instead reply that its budget is spent or its table failed the schema check; those
replies are logged per site and left out of the average, and the study goes on with
the others. Replies that do carry weights pass the strategy's guards before they are
averaged in (``server/guards.py``: keys, shapes, finite values, an update no larger
than local training can make, a plausible epsilon); a bad one is refused with a reason
that names the site, never averaged. A site that does not answer within the round's
timeout is logged by name as failed, and the round goes on with the replies that
arrived.

Everything a strategy needs is a constructor argument (guards, server optimizer, round
callback, the history a resumed study starts from), in Flower's own shape: a
``SiteAwareFedAvg`` is a ``FedAvg``. Encryption wraps a strategy
(``server/secure.py``), the way Flower wraps one for DP.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from ..common.protocol import (
    EPSILON,
    LOSS,
    METRICS,
    NUM_EXAMPLES,
    SiteReply,
    Status,
)
from .guards import ReplyGuard, RoundContext, clear_guards, update_bounds
from .optimizer import ServerMomentum
from .rounds import RoundLog, SiteRound, last_epsilon, site_round

log = logging.getLogger("fedsynth.coordinator")

__all__ = ["RoundLog", "SiteAwareFedAvg", "SiteAwareFedProx", "SiteRound", "make_strategy",
           "update_bounds"]


class SiteAware:
    """The site-aware part of a strategy; mixed in before a Flower strategy class.

    ``guards`` check each trained reply; ``server_optimizer`` takes a step on the
    average (FedAvgM's momentum, post-processing of DP releases; None: plain FedAvg),
    skipping ``plain_keys`` (frequency buffers, step counters, which take the sites'
    average as it is); ``on_round`` is told each round's log; ``round_offset`` and
    ``history`` continue a resumed study; ``extra_config`` goes to every site with its
    round. Flower's own arguments pass through.
    """

    def __init__(
        self,
        *,
        extra_config: dict[str, Any],
        guards: list[ReplyGuard] | None = None,
        server_optimizer: ServerMomentum | None = None,
        plain_keys: frozenset[str] = frozenset(),
        on_round: Callable[[RoundLog], None] | None = None,
        round_offset: int = 0,
        history: list[RoundLog] | None = None,
        min_round_sites: int = 1,
        weights_in_clear: bool = True,
        **flower: Any,
    ) -> None:
        super().__init__(**flower)
        self.extra_config = extra_config
        self.guards = clear_guards(None) if guards is None else guards
        self.server_opt = server_optimizer
        self.plain_keys = plain_keys
        self.on_round = on_round
        self.round_offset = round_offset
        self.history: list[RoundLog] = [] if history is None else history
        self.min_round_sites = min_round_sites
        # False when "num-examples" is a public constant and the real weights travel
        # encrypted: the round log must then not present the constant as a row count.
        self.weights_in_clear = weights_in_clear
        self.reference: dict[str, tuple[tuple[int, ...], str]] = {}
        self.sent_arrays: dict[str, np.ndarray] = {}
        self.sent_messages: list[Message] = []
        self.node_names: dict[int, str] = {}

    # -------------------------------------------------------------------- asking

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.reference:
            self.reference = {k: (tuple(v.shape), v.dtype) for k, v in arrays.items()}
        # What the sites start from this round: an update is measured against it.
        self.sent_arrays = {k: v.numpy() for k, v in arrays.items()}
        config = ConfigRecord({**dict(config), **self.extra_config})
        # Remember who each message went to: an error reply (a site that crashed or
        # timed out) comes from the SuperLink, not from the site, and must still be
        # logged under the site's name. (The grid stamps each message's id when it
        # pushes it, so keep the objects.)
        self.sent_messages = list(
            super().configure_train(  # type: ignore[misc]
                server_round + self.round_offset, arrays, config, grid
            )
        )
        return self.sent_messages

    # -------------------------------------------------------------------- answers

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        usable = self.accept(server_round, replies)
        if usable is None:
            return None, None
        return self._average(server_round, usable)

    def accept(self, server_round: int, replies: Iterable[Message]) -> list[Message] | None:
        """Log every site's answer, check the trained ones; the replies to aggregate, or
        None when fewer than ``min_round_sites`` passed (the model is then kept)."""
        record = RoundLog(round=server_round + self.round_offset)
        usable: list[Message] = []
        replies = list(replies)
        ctx = RoundContext(self.sent_arrays, self.reference, self.history)
        for msg in replies:
            entry = self._log_reply(msg, record.round)
            if entry.status == Status.TRAINED:
                reason = self.check(msg, entry.site, ctx)
                if reason:
                    entry.status, entry.reason = Status.REFUSED, reason
                    log.warning("round %d: refused the reply of %s: %s", record.round,
                                entry.site, reason)
                else:
                    metrics = msg.content[METRICS]
                    entry.loss = float(metrics.get(LOSS, math.nan))
                    if self.weights_in_clear:
                        entry.weight = float(metrics[NUM_EXAMPLES])
                    usable.append(msg)
            record.sites.append(entry)
        for site in self._silent_sites(replies):
            reason = "no reply within the round's timeout (round-timeout)"
            log.warning("round %d: no reply from %s: %s", record.round, site, reason)
            record.sites.append(SiteRound(site=site, status=Status.FAILED, reason=reason))
        self.history.append(record)
        self._name_earlier_failures()
        if self.on_round is not None:
            self.on_round(record)
        if len(usable) < max(1, self.min_round_sites):
            # Too few sites this round: keep the previous global model rather than let
            # one or two hospitals stand for the federation.
            if usable:
                log.warning(
                    "round %d: only %d site(s) trained, fewer than min-sites %d; the global "
                    "model is kept as it was", record.round, len(usable), self.min_round_sites
                )
            record.aggregated = False
            return None
        # In node order, not arrival order (Flower samples the nodes of a round in a
        # random order): the float sums of the average then repeat run to run.
        return sorted(usable, key=lambda m: m.metadata.src_node_id)

    def check(self, msg: Message, site: str, ctx: RoundContext) -> str:
        """The first guard's reason to refuse a trained reply, or ''."""
        for guard in self.guards:
            reason = guard.check(msg.content, site, ctx)
            if reason:
                return reason
        return ""

    def last_epsilon(self) -> dict[str, float]:
        """Each site's latest epsilon among its accepted, trained replies (study history)."""
        return last_epsilon(self.history)

    def _log_reply(self, msg: Message, round_no: int) -> SiteRound:
        """A reply (or the SuperLink's error in a site's place) as a log entry."""
        if msg.has_error():
            site = self._site_of_error(msg)
            reason = str(msg.error.reason)[:300]
            log.warning("round %d: no reply from %s: %s", round_no, site, reason)
            return SiteRound(site=site, status=Status.FAILED, reason=reason)
        name, reply = SiteReply.from_content(msg.content)
        name = name or f"node {msg.metadata.src_node_id}"
        self.node_names[msg.metadata.src_node_id] = name
        entry = site_round(name, reply)
        if reply.status != Status.TRAINED:
            log.warning("round %d: site %s did not train (%s)%s", round_no, name, reply.status,
                        "".join(f"\n    - {p}" for p in entry.problems))
        return entry

    def _site_of_error(self, msg: Message) -> str:
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent_messages}
        node = sent.get(msg.metadata.reply_to_message_id)
        if node is None:
            return "unknown site"
        return self.node_names.get(node, f"node {node}")

    def _name_earlier_failures(self) -> None:
        """Put a site's name on the failures logged under its node id before it was known.

        A site that crashes before it ever answered is known only by its node id; once
        it rejoins and replies, its earlier failures are listed under its name.
        """
        names = {f"node {node}": name for node, name in self.node_names.items()}
        for past in self.history:
            for entry in past.sites:
                if entry.status == Status.FAILED and entry.site in names:
                    entry.site = names[entry.site]

    def _silent_sites(self, replies: list[Message]) -> list[str]:
        """The sites asked this round whose reply (or error) never came back."""
        answered = {m.metadata.reply_to_message_id for m in replies}
        return [
            self.node_names.get(m.metadata.dst_node_id, f"node {m.metadata.dst_node_id}")
            for m in self.sent_messages
            if m.metadata.message_id not in answered
        ]

    # -------------------------------------------------------------------- averaging

    def _average(
        self, server_round: int, usable: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's own weighted average of the accepted replies, in clear, then the
        server step (momentum) when the study has one.

        The average comes back in the model's own dtypes (Flower's turns an integer
        buffer into float64): the global model sent next round is then exactly the one
        a resumed coordinator reloads from its checkpoint, which is what lets a site
        recognise a round it already trained (client/replay.py).
        """
        arrays, metrics = super().aggregate_train(server_round, usable)  # type: ignore[misc]
        if arrays is None or not self.reference:
            return arrays, metrics
        cast = {}
        for key, arr in arrays.items():
            value, dtype = arr.numpy(), np.dtype(self.reference[key][1])
            if np.issubdtype(dtype, np.integer):
                value = np.rint(value)
            cast[key] = np.asarray(value, dtype=dtype)
        if self.server_opt is not None:
            cast = self.server_opt.step(self.sent_arrays, cast, self.plain_keys)
        return ArrayRecord({k: Array(v) for k, v in cast.items()}), metrics


class SiteAwareFedAvg(SiteAware, FedAvg):
    """FedAvg over the sites that trained this round, weighted by their DP row counts."""


class SiteAwareFedProx(SiteAware, FedProx):
    """FedProx; sites add the proximal term after DP noising (see the trainer)."""


STRATEGY_CLASSES: dict[str, type[SiteAware]] = {
    "fedavg": SiteAwareFedAvg,
    "fedprox": SiteAwareFedProx,
}


def make_strategy(
    name: str,
    *,
    min_sites: int,
    proximal_mu: float,
    extra_config: dict[str, Any],
    **site_aware: Any,
) -> SiteAware:
    """The study's strategy with Flower's settings for it; ``site_aware`` are
    :class:`SiteAware`'s own arguments (guards, server_optimizer, history, ...)."""
    if name not in STRATEGY_CLASSES:
        raise ValueError(f"unknown strategy {name!r}")
    flower: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": min_sites,
        "min_available_nodes": min_sites,
        "train_metrics_aggr_fn": _site_metrics,
        "weighted_by_key": NUM_EXAMPLES,
    }
    if name == "fedprox":
        flower["proximal_mu"] = proximal_mu
    return STRATEGY_CLASSES[name](
        extra_config=extra_config, min_round_sites=min_sites, **site_aware, **flower
    )


def _site_metrics(records: list[Any], weight_key: str) -> MetricRecord:
    """Round metrics across sites: the worst epsilon matters, not a weighted mean of them."""
    eps = [float(r[METRICS][EPSILON]) for r in records]
    loss = [float(r[METRICS][LOSS]) for r in records]
    return MetricRecord(
        {
            "max-epsilon": max(eps),
            "mean-loss": float(np.mean(loss)),
            "sites-trained": len(records),
        }
    )
