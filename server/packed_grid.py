"""The coordinator's side of the wire format: each ArrayRecord as one packed array.

Flower 1.41 moves every array of a message as objects of their own, one request each
at every hop of a deployment; the drill's TVAE (17 tensors) made training messages of
38 objects, 6 packed (``common/protocol.py``, "on the wire"). :class:`PackedGrid`
packs every message the coordinator sends (``protocol.pack_content``) and unpacks every
reply it receives, so the strategy, guards, checkpoints, momentum, encryption and
validation all see the named arrays, and a site's ClientApp does the same on its side
(``client/app.py``). A reply
whose packed record does not decode loses that record, as if the site had sent none:
the guards then refuse it like any reply without weights.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message

from ..common.protocol import pack_content, unpack_content
from .wrapped_grid import WrappedGrid


def packed(message: Message) -> Message:
    """The message with its array records packed, in place: the grid gives the pushed
    object its id, and the sender (Flower's strategy) matches replies to the ids of the
    message objects it holds."""
    message.content = pack_content(message.content)
    return message


def unpacked(message: Message) -> Message:
    """The reply with its packed records decoded (in place; an error reply as it is)."""
    if message.has_content():
        message.content = unpack_content(message.content, drop_bad=True)
    return message


class PackedGrid(WrappedGrid):
    """A Grid that sends array records packed and reads replies unpacked."""

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages([packed(m) for m in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [unpacked(m) for m in self.inner.pull_messages(message_ids)]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        sent = [packed(m) for m in messages]
        return [unpacked(m) for m in self.inner.send_and_receive(sent, timeout=timeout)]
