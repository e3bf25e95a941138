"""A site's answer to the quantile-grid request (``query.grid``), before round 1.

What leaves the site, and why it is allowed: one noisy histogram of each numeric column
over its public bounds (``common/quantile_grid.py``), Gaussian noise from the site's
secret randomness, recorded in its ledger as one Gaussian release whose noise
multiplier takes the study's ``grid-share`` of the site's budget. The training noise
is calibrated here, before the release is recorded, for the whole plan (grid, count,
DP-SGD, loss reports) against what earlier studies left, exactly as round 1 would
have; the release is then a prior entry of the ledger and the study's epsilon
includes it.

Under ``secure-aggregation = "masks"`` the histograms travel masked
(``common/encryption/masks.py``): the coordinator reads only the sum of every site's.
A study that splits the noise (``honest-sites`` H > 1) sends one common noise
multiplier (``GRID_NOISE``, the largest any site's budget needs); the site refuses it
below its own, adds 1/H of its variance, and charges its ledger the whole, as a
marginal study's measurement does (docs/privacy.md, "Distributed noise"). The model
updates of such a study are DP releases at the site's whole budget, in clear.

Asked again in the same study (a coordinator restart), the site resends the same
noisy counts: nothing new is learned and nothing is charged; a masked release only
under the split it was made with. Under CKKS the site sends its histograms encrypted,
and one site decrypts the coordinator's sum of them, flooded, once per study (as an
encrypted study's final model).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from ..common import protocol as P
from ..common import quantile_grid
from ..common.encoding import TabularEncoder
from ..common.encryption import (
    EncryptedUpdateError,
    EncryptionContextError,
    KeySetupError,
    StateLayout,
)
from ..common.encryption.masks import (
    MaskError,
    Roster,
    load_roster,
    mask,
    pair_keys,
    request_digest,
)
from ..common.protocol import GRID_CELL_STD, VALUES, SiteReply, Status
from ..common.schema import Schema
from ..common.study import NOISE_MULTIPLIER_RANGE, SiteConfig, StudyConfig
from .site import (
    BUDGET_EXHAUSTED,
    MIN_SHARE_STD,
    SPLIT_CHARGE_MARGIN,
    SiteState,
    noise_for,
    over_budget,
    site_schema,
    site_table,
    split_problem,
    status_metrics,
    study_metrics,
)

log = logging.getLogger("fedsynth.site")


def grid_reply(site: SiteConfig, study: StudyConfig, schema_fp: str,
               state: SiteState, config: dict[str, Any] | None = None,
               ckks: dict[str, Any] | None = None) -> SiteReply:
    """The site's noisy grid histograms (``arrays["values"]``; masked under masks,
    ciphertexts under CKKS), or why not; under CKKS also the decryption of their sum.
    ``config`` is the request's (the masks are bound to it), ``ckks`` the summed
    ciphertexts a decrypt request carries."""
    config = config or {}
    if not study.releases_grid:
        return SiteReply(Status.UNSUPPORTED_QUERY, status_metrics(site, state), problems=[
            "this site answers the quantile-grid request only in a deep generator's study "
            "with grid-share > 0"])
    if problem := site.aggregation_problem(study):
        return SiteReply(Status.ENCRYPTION_REQUIRED, status_metrics(site, state),
                         problems=[problem])
    if study.masked and config.get(P.OP) == P.STATUS_OP:  # the budget, nothing released
        return SiteReply(Status.BUDGET_STATED, study_metrics(site, study, state))
    if study.encrypted:
        if config.get(P.OP) == P.DECRYPT_OP:
            return _decrypt(site, study, state, ckks or {}, schema_fp)
        from .secure import site_context

        try:  # keys first: a site that cannot encrypt draws and charges nothing
            site_context(site, study.study_id)
        except (KeySetupError, EncryptionContextError) as exc:
            return SiteReply(Status.NO_KEYS, status_metrics(site, state), problems=[str(exc)])
    table = site_table(site, state, schema_fp)
    if isinstance(table, SiteReply):
        return table
    schema, data = table
    h = study.honest_sites
    if problem := split_problem(state, h):
        return _refused(site, study, state, problem)
    noise = (quantile_grid.grid_noise_for(site.epsilon, site.delta, study.grid_share)
             if site.dp else None)
    if h > 1:  # every site adds 1/h of one common noise: the most private site's
        common = _common_noise(site, config, noise)
        if isinstance(common, str):
            return _refused(site, study, state, common)
        noise = common
    split = f"{h}:{noise!r}" if study.masked else ""
    if state.grid_counts is not None and study.masked and state.grid_split != split:
        return _refused(site, study, state, (
            f"this study's grid was released under the split {state.grid_split or 'in clear'}"
            f" (H:noise), and this request asks {split}: the site resends it only as made"))
    roster = None
    if study.masked:  # keys first: a site that cannot mask draws and charges nothing
        try:
            roster = load_roster(site.name, site.key_dir, site.peer_keys)
        except KeySetupError as exc:
            return SiteReply(Status.NO_KEYS, study_metrics(site, study, state), problems=[str(exc)])
        if h > roster.size:
            return _refused(site, study, state, (
                f"honest-sites = {h} but the roster (peer-keys) holds {roster.size} sites "
                "with this one: lower honest-sites"))
    if state.grid_counts is None:
        made = _release(site, study, state, schema, data, noise, h)
        if made is not None:
            return made
        state.grid_split = split
        state.split_h = h
    # the noise the stored release was drawn with, whatever this request's grid-share says
    drawn = noise if state.grid_noise is None else state.grid_noise  # None: an old file
    std = quantile_grid.cell_std(schema, drawn) if drawn else 0.0
    metrics = {GRID_CELL_STD: std, **study_metrics(site, study, state)}
    if roster is not None:
        return _masked(study, state, config, metrics, roster)
    if study.encrypted:
        from .secure import encrypt_counts

        try:
            chunks, layout = encrypt_counts(site, study, np.asarray(state.grid_counts))
        except (KeySetupError, EncryptionContextError) as exc:
            return SiteReply(Status.NO_KEYS, metrics, problems=[str(exc)])
        except ValueError as exc:  # beyond count-bound: a reply, so the charge is saved
            return SiteReply(Status.ENCRYPTION_FAILED, metrics, problems=[
                f"{exc}: raise the study's count-bound"])
        return SiteReply(Status.GRID_RELEASED, metrics, chunks=chunks, layout=layout)
    return SiteReply(Status.GRID_RELEASED, metrics, arrays={VALUES: state.grid_counts})


def _decrypt(site: SiteConfig, study: StudyConfig, state: SiteState, ckks: dict[str, Any],
             schema_fp: str) -> SiteReply:
    """Decrypt the coordinator's sum of the sites' grid ciphertexts, flooded, once per
    study (asked again, fresh flooding could be averaged away). Post-processing of the
    sites' DP releases: nothing is charged. Only the grid's own layout is decrypted (a
    model update's ciphertexts are not, so this is no decryption oracle for them); a
    coordinator that hands one site's grid ciphertext for a sum gets that site's DP
    release, as under CKKS anywhere (docs/privacy.md)."""
    if state.grid_decrypted:
        return SiteReply(Status.ALREADY_RELEASED, status_metrics(site, state), problems=[
            "this site decrypted this study's grid sum once already"])
    schema = site_schema(site, state, schema_fp)
    if isinstance(schema, SiteReply):
        return schema
    from .secure import decrypt_counts

    expected = StateLayout.from_state({VALUES: np.zeros(quantile_grid.release_cells(schema))})
    try:
        if StateLayout.from_json(str(ckks[P.LAYOUT])).to_json() != expected.to_json():
            raise ValueError("the ciphertexts are not laid out as this study's grid release")
        flooded = decrypt_counts(site, study, list(ckks[P.CHUNKS]), expected.to_json())
    except (KeySetupError, EncryptionContextError, EncryptedUpdateError, KeyError,
            ValueError) as exc:
        return SiteReply(Status.REFUSED, status_metrics(site, state),
                         problems=[f"refused to decrypt: {exc}"])
    state.grid_decrypted = True
    return SiteReply(Status.RELEASED, status_metrics(site, state), arrays={VALUES: flooded})


def _release(site: SiteConfig, study: StudyConfig, state: SiteState, schema: Schema,
             data: np.ndarray, noise: float | None, h: int) -> SiteReply | None:
    """Draw and charge the study's one grid release (None), or why not (the reply)."""
    added = None if noise is None else noise / math.sqrt(h)  # h = 1: the whole noise
    sigma = None if noise is None else noise * (SPLIT_CHARGE_MARGIN if h > 1 else 1.0)
    if added is not None and h > 1 and quantile_grid.cell_std(schema, added) < MIN_SHARE_STD:
        return _refused(site, study, state, (
            f"split {h} ways, the grid's noise would be "
            f"{quantile_grid.cell_std(schema, added):.3g} per cell (std, counts), below "
            f"{MIN_SHARE_STD:g}, where a sum of discrete Gaussians is no longer charged "
            "exactly as one: lower honest-sites"))
    if sigma is not None:
        state.ledger.mechanism = study.accountant
        if state.noise_multiplier is None:
            try:  # the whole plan, grid included, against what earlier studies left
                state.noise_multiplier = noise_for(site, study, prior=state.ledger)
            except ValueError as exc:
                log.warning("site %s: %s", site.name, exc)
                return SiteReply(BUDGET_EXHAUSTED, status_metrics(site, state))
        after = state.ledger.copy()
        after.record(sigma, 1.0, 1)
        if over_budget(site, after):
            return SiteReply(BUDGET_EXHAUSTED, status_metrics(site, state))
    release = site.randomness(f"{study.study_id}:grid").release("grid-release")
    state.grid_counts = quantile_grid.release(TabularEncoder(schema), data, added, release)
    if sigma is not None and added is not None:
        state.ledger.record(sigma, 1.0, 1)
        if h > 1:
            state.shares.append((sigma, added, 1))
    state.grid_noise = 0.0 if added is None else float(added)
    return None


def _common_noise(site: SiteConfig, config: dict[str, Any], own: float | None
                  ) -> float | str:
    """The study's common grid noise multiplier, or why it is refused: each honest site
    adds 1/H of the same variance, so a level below this site's own would leave its
    patients short whatever the others add."""
    if own is None:
        return ("a site without DP adds no noise: it cannot take part in a study that "
                "splits the noise")
    try:
        common = float(config[P.GRID_NOISE])
    except (KeyError, TypeError, ValueError):
        return "a split-noise grid request needs the study's common noise (grid-common-noise)"
    if not (math.isfinite(common) and common >= own * (1 - 1e-9)):
        return (f"the study's common grid noise ({common:.4g}) is below this site's own "
                f"({own:.4g}, its budget's grid share): refused")
    if common > NOISE_MULTIPLIER_RANGE[1]:  # counts past the masks' fixed-point range
        return (f"the study's common grid noise ({common:.4g}) is above "
                f"{NOISE_MULTIPLIER_RANGE[1]:g}: refused before anything is drawn")
    return common


def _masked(study: StudyConfig, state: SiteState, config: dict[str, Any],
            metrics: dict[str, float], roster: Roster) -> SiteReply:
    """The stored release plus this site's masks, bound to this request: readable only
    in the roster's sum. Re-masking the same stored vector is safe under any grid
    request (one vector, never two, under a mask: the digest names the message kind, so
    no marginal reply shares a grid reply's mask), so a resend needs no digest check."""
    try:
        masked = mask(np.asarray(state.grid_counts, dtype=float), roster,
                      pair_keys(roster, study.study_id),
                      request_digest(P.GRID_MESSAGE, config, {}))
    except MaskError as exc:
        return SiteReply(Status.ENCRYPTION_FAILED, metrics, problems=[str(exc)])
    return SiteReply(Status.GRID_RELEASED, metrics, arrays={P.GRID_MASKED: masked})


def _refused(site: SiteConfig, study: StudyConfig, state: SiteState, problem: str
             ) -> SiteReply:
    return SiteReply(Status.REFUSED, study_metrics(site, study, state), problems=[problem])
