"""The coordinator's side of federated validation: send the released model (and the
size and seed of synthetic.csv) to every site, collect the sites' scores, combine them
into study figures.

No real row reaches the coordinator: each site replies with scores of the synthetic
data and the DP row count it released in training (``client/evaluate.py``). How each
figure combines (exactly, approximately, or not at all) is decided in
``common.validation.federated.RULES``; this module only moves messages and writes the
result.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..common.protocol import SiteReply, Status, ValidationRequest
from ..common.validation.federated import FederatedValidation, combine
from ..common.validation.report import write_federated_report

log = logging.getLogger("fedsynth.coordinator")

FEDERATED_JSON = "federated_validation.json"
FEDERATED_CSV = "federated_validation.csv"
FEDERATED_HTML = "federated_validation.html"


def evaluate_content(
    model_state: Mapping[str, np.ndarray], rows: int, seed: int, config: Mapping[str, Any]
) -> RecordDict:
    """The message a site's evaluate handler reads: the study config (with the schema
    fingerprint), the released model and the size and seed of the synthetic table. The
    site samples the table itself (it is synthetic.csv, row for row): it scores no table
    the coordinator made up (``client/evaluate.py``)."""
    return ValidationRequest(
        config=dict(config),
        arrays={k: np.asarray(v) for k, v in model_state.items()},
        rows=rows,
        seed=seed,
    ).to_content()


def site_figures(contents: Iterable[RecordDict]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Scores per site from the replies' contents, and why each other reply was left out."""
    sites: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    for content in contents:
        name, reply = SiteReply.from_content(content)
        name = name or "unknown site"
        if reply.status != Status.EVALUATED or not reply.metrics:
            problems = "; ".join(reply.problems)
            skipped.append(f"{name}: {reply.status}" + (f" ({problems})" if problems else ""))
            continue
        sites[name] = reply.metrics
    return sites, skipped


def connected_sites(grid: Grid, min_sites: int, wait: float) -> list[int]:
    """The connected node ids, once at least ``min_sites`` are up (or ``wait`` s passed)."""
    deadline = time.monotonic() + wait
    while len(nodes := sorted(grid.get_node_ids())) < min_sites and time.monotonic() < deadline:
        time.sleep(0.5)
    return nodes


def run_federated_validation(
    grid: Grid,
    model_state: Mapping[str, np.ndarray],
    rows: int,
    seed: int,
    config: Mapping[str, Any],
    *,
    min_sites: int = 1,
    wait: float = 600.0,
    timeout: float = 3600.0,
) -> tuple[FederatedValidation | None, list[str]]:
    """Ask every connected site to score the table of ``rows`` rows that the released
    model samples with ``seed``; combine what comes back.

    Waits up to ``wait`` seconds for ``min_sites`` sites to be connected (right after a
    study they all are; a fresh simulation registers its nodes a moment after start).
    Returns the combined figures (None when no site replied with scores) and the list
    of sites left out with their reason.
    """
    nodes = connected_sites(grid, min_sites, wait)
    if len(nodes) < min_sites:
        return None, [f"only {len(nodes)} site(s) connected after {wait:.0f} s; need {min_sites}"]
    messages = [
        Message(
            evaluate_content(model_state, rows, seed, config), dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    contents = []
    skipped = []
    for msg in replies:
        if msg.has_error():
            skipped.append(f"node {msg.metadata.src_node_id}: {str(msg.error.reason)[:300]}")
        else:
            contents.append(msg.content)
    sites, not_evaluated = site_figures(contents)
    skipped += not_evaluated
    for reason in skipped:
        log.warning("federated validation: left out %s", reason)
    return (combine(sites) if sites else None), skipped


def write_federated(result: FederatedValidation, out_dir: str | Path) -> Path:
    """Write the study and per-site figures as CSV (one row per figure), JSON and a
    self-contained HTML page; returns the JSON's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = result.to_frame()
    frame.to_csv(out / FEDERATED_CSV, index=False)
    payload = {"weights": result.weights, "figures": [f.to_dict() for f in result.figures]}
    (out / FEDERATED_JSON).write_text(json.dumps(payload, indent=2, default=str))
    write_federated_report(result, out / FEDERATED_HTML)
    return out / FEDERATED_JSON
