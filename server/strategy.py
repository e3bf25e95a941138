"""Flower strategies that know about sites: who trained, who stopped, and why.

Flower's FedAvg and FedProx expect every reply to carry weights. A fedsynth site may
instead reply that its budget is spent or its table failed the schema check; those
replies are logged per site and left out of the average, and the study goes on with
the others. Replies that do carry weights are checked before they are averaged in
(keys, shapes, finite values, an update no larger than local training can make, a
plausible epsilon); a bad one is refused with a reason that names the site, never
averaged. A site that does not answer within the round's timeout is logged by name as
failed, and the round goes on with the replies that arrived.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from .optimizer import ServerMomentum

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
    # Per array, the largest change of any one coordinate an honest round can make
    # (see ``update_bounds``); None: not checked.
    max_update: dict[str, float] | None = None
    # A server step on the averaged update (FedAvgM; post-processing, free privacy-wise);
    # None: the average is the next global model, as in plain FedAvg.
    server_opt: ServerMomentum | None = None
    # Keys that take the sites' average as it is (frequency buffers, step counters).
    plain_keys: frozenset[str] = frozenset()

    def init_site_aware(self, extra_config: dict[str, Any], round_offset: int = 0) -> None:
        self.extra_config = extra_config
        self.round_offset = round_offset
        self.history: list[RoundLog] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.reference is None:
            self.reference = {k: (tuple(v.shape), v.dtype) for k, v in arrays.items()}
        # What the sites start from this round: an update is measured against it.
        self.sent_arrays = {k: v.numpy() for k, v in arrays.items()}
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
        return (
            self._check_update(content, site)
            or self._check_update_size(content)
            or self._check_metrics(content)
            or self._check_epsilon(content, site)
        )

    def _check_update_size(self, content: Any) -> str:
        """Why the update is larger than local training can make it, or ''.

        Sites train with Adam (through Opacus' DP optimizer): whatever the clipped and
        noised gradient, Adam moves one coordinate by at most a few times its learning
        rate per step, so ``max_update`` bounds an honest round's change of any
        coordinate. A larger change did not come from the study's training.
        """
        sent = getattr(self, "sent_arrays", None)
        if self.max_update is None or not self.weights_in_clear or not sent:
            return ""
        for key, arr in content["arrays"].items():
            change = float(np.max(np.abs(arr.numpy() - sent[key]), initial=0.0))
            bound = self.max_update.get(key, math.inf)
            # a counter buffer (the GAN's EMA step count) moves by exactly its bound, and
            # a DP-count-weighted average of the sites' counters is not exact in float32
            if change > bound * (1 + 1e-5) + 1e-6:
                return (
                    f"update too large: array {key!r} moved by {change:.3g}, more than the "
                    f"{bound:.3g} that local training with this plan can move it"
                )
        return ""

    def _check_epsilon(self, content: Any, site: str) -> str:
        """Why the reported epsilon is impossible for this site, or ''.

        A site's epsilon composes over the study: it never goes down, and it never
        exceeds the budget the site declares (``epsilon-budget``: its own policy, no
        statistic of its rows). Both figures are the site's own, so this catches a site
        whose accounting is broken, not one that lies; the guarantee itself rests on
        each site's ledger. A reply without a declared budget is checked for the rest.
        """
        metrics = content["metrics"]
        eps = float(metrics["epsilon"])
        if eps == -1:  # a no-DP baseline site: it claims no guarantee
            return ""
        budget = metrics.get("epsilon-budget", math.inf)
        if not isinstance(budget, int | float) or math.isnan(budget) or budget <= 0:
            return f"impossible epsilon-budget {budget!r}"
        if eps > budget * (1 + 1e-9):
            return f"epsilon {eps:.6g} above the site's budget {budget:.6g}"
        previous = self.last_epsilon().get(site)
        if previous is not None and eps < previous * (1 - 1e-9):
            return f"epsilon {eps:.6g} lower than the {previous:.6g} this site reported before"
        return ""

    def last_epsilon(self) -> dict[str, float]:
        """Each site's latest epsilon among its accepted, trained replies (study history)."""
        last: dict[str, float] = {}
        for record in self.history:
            for entry in record.sites:
                if entry.status == "trained" and entry.epsilon is not None:
                    last[entry.site] = entry.epsilon
        return last

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
        replies = list(replies)
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
        for site in self._silent_sites(replies):
            reason = "no reply within the round's timeout (round-timeout)"
            log.warning("round %d: no reply from %s: %s", record.round, site, reason)
            record.sites.append(SiteRound(site=site, status="failed", reason=reason))
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
            return None, None
        return self._aggregate(server_round, usable)

    def _name_earlier_failures(self) -> None:
        """Put a site's name on the failures logged under its node id before it was known.

        A site that crashes before it ever answered is known only by its node id; once
        it rejoins and replies, its earlier failures are listed under its name.
        """
        names = {f"node {node}": name for node, name in getattr(self, "node_names", {}).items()}
        for past in self.history:
            for entry in past.sites:
                if entry.status == "failed" and entry.site in names:
                    entry.site = names[entry.site]

    def _silent_sites(self, replies: list[Message]) -> list[str]:
        """The sites asked this round whose reply (or error) never came back."""
        answered = {m.metadata.reply_to_message_id for m in replies}
        names = getattr(self, "node_names", {})
        return [
            names.get(m.metadata.dst_node_id, f"node {m.metadata.dst_node_id}")
            for m in getattr(self, "sent_messages", [])
            if m.metadata.message_id not in answered
        ]

    def _aggregate(
        self, server_round: int, usable: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Combine the accepted replies: Flower's own weighted average, in clear, then the
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


# Adam's step on one coordinate is lr * m_hat / (sqrt(v_hat) + eps). With any betas
# where beta1**2 < beta2 (Flower's and torch's defaults, and the GAN's (0.5, 0.9)),
# |m_hat / sqrt(v_hat)| stays below (1 - beta1) / sqrt((1 - beta2) (1 - beta1**2 / beta2))
# after bias correction: 7.3 at (0.9, 0.999). Ten leaves room for that worst case.
ADAM_STEP_FACTOR = 10.0


def update_bounds(
    networks: dict[str, Any], hparams: dict[str, Any], local_epochs: int, sample_rate: float
) -> dict[str, float]:
    """Per state-dict key, the largest change of one coordinate an honest round can make.

    A round is ``local_epochs`` passes of ``ceil(1 / sample_rate)`` Poisson batches; each
    batch is one step of every optimizer the generator uses (``g_steps`` generator steps
    for a GAN). A trained parameter moves by at most ``ADAM_STEP_FACTOR`` times the
    largest learning rate in the generator's settings per step. Buffers are not trained
    by an optimizer: frequencies stay in [0, 1] and step counters grow by one per step,
    so their bound is the larger of 1 and the number of steps.
    """
    rates = [float(v) for k, v in hparams.items()
             if (k == "lr" or k.endswith("_lr")) and isinstance(v, int | float)]
    steps = local_epochs * math.ceil(1.0 / sample_rate) * max(1, int(hparams.get("g_steps", 1)))
    trained = max(1e-12, ADAM_STEP_FACTOR * max(rates, default=1e-3) * steps)
    bounds: dict[str, float] = {}
    for prefix, net in networks.items():
        params = {name for name, _ in net.named_parameters()}
        for key in net.state_dict():
            bounds[f"{prefix}.{key}"] = trained if key in params else max(1.0, float(steps))
    return bounds


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
