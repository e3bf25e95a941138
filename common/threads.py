"""How many CPU threads a site's torch may use: one, unless the site says so.

fedsynth's networks are small (thousands to about a million parameters, batches of a
few hundred rows). On such work a second intra-op thread saves little, and when several
processes share a machine (simulated sites, a SuperNode next to other services, Flower
starting a ClientApp process per message) every extra thread competes for the same
cores: measured on a loaded 2-core machine, a site's round took 9.5-24 s with torch's
default two threads and 0.7-1.3 s with one (docs/benchmark.md). So:

- a simulated site (in-process or Ray engine) trains with one torch thread;
- a deployed site uses ``torch-threads`` from its node config, else the environment
  variable ``FEDSYNTH_TORCH_THREADS``, else 1; never more than the cores the process
  may run on (``os.sched_getaffinity``). docs/deployment.md says when to raise it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

#: Node-config key and environment variable a site sets its thread count with.
NODE_KEY = "torch-threads"
ENV_VAR = "FEDSYNTH_TORCH_THREADS"
DEFAULT_THREADS = 1


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers restrict)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def site_threads(node_config: dict[str, Any] | None = None) -> int:
    """The site's thread count: node config, then environment, then 1; capped by cores.

    A value that is not a positive integer is a configuration error, named as such.
    """
    node = node_config or {}
    raw: Any = node.get(NODE_KEY, os.environ.get(ENV_VAR, DEFAULT_THREADS))
    try:
        n = int(raw)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or (isinstance(raw, float) and raw != n):
        source = NODE_KEY if NODE_KEY in node else ENV_VAR
        raise ValueError(f"{source} must be a positive integer (threads), got {raw!r}")
    return min(n, available_cores())


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the caller's setting.

    A context, not a process-wide switch: in the in-process engine the coordinator's
    own work (validation, sampling) shares the process with the sites."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
