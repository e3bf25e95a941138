"""What a test needs to hand Flower messages to an app outside a Flower run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity


@contextmanager
def task_identity(task: int = 3, run: int = 7, node: int = 1) -> Iterator[None]:
    """Flower stamps messages with the process's run and node; set them as a run would."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task, run, node
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def stamp(message: Message) -> Message:
    """Give a message the id the SuperLink gives it when it is pushed."""
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


class RecordingGrid:
    """The coordinator's Grid, with every message it sends and receives kept for the test."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.sent.extend(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.received.extend(replies)
        return replies


def run_recorded(study: Any, sites: list[Any], schema: str) -> tuple[Any, RecordingGrid]:
    """A whole study through the real ServerApp and ClientApp code in process (no Ray),
    every message kept: the coordinator's view, for tests that play it."""
    from fedsynth.client.app import make_client_app
    from fedsynth.server.app import resolve_schema, run_study
    from fedsynth.simulations.benchmark_inprocess import InProcessGrid, coordinator_identity

    grid = RecordingGrid(InProcessGrid(make_client_app(sites), len(sites), study.to_flat()))
    with coordinator_identity(grid.run.run_id):
        outcome = run_study(grid, study, resolve_schema(schema))
    return outcome, grid
