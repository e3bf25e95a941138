"""The coordinator's quantile-grid step: before round 1 of a deep generator's study.

Each site is asked once (``query.grid``, client/grid.py) for its noisy histograms of
the numeric columns over their public bounds. The coordinator checks each reply
(status, shape, the site's reported epsilon within its budget), adds the accepted
vectors up, as it adds counts, and derives the study's quantile grid from the sum
and the public noise levels alone (``quantile_grid.grid_from_counts``: post-processing).
The grid goes to the sites inside ``generator-params`` with every training request, and
into the saved model, so training and sampling use the same encoding.

No site's rows or exact counts reach this module: only each site's DP release, whose
noise was drawn from the site's secret randomness.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ..common import quantile_grid
from ..common.generators import Generator
from ..common.generators.base import GRID_PARAM, HEAPS_PARAM
from ..common.protocol import (
    CONFIG,
    EPSILON,
    EPSILON_BUDGET,
    GRID_CELL_STD,
    GRID_MESSAGE,
    SCHEMA_FINGERPRINT,
    VALUES,
    SiteReply,
    Status,
)
from ..common.schema import Schema
from ..common.study import ConfigError, StudyConfig, schema_fingerprint

stream = logging.getLogger("fedsynth.server")


def _nodes(grid: Grid, study: StudyConfig) -> list[int]:
    deadline = time.monotonic() + study.round_timeout
    while (len(nodes := sorted(grid.get_node_ids())) < study.min_sites
           and time.monotonic() < deadline):
        time.sleep(0.5)
    return nodes


def accepted(reply: SiteReply, cells: int) -> str:
    """Why a grid reply is refused ('' when it is accepted)."""
    if reply.status != Status.GRID_RELEASED:
        return "; ".join(reply.problems) or reply.status
    values = (reply.arrays or {}).get(VALUES)
    if values is None or np.shape(values) != (cells,) or not np.all(np.isfinite(values)):
        return f"the release is not {cells} finite cells"
    std = reply.metrics.get(GRID_CELL_STD, -1.0)
    if not (math.isfinite(std) and std >= 0):
        return "no valid noise level"
    budget = reply.metrics.get(EPSILON_BUDGET, -1.0)
    if budget > 0 and reply.metrics.get(EPSILON, 0.0) > budget * (1 + 1e-6):
        return "reported epsilon passes its budget"
    return ""


def combine(schema: Schema, replies: list[SiteReply]) -> dict[str, dict]:
    """The grid and the heaps (``generator-params`` entries) from accepted replies: the
    summed counts and the summed noise variance."""
    summed = np.sum([np.asarray(r.arrays[VALUES], dtype=float)  # type: ignore[index]
                     for r in replies], axis=0)
    total_std = math.sqrt(sum(r.metrics[GRID_CELL_STD] ** 2 for r in replies))
    return {GRID_PARAM: quantile_grid.grid_from_counts(schema, summed, total_std),
            HEAPS_PARAM: quantile_grid.heaps_from_counts(schema, summed, total_std)}


def ask_sites(grid: Grid, study: StudyConfig, schema: Schema) -> dict[str, dict]:
    """One grid request per site; the grid and heaps from the accepted releases."""
    config = {**study.to_flat(), SCHEMA_FINGERPRINT: schema_fingerprint(schema)}
    messages = [Message(RecordDict({CONFIG: ConfigRecord(config)}), dst_node_id=node,
                        message_type=GRID_MESSAGE) for node in _nodes(grid, study)]
    cells = quantile_grid.release_cells(schema)
    good: list[SiteReply] = []
    refused: list[str] = []
    for msg in grid.send_and_receive(messages, timeout=study.round_timeout):
        if msg.has_error():
            refused.append(f"node {msg.metadata.src_node_id}: {msg.error.reason}"[:300])
            continue
        name, reply = SiteReply.from_content(msg.content)
        why = accepted(reply, cells)
        if why:
            refused.append(f"{name or msg.metadata.src_node_id}: {why}")
        else:
            good.append(reply)
    if len(good) < study.min_sites:
        raise ConfigError(
            f"the quantile-grid release got {len(good)} usable replies, fewer than min-sites "
            f"({study.min_sites}): {'; '.join(refused) or 'no reply'}. Fix the sites, or "
            "run the study with grid-share = 0 (public-bounds encoding)")
    stream.info("quantile grid from %d sites' releases (%d refused)", len(good), len(refused))
    return combine(schema, good)


def with_grid(grid: Grid, study: StudyConfig, schema: Schema, ckpt: Path) -> StudyConfig:
    """``study`` with its quantile grid in ``generator-params``: from the checkpoint
    when the study resumes (the sites already released theirs), else from the sites."""
    if not study.releases_grid or GRID_PARAM in study.generator_params:
        return study
    found = None
    if study.resume and ckpt.exists():
        saved = Generator.read_meta(ckpt).get("hparams", {})
        if saved.get(GRID_PARAM) is not None:
            found = {GRID_PARAM: saved[GRID_PARAM], HEAPS_PARAM: saved.get(HEAPS_PARAM) or {}}
    if found is None:
        found = ask_sites(grid, study, schema)
    return replace(study, generator_params={**study.generator_params, **found})
