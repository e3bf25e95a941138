"""Flower strategies that know about sites: who trained, who stopped, and why.

Flower's FedAvg and FedProx expect every reply to carry weights. A fedsynth site may
instead reply that its budget is spent or its table failed the schema check; those
replies are logged per site and left out of the average, and the study goes on with
the others. Replies that do carry weights are checked before they are averaged in
(keys, shapes, finite values, a plausible epsilon); a bad one is refused with a reason
that names the site, never averaged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

log = logging.getLogger("fedsynth.coordinator")


@dataclass
class SiteRound:
    site: str
    status: str
    epsilon: float | None = None
    loss: float | None = None
    weight: float | None = None
    problems: list[str] = field(default_factory=list)
    reason: str = ""


@dataclass
class RoundLog:
    round: int
    sites: list[SiteRound] = field(default_factory=list)
    aggregated: bool = True

    @property
    def included(self) -> list[str]:
        return [s.site for s in self.sites if s.status == "trained"]


class SiteAwareMixin:
    """Splits replies into trained / not trained, validates, keeps a per-site log."""

    round_offset: int = 0
    min_round_sites: int = 1
    reference: dict[str, tuple[tuple[int, ...], str]] | None = None
    on_round: Callable[[RoundLog], None] | None = None
    # False when "num-examples" is a public constant and the real weights travel
    # encrypted: the round log must then not present the constant as a row count.
    weights_in_clear: bool = True

    def init_site_aware(self, extra_config: dict[str, Any], round_offset: int = 0) -> None:
        self.extra_config = extra_config
        self.round_offset = round_offset
        self.history: list[RoundLog] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.reference is None:
            self.reference = {k: (tuple(v.shape), v.dtype) for k, v in arrays.items()}
        config = ConfigRecord({**dict(config), **self.extra_config})
        messages = list(
            super().configure_train(  # type: ignore[misc]
                server_round + self.round_offset, arrays, config, grid
            )
        )
        # Remember who each message went to: an error reply (a site that crashed or
        # timed out) comes from the SuperLink, not from the site, and must still be
        # logged under the site's name.
        # (The grid stamps each message's id when it pushes it, so keep the objects.)
        self.sent_messages = messages
        return messages

    def _site_of_error(self, msg: Message) -> str:
        sent = {m.metadata.message_id: m.metadata.dst_node_id
                for m in getattr(self, "sent_messages", [])}
        node = sent.get(msg.metadata.reply_to_message_id)
        if node is None:
            return "unknown site"
        return getattr(self, "node_names", {}).get(node, f"node {node}")

    def _check_reply(self, content: Any, site: str) -> str:
        """Why a reply with weights must be refused, or '' if it may be averaged."""
        return self._check_update(content, site) or self._check_metrics(content)

    def _check_update(self, content: Any, site: str) -> str:
        """Why the reply's model update cannot be averaged in, or ''."""
        arrays = content.get("arrays") if "arrays" in content else None
        if not isinstance(arrays, ArrayRecord):
            return "no model arrays in a 'trained' reply"
        ref = self.reference or {}
        keys = set(arrays.keys())
        if keys != set(ref):
            missing, extra = sorted(set(ref) - keys), sorted(keys - set(ref))
            return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})"
        for key, arr in arrays.items():
            if tuple(arr.shape) != ref[key][0]:
                return f"array {key!r} has shape {tuple(arr.shape)}, expected {ref[key][0]}"
            if not np.all(np.isfinite(arr.numpy())):
                return f"array {key!r} holds NaN or infinite values"
        return ""

    def _check_weight(self, weight: Any) -> str:
        """Why the reply's FedAvg weight ("num-examples") is unusable, or ''."""
        if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            return f"impossible row count {weight!r}"
        return ""

    def _check_metrics(self, content: Any) -> str:
        """Why the reply's metrics (weight, epsilon) are unusable, or ''."""
        metrics = content.get("metrics") if "metrics" in content else None
        if not isinstance(metrics, MetricRecord):
            return "no metrics record"
        weight_problem = self._check_weight(metrics.get("num-examples"))
        if weight_problem:
            return weight_problem
        eps = metrics.get("epsilon")
        if not isinstance(eps, int | float) or not math.isfinite(eps) or (eps < 0 and eps != -1):
            return f"missing or impossible epsilon {eps!r}"
        return ""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record = RoundLog(round=server_round + self.round_offset)
        usable: list[Message] = []
        for msg in replies:
            if msg.has_error():
                site = self._site_of_error(msg)
                reason = str(msg.error.reason)[:300]
                log.warning("round %d: no reply from %s: %s", record.round, site, reason)
                record.sites.append(SiteRound(site=site, status="failed", reason=reason))
                continue
            content = msg.content
            info = dict(content["site"]) if "site" in content else {}
            name = str(info.get("name", f"node {msg.metadata.src_node_id}"))
            if not hasattr(self, "node_names"):
                self.node_names: dict[int, str] = {}
            self.node_names[msg.metadata.src_node_id] = name
            status = str(info.get("status", "unknown"))
            metrics = dict(content["metrics"]) if "metrics" in content else {}
            eps = metrics.get("epsilon")
            entry = SiteRound(
                site=name,
                status=status,
                epsilon=float(eps) if isinstance(eps, int | float) else None,
                problems=[str(p) for p in info.get("problems", [])],
            )
            if status == "trained":
                reason = self._check_reply(content, name)
                if reason:
                    entry.status = "refused"
                    entry.reason = reason
                    log.warning("round %d: refused the reply of %s: %s", record.round, name,
                                reason)
                else:
                    entry.loss = float(metrics.get("loss", math.nan))
                    if self.weights_in_clear:
                        entry.weight = float(metrics["num-examples"])
                    usable.append(msg)
            else:
                log.warning(
                    "round %d: site %s did not train (%s)%s",
                    record.round,
                    name,
                    status,
                    "".join(f"\n    - {p}" for p in entry.problems),
                )
            record.sites.append(entry)
        self.history.append(record)
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
            return None, None
        return self._aggregate(server_round, usable)

    def _aggregate(
        self, server_round: int, usable: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Combine the accepted replies: Flower's own weighted average, in clear."""
        return super().aggregate_train(server_round, usable)  # type: ignore[misc]


class SiteAwareFedAvg(SiteAwareMixin, FedAvg):
    """FedAvg over the sites that trained this round, weighted by their DP row counts."""


class SiteAwareFedProx(SiteAwareMixin, FedProx):
    """FedProx; sites add the proximal term after DP noising (see the trainer)."""


STRATEGY_CLASSES: dict[str, type[SiteAwareMixin]] = {
    "fedavg": SiteAwareFedAvg,
    "fedprox": SiteAwareFedProx,
}


def make_strategy(
    name: str,
    *,
    num_sites: int,
    min_sites: int,
    proximal_mu: float,
    extra_config: dict[str, Any],
    round_offset: int = 0,
    classes: dict[str, type[SiteAwareMixin]] | None = None,
) -> SiteAwareMixin:
    """The study's strategy; ``classes`` swaps in other implementations (encrypted ones)."""
    classes = STRATEGY_CLASSES if classes is None else classes
    common = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": min_sites,
        "min_available_nodes": min_sites,
        "train_metrics_aggr_fn": _site_metrics,
    }
    if name not in classes:
        raise ValueError(f"unknown strategy {name!r}")
    extra = {"proximal_mu": proximal_mu} if name == "fedprox" else {}
    strategy = classes[name](**common, **extra)  # type: ignore[call-arg]
    strategy.init_site_aware(extra_config, round_offset)
    strategy.min_round_sites = min_sites
    return strategy


def _site_metrics(records: list[Any], weight_key: str) -> MetricRecord:
    """Round metrics across sites: the worst epsilon matters, not a weighted mean of them."""
    eps = [float(r["metrics"]["epsilon"]) for r in records]
    loss = [float(r["metrics"]["loss"]) for r in records]
    return MetricRecord(
        {
            "max-epsilon": max(eps),
            "mean-loss": float(np.mean(loss)),
            "sites-trained": len(records),
        }
    )
