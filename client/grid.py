"""A site's answer to the quantile-grid request (``query.grid``), before round 1.

What leaves the site, and why it is allowed: one noisy histogram of each numeric column
over its public bounds (``common/quantile_grid.py``), Gaussian noise from the site's
secret randomness, recorded in its ledger as one Gaussian release whose noise
multiplier takes the study's ``grid-share`` of the site's budget. The training noise
is calibrated here, before the release is recorded, for the whole plan (grid, count,
DP-SGD, loss reports) against what earlier studies left, exactly as round 1 would
have; the release is then a prior entry of the ledger and the study's epsilon
includes it.

Asked again in the same study (a coordinator restart), the site resends the same
noisy counts: nothing new is learned and nothing is charged. In an encrypted study
nothing is sent: the histograms would travel in clear.
"""

from __future__ import annotations

import logging

from ..common import quantile_grid
from ..common.encoding import TabularEncoder
from ..common.protocol import GRID_CELL_STD, VALUES, SiteReply, Status
from ..common.study import SiteConfig, StudyConfig
from .site import (
    BUDGET_EXHAUSTED,
    SiteState,
    noise_for,
    site_table,
    status_metrics,
)

log = logging.getLogger("fedsynth.site")


def grid_reply(site: SiteConfig, study: StudyConfig, schema_fp: str,
               state: SiteState) -> SiteReply:
    """The site's noisy grid histograms (``arrays["values"]``), or why not."""
    if not study.releases_grid or site.requires_encryption:
        return SiteReply(Status.UNSUPPORTED_QUERY, status_metrics(site, state), problems=[
            "this site answers the quantile-grid request only in a deep generator's study "
            "in clear with grid-share > 0 (its histograms would travel in clear)"])
    table = site_table(site, state, schema_fp)
    if isinstance(table, SiteReply):
        return table
    schema, data = table
    noise = (quantile_grid.grid_noise_for(site.epsilon, site.delta, study.grid_share)
             if site.dp else None)
    if state.grid_counts is None:
        if site.dp:
            state.ledger.mechanism = study.accountant
            if state.noise_multiplier is None:
                try:  # the whole plan, grid included, against what earlier studies left
                    state.noise_multiplier = noise_for(site, study, prior=state.ledger)
                except ValueError as exc:
                    log.warning("site %s: %s", site.name, exc)
                    return SiteReply(BUDGET_EXHAUSTED, status_metrics(site, state))
            after = state.ledger.copy()
            after.record(noise, 1.0, 1)
            if after.epsilon(site.delta) > site.epsilon * (1 + 1e-9):
                return SiteReply(BUDGET_EXHAUSTED, status_metrics(site, state))
        release = site.randomness(f"{study.study_id}:grid").release("grid-release")
        state.grid_counts = quantile_grid.release(TabularEncoder(schema), data, noise, release)
        if noise is not None:
            state.ledger.record(noise, 1.0, 1)
        state.grid_noise = 0.0 if noise is None else float(noise)
    # the noise the stored release was drawn with, whatever this request's grid-share says
    drawn = noise if state.grid_noise is None else state.grid_noise
    std = quantile_grid.cell_std(schema, drawn) if drawn else 0.0
    metrics = {GRID_CELL_STD: std, **status_metrics(site, state)}
    return SiteReply(Status.GRID_RELEASED, metrics, arrays={VALUES: state.grid_counts})
