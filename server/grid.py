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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ..common import quantile_grid
from ..common.encryption import (
    EncryptedUpdateError,
    KeySetupError,
    StateLayout,
    add_encrypted,
    check_ciphertexts,
    load_public_context,
)
from ..common.encryption.masks import MaskError, unmask_sum
from ..common.generators import Generator
from ..common.generators.base import GRID_PARAM, HEAPS_PARAM
from ..common.protocol import (
    CHUNKS,
    CKKS,
    CONFIG,
    DECRYPT_OP,
    DELTA,
    EPSILON,
    EPSILON_BUDGET,
    GRID_CELL_STD,
    GRID_MASKED,
    GRID_MESSAGE,
    GRID_NOISE,
    LAYOUT,
    OP,
    SCHEMA_FINGERPRINT,
    STATUS_OP,
    VALUES,
    SiteReply,
    Status,
)
from ..common.schema import Schema
from ..common.study import ConfigError, StudyConfig, schema_fingerprint
from .rounds import SiteRound, site_round

stream = logging.getLogger("fedsynth.server")
#: The key of an encrypted checkpoint's meta that keeps the study's grid and heaps.
CHECKPOINT_GRID = "quantile-grid"


def _nodes(grid: Grid, study: StudyConfig) -> list[int]:
    deadline = time.monotonic() + study.round_timeout
    while (len(nodes := sorted(grid.get_node_ids())) < study.min_sites
           and time.monotonic() < deadline):
        time.sleep(0.5)
    return nodes


def accepted(reply: SiteReply, cells: int, scheme: str = "none") -> str:
    """Why a grid reply is refused ('' when it is accepted). ``scheme`` is the study's
    ``secure-aggregation``: in clear the counts, under CKKS ciphertexts only
    (``check_ciphertexts`` checks them), under masks one uint64 masked vector only."""
    if reply.status != Status.GRID_RELEASED:
        return "; ".join(reply.problems) or reply.status
    arrays = reply.arrays or {}
    if scheme == "ckks":
        if arrays or not reply.chunks:
            return "an encrypted study's release must be ciphertexts only"
    elif scheme == "masks":
        masked = arrays.get(GRID_MASKED)
        if (set(arrays) != {GRID_MASKED} or masked is None or masked.dtype != np.uint64
                or masked.shape != (cells,)):
            return f"no masked vector of {cells} uint64 cells (and nothing else)"
    elif (VALUES not in arrays or np.shape(arrays[VALUES]) != (cells,)
          or not np.all(np.isfinite(arrays[VALUES]))):
        return f"the release is not {cells} finite cells"
    std = reply.metrics.get(GRID_CELL_STD, -1.0)
    if not (math.isfinite(std) and std >= 0):
        return "no valid noise level"
    budget = reply.metrics.get(EPSILON_BUDGET, -1.0)
    if budget > 0 and reply.metrics.get(EPSILON, 0.0) > budget * (1 + 1e-6):
        return "reported epsilon passes its budget"
    return ""


def combine(schema: Schema, replies: list[SiteReply]) -> dict[str, dict]:
    """The grid and the heaps (``generator-params`` entries) from accepted replies in
    clear: the summed counts and the summed noise variance."""
    summed = np.sum([np.asarray(r.arrays[VALUES], dtype=float)  # type: ignore[index]
                     for r in replies], axis=0)
    return _params(schema, summed, replies)


def _params(schema: Schema, summed: np.ndarray, replies: list[SiteReply]) -> dict[str, dict]:
    """Grid and heaps from a sum of releases and the noise each site says it added."""
    total_std = math.sqrt(sum(r.metrics[GRID_CELL_STD] ** 2 for r in replies))
    return {GRID_PARAM: quantile_grid.grid_from_counts(schema, summed, total_std),
            HEAPS_PARAM: quantile_grid.heaps_from_counts(schema, summed, total_std)}


def _ask(grid: Grid, study: StudyConfig, config: dict, nodes: list[int]) -> list[Message]:
    messages = [Message(RecordDict({CONFIG: ConfigRecord(config)}), dst_node_id=node,
                        message_type=GRID_MESSAGE) for node in nodes]
    return list(grid.send_and_receive(messages, timeout=study.round_timeout))


def _releases(grid: Grid, study: StudyConfig, config: dict, nodes: list[int], cells: int,
              log: list[SiteRound], check: Callable[[SiteReply], str] | None = None
              ) -> tuple[list[SiteReply], list[str]]:
    """Every site's grid release that passes ``accepted`` (and ``check``), and why each
    other one was refused. Every reply goes into ``log``: a site's grid release is
    charged to its ledger, so the study's privacy figures and label must see it even
    when the site never trains (``server/app.py``, ``privacy_log``)."""
    good: list[SiteReply] = []
    refused: list[str] = []
    for msg in _ask(grid, study, config, nodes):
        if msg.has_error():
            reason = f"{msg.error.reason}"[:300]
            refused.append(f"node {msg.metadata.src_node_id}: {reason}")
            log.append(SiteRound(site=f"node {msg.metadata.src_node_id}",
                                 status=Status.FAILED, reason=reason))
            continue
        name, reply = SiteReply.from_content(msg.content)
        entry = site_round(name or f"node {msg.metadata.src_node_id}", reply)
        why = accepted(reply, cells, study.secure_aggregation) or (check and check(reply))
        if why:
            refused.append(f"{entry.site}: {why}")
            entry.reason = why
        else:
            good.append(reply)
        log.append(entry)
    return good, refused


def ask_sites(grid: Grid, study: StudyConfig, schema: Schema, log: list[SiteRound]
              ) -> dict[str, dict]:
    """One grid request per site; the grid and heaps from the sum of the accepted
    releases: in clear, a CKKS sum one site decrypts, or a masked sum. Each reply is
    logged in ``log``."""
    config = {**study.to_flat(), SCHEMA_FINGERPRINT: schema_fingerprint(schema)}
    nodes = _nodes(grid, study)
    if study.masked:
        return masked_grid(grid, study, schema, config, nodes, log)
    if study.encrypted:
        return encrypted_grid(grid, study, schema, config, nodes, log)
    good, refused = _releases(grid, study, config, nodes, quantile_grid.release_cells(schema),
                              log)
    _enough(study, len(good), refused)
    stream.info("quantile grid from %d sites' releases (%d refused)", len(good), len(refused))
    return combine(schema, good)


def common_grid_noise(grid: Grid, study: StudyConfig, config: dict, nodes: list[int]
                      ) -> float:
    """A split study's common grid noise multiplier: the largest any site's budget needs
    (``grid_noise_for`` at its stated budget), from one status request that releases
    nothing. Every site must state a budget: one without DP cannot split."""
    need: list[float] = []
    missing: list[str] = []
    for msg in _ask(grid, study, {**config, OP: STATUS_OP}, nodes):
        if msg.has_error():
            missing.append(f"node {msg.metadata.src_node_id}: {msg.error.reason}"[:300])
            continue
        name, reply = SiteReply.from_content(msg.content)
        budget, delta = reply.metrics.get(EPSILON_BUDGET, -1.0), reply.metrics.get(DELTA, 0.0)
        if reply.status != Status.BUDGET_STATED or not (budget > 0 and 0 < delta < 1):
            missing.append(f"{name}: {'; '.join(reply.problems) or reply.status}")
            continue
        need.append(quantile_grid.grid_noise_for(budget, delta, study.grid_share))
    if missing or len(need) < len(nodes):
        raise ConfigError(
            f"a split-noise grid (honest-sites = {study.honest_sites}) needs every site's "
            f"budget, and {len(nodes) - len(need)} of {len(nodes)} stated none: "
            f"{'; '.join(missing) or 'no reply'}. Fix those sites, or lower honest-sites "
            "to 1")
    return max(need)


def masked_grid(grid: Grid, study: StudyConfig, schema: Schema, config: dict,
                nodes: list[int], log: list[SiteRound]) -> dict[str, dict]:
    """The grid from the sum of every site's masked release (``masks.unmask_sum``): no
    single site's histograms are ever readable here. The masks cancel only when every
    site asked answered the same request, so one refusal fails the step, naming why."""
    if study.honest_sites > 1:
        config = {**config, GRID_NOISE: common_grid_noise(grid, study, config, nodes)}
    good, refused = _releases(grid, study, config, nodes, quantile_grid.release_cells(schema),
                              log)
    if refused or len(good) < len(nodes):
        raise ConfigError(
            f"the masked quantile-grid release needs every site's vector, and "
            f"{len(nodes) - len(good)} of {len(nodes)} sent none (the others stay "
            f"masked): {'; '.join(refused) or 'no reply'}. Fix those sites, or run the "
            "study with grid-share = 0 (public-bounds encoding)")
    try:
        summed = unmask_sum([r.arrays[GRID_MASKED] for r in good])  # type: ignore[index]
    except MaskError as exc:
        raise ConfigError(f"the masked quantile-grid release: {exc}") from None
    stream.info("quantile grid from the masked sum of %d sites' releases (split %d ways)",
                len(good), study.honest_sites)
    return _params(schema, summed, good)


def encrypted_grid(grid: Grid, study: StudyConfig, schema: Schema, config: dict,
                   nodes: list[int], log: list[SiteRound]) -> dict[str, dict]:
    """The grid from the CKKS sum of the sites' encrypted releases, which one site
    decrypts (flooded, once per study): this module adds ciphertexts with the key-less
    public context and never holds one site's histograms."""
    if not study.public_context:
        raise ConfigError("secure-aggregation = 'ckks' needs public-context (the "
                          "coordinator's key-less CKKS context)")
    try:
        public = load_public_context(study.public_context)
    except KeySetupError as exc:
        raise ConfigError(str(exc)) from None
    cells = quantile_grid.release_cells(schema)
    layout = StateLayout.from_state({VALUES: np.zeros(cells)})

    def usable(reply: SiteReply) -> str:
        try:
            check_ciphertexts(public, reply.chunks or [], layout)
        except (EncryptedUpdateError, ValueError) as exc:
            return f"unusable ciphertexts ({exc})"
        return ""

    good, refused = _releases(grid, study, config, nodes, cells, log, usable)
    _enough(study, len(good), refused)
    summed = add_encrypted(public, [list(r.chunks or []) for r in good])
    values = _decrypted(grid, study, config, nodes, summed, layout, cells)
    stream.info("quantile grid from the CKKS sum of %d sites' releases (%d refused)",
                len(good), len(refused))
    return _params(schema, values, good)


def _decrypted(grid: Grid, study: StudyConfig, config: dict, nodes: list[int],
               summed: list[bytes], layout: StateLayout, cells: int) -> np.ndarray:
    """One site's decryption of the summed ciphertexts (the first that answers)."""
    record = ConfigRecord({CHUNKS: summed, LAYOUT: layout.to_json()})
    problems = []
    for node in nodes:
        content = RecordDict({CONFIG: ConfigRecord({**config, OP: DECRYPT_OP}), CKKS: record})
        replies = list(grid.send_and_receive(
            [Message(content, dst_node_id=node, message_type=GRID_MESSAGE)],
            timeout=study.round_timeout))
        if not replies or replies[0].has_error():
            continue
        name, reply = SiteReply.from_content(replies[0].content)
        values = (reply.arrays or {}).get(VALUES)
        if (reply.status == Status.RELEASED and values is not None
                and np.shape(values) == (cells,) and np.all(np.isfinite(values))):
            return np.asarray(values, dtype=float)
        problems.append(f"{name}: {'; '.join(reply.problems) or reply.status}")
    raise ConfigError("no site decrypted the summed quantile-grid release: "
                      f"{'; '.join(problems) or 'no reply'}. Fix the sites, or run the study "
                      "with grid-share = 0 (public-bounds encoding)")


def _enough(study: StudyConfig, good: int, refused: list[str]) -> None:
    if good < study.min_sites:
        raise ConfigError(
            f"the quantile-grid release got {good} usable replies, fewer than min-sites "
            f"({study.min_sites}): {'; '.join(refused) or 'no reply'}. Fix the sites, or "
            "run the study with grid-share = 0 (public-bounds encoding)")


def with_grid(grid: Grid, study: StudyConfig, schema: Schema, ckpt: Path
              ) -> tuple[StudyConfig, list[SiteRound]]:
    """``study`` with its quantile grid in ``generator-params``: from the checkpoint
    when the study resumes (the sites already released theirs), else from the sites;
    and the log of the sites' grid replies (empty when none were asked)."""
    log: list[SiteRound] = []
    if not study.releases_grid or GRID_PARAM in study.generator_params:
        return study, log
    found = None
    if study.resume and ckpt.exists():
        if study.encrypted:  # no model in clear: the grid is kept beside the ciphertexts
            from .secure import read_encrypted_checkpoint

            saved = dict(read_encrypted_checkpoint(ckpt).meta.get(CHECKPOINT_GRID) or {})
        else:
            saved = Generator.read_meta(ckpt).get("hparams", {})
        if saved.get(GRID_PARAM) is not None:
            found = {GRID_PARAM: saved[GRID_PARAM], HEAPS_PARAM: saved.get(HEAPS_PARAM) or {}}
    if found is None:
        found = ask_sites(grid, study, schema, log)
    return replace(study, generator_params={**study.generator_params, **found}), log
