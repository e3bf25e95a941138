"""Federated studies in this process: the real ServerApp code and ClientApp, no Ray.

A benchmark runs dozens of federated studies; Flower's Ray simulation costs 25-50 s
to start each one. Here the coordinator's own ``server.app.run_study`` (site-aware
strategy, checkpoints, encrypted release, sampling, summary) drives the sites'
own ``client.app`` ClientApp through :class:`InProcessGrid`, a Flower ``Grid`` that
hands each message to the destination node's ClientApp in this process, with one
Flower ``Context`` per node kept for the whole study (so each site's privacy ledger
lives in ``context.state`` exactly as in the Ray simulation). What differs from
``fedsynth simulate``: sites train one after another instead of in parallel, and
messages are not copied through a SuperLink. Each message is serialised with Flower's
own protobuf serde, as on the wire, to count the bytes it would take.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from ..client.app import make_client_app
from ..common.study import SiteConfig, StudyConfig
from ..server.app import StudyOutcome, resolve_schema, run_study
from ..server.strategy import RoundLog

COORDINATOR_NODE = SUPERLINK_NODE_ID


@dataclass
class RoundTraffic:
    """What crossed the (simulated) network in one round, in serialised bytes."""

    round: int
    to_sites: int = 0  # coordinator -> sites, all messages of the round
    to_coordinator: int = 0  # sites -> coordinator
    messages: int = 0
    seconds: float = 0.0  # wall time of the round's send_and_receive

    @property
    def total(self) -> int:
        return self.to_sites + self.to_coordinator


@dataclass
class _Run:
    """The minimal run object strategies read (``grid.run.run_id``)."""

    run_id: int = 1


class InProcessGrid(Grid):
    """A Flower Grid whose nodes are ClientApps called in this process, one at a time."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict) -> None:
        self.client_app = client_app
        self._run = _Run()
        self.contexts = {
            i + 1: Context(
                run_id=self._run.run_id,
                node_id=i + 1,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=run_config,
            )
            for i in range(num_nodes)
        }
        self.traffic: list[RoundTraffic] = []
        self._replies: dict[str, Message] = {}

    # -- Grid interface -------------------------------------------------------------
    def set_run(self, run: object) -> None:  # the run is fixed here
        return None

    @property
    def run(self) -> _Run:  # type: ignore[override]
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        record = self._current_traffic()
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            msg.metadata.__dict__["_src_node_id"] = COORDINATOR_NODE
            record.to_sites += wire_bytes(msg)
            reply = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
            record.to_coordinator += wire_bytes(reply)
            record.messages += 2
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages:  # the strategy's evaluate step, with fraction_evaluate = 0
            return []
        start = time.perf_counter()
        self.traffic.append(RoundTraffic(round=len(self.traffic) + 1))
        replies = list(self.pull_messages(self.push_messages(messages)))
        self.traffic[-1].seconds = time.perf_counter() - start
        return replies

    def _current_traffic(self) -> RoundTraffic:
        if not self.traffic:
            self.traffic.append(RoundTraffic(round=1))
        return self.traffic[-1]


def wire_bytes(message: Message) -> int:
    """The message's size as Flower serialises it for the network (protobuf)."""
    return int(message_to_proto(message).ByteSize())


@dataclass
class InProcessResult:
    outcome: StudyOutcome
    traffic: list[RoundTraffic] = field(default_factory=list)
    contexts: dict[int, Context] = field(default_factory=dict)

    @property
    def train_traffic(self) -> list[RoundTraffic]:
        """The training rounds only (an encrypted study adds one release exchange)."""
        return self.traffic[: len(self.outcome.history)]


@contextmanager
def coordinator_identity(run_id: int) -> Iterator[None]:
    """Inside: the process's task identity is the coordinator's, as Flower's own runtime
    sets it before it runs a ServerApp (messages take their run and source node from
    it); the identity before is restored on the way out."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = COORDINATOR_NODE
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def run_inprocess(
    study: StudyConfig,
    sites: list[SiteConfig],
    on_round: Callable[[RoundLog], None] | None = None,
) -> InProcessResult:
    """Run a whole study with the real coordinator and site code, in this process."""
    grid = InProcessGrid(make_client_app(sites), len(sites), study.to_flat())
    with coordinator_identity(grid.run.run_id):
        outcome = run_study(grid, study, resolve_schema(study.schema), on_round)
    return InProcessResult(outcome, grid.traffic, grid.contexts)
