"""Every question the coordinator asks the sites waits for replies here, promptly.

Flower 1.41's ``Grid.send_and_receive`` on a deployment (``HttpGrid``) looks for replies
every 3 s, a fixed wait that is not a setting: a site that answers in 1 s is heard after
3. The ServerApp wraps its grid in :class:`PromptGrid` once, at the start of a study, so
that every ask (Flower's own training loop in ``Strategy.start``, the quantile-grid
query, the marginal studies, the encrypted release, federated validation) goes through
one loop over the Grid's public ``push_messages`` / ``pull_messages``, looking again
after ``REPLY_POLL_FIRST_S`` and backing off to ``REPLY_POLL_MAX_S`` (common/protocol.py):
a short round is heard within a fraction of a second, a long one costs the SuperLink
two small requests a second at most.

The timeout means what it means in Flower: ``None`` waits for every reply; a number
stops looking after that many seconds and returns the replies that came. A message the
SuperLink refused to take (its id is ``None``) can never be answered, so it is not
waited for. Nothing here reads or changes a message: what is sent and received is
exactly what Flower's method would send and receive.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from ..common.protocol import REPLY_POLL_FIRST_S, REPLY_POLL_GROWTH, REPLY_POLL_MAX_S
from .wrapped_grid import WrappedGrid


def ask(grid: Grid, messages: Iterable[Message], timeout: float | None) -> list[Message]:
    """Send ``messages`` and collect their replies, looking again with a short back-off."""
    pending = {mid for mid in grid.push_messages(messages) if mid is not None}
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    wait = REPLY_POLL_FIRST_S
    while pending:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(wait, left))
        else:
            time.sleep(wait)
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        wait = min(wait * REPLY_POLL_GROWTH, REPLY_POLL_MAX_S)
    return replies


class PromptGrid(WrappedGrid):
    """A Grid that passes everything to Flower's and answers ``send_and_receive`` with
    :func:`ask`."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return ask(self.inner, messages, timeout)
