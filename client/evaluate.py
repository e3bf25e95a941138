"""A site's side of federated validation: score the released synthetic table against the
site's own rows and reply with scores only.

The ClientApp's ``@app.evaluate()`` handler is a few lines around ``evaluate_reply``
(see ``docs/validation.md``, "Federated validation").

The scores are statistics of the site's rows, not DP releases, so the site limits what a
coordinator can ask (``released_table``): it scores only a table it samples itself from
the study's released model, which the coordinator sends with the sample size and seed
(so the table is synthetic.csv, row for row); at least ``MIN_VALIDATION_ROWS`` rows; once
per study, and only a study in which the site made a DP release (it trained a round, or
made a marginal study's 1-way release): study ids are the coordinator's to pick. In an
encrypted study the site also checks that the model is the one it decrypted and
released (a coordinator can still encrypt a crafted model and send it to the release
step: docs/privacy.md); in a study in clear it cannot check that, and the per-patient
screens (``PATIENT_SCREENS``: ``exact_copies``, ``dcr_min``, ``synthetic_recall``,
``nearest_synthetic_distance_mean``) are then never sent: against a model whose every
sample is one guessed record they are a membership test. docs/privacy.md states what a
deviating coordinator can still learn. The site
reads its own table, computes ``common.validation.federated.site_scores`` and replies
with a flat dict of floats (one Flower MetricRecord). Besides the scores the reply
carries the row count the site already released under DP for its FedAvg weight:
re-sending a DP release is post-processing and costs no budget. With ``dp = false``
(benchmark baseline) the exact count is sent, as in training.

Nothing else leaves the site: no frequency table, no quantile, no per-row figure.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from ..common.errors import FedsynthError
from ..common.generators import get_generator
from ..common.protocol import VALIDATION_ROWS, VALIDATION_SEED, Status
from ..common.schema import Schema
from ..common.study import SiteConfig, StudyConfig
from ..common.table import TableCheckError, read_table
from ..common.validation.federated import COUNT_KEY, site_scores
from .site import (
    INVALID_DATA,
    SiteReply,
    SiteState,
    released_model_path,
    site_schema,
    status_metrics,
)

log = logging.getLogger("fedsynth.site")

#: The request's keys and the reply's statuses (common/protocol.py), by their old names.
ROWS_KEY = VALIDATION_ROWS
SEED_KEY = VALIDATION_SEED
EVALUATED = Status.EVALUATED
INVALID_SYNTHETIC = Status.INVALID_SYNTHETIC
DECLINED = Status.DECLINED
ALREADY_VALIDATED = Status.ALREADY_VALIDATED
NOT_THE_RELEASE = Status.NOT_THE_RELEASE
#: Fewer rows would let a table stand for a handful of probe records.
MIN_VALIDATION_ROWS = 200


class SyntheticTableError(FedsynthError, ValueError):
    """The synthetic table the coordinator sent cannot be scored against the schema."""


def read_synthetic(csv_text: str, schema: Schema) -> pd.DataFrame:
    """The synthetic table from the CSV text the coordinator sent (header row, schema
    columns; extra columns are ignored). Values outside the domain are kept: scoring a
    bad generator is the point."""
    try:
        frame = pd.read_csv(io.StringIO(csv_text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise SyntheticTableError(
            f"the synthetic table sent for validation is not a CSV table ({exc}); "
            "the coordinator should send synthetic.csv as written by the study"
        ) from exc
    missing = [c for c in schema.names if c not in frame.columns]
    if missing:
        raise SyntheticTableError(
            f"the synthetic table lacks {len(missing)} schema column(s): "
            f"{', '.join(missing[:10])}; the coordinator should send a table sampled from "
            "this study's generator"
        )
    if len(frame) < 2:
        raise SyntheticTableError(
            f"the synthetic table has {len(frame)} row(s); validation needs at least 2"
        )
    return frame


def evaluate_site(
    rows: pd.DataFrame,
    schema: Schema,
    synthetic: pd.DataFrame,
    *,
    noisy_count: float | None,
    target: str | None = None,
    positive: Sequence[object] | None = None,
    include_privacy: bool = True,
) -> dict[str, float]:
    """Scores of ``synthetic`` against this site's ``rows``, plus its already-released
    DP count under ``COUNT_KEY`` when there is one; a flat dict of finite floats."""
    scores = site_scores(
        rows, synthetic, schema, target=target, positive=positive, include_privacy=include_privacy
    )
    if noisy_count is not None and math.isfinite(noisy_count):
        scores[COUNT_KEY] = float(noisy_count)
    return scores


def evaluate_reply(
    site: SiteConfig,
    schema_fp: str,
    synthetic_csv: str,
    state: SiteState,
    *,
    send_count: bool = True,
    spend: Callable[[], None] | None = None,
) -> SiteReply:
    """What a site's ``@app.evaluate()`` handler replies: the scores, or why not.

    The scores are not DP, so only a site whose own node config opts in
    (``validation-scores``) sends any; the coordinator cannot turn this on for it.

    The schema and table checks are those of training (``site_schema``, ``read_table``);
    problems are sent without row numbers or values. ``send_count=False`` keeps the DP
    count at the site: an encrypted study sent it only inside ciphertexts, and
    validation should not reveal per site what encryption hid (the row-weighted
    figures are then left out; the exact and per-site ones remain).

    ``spend`` marks the study's one validation as used, and is called before the rows
    are scored: a scoring that fails (a crafted table can make it fail on some rows
    only) has used it all the same, or failure and success would be free answers.
    """
    if site.validation_scores == "none":
        return SiteReply(
            DECLINED,
            status_metrics(site, state),
            problems=["this site shares no validation scores (its node config has "
                      "validation-scores = none; 'quality' or 'all' opts in)"],
        )
    schema = site_schema(site, state, schema_fp)
    if isinstance(schema, SiteReply):
        return schema
    try:
        rows = read_table(site.data_path, schema)
    except TableCheckError as exc:
        log.warning("site %s: %s", site.name, exc)
        return SiteReply(INVALID_DATA, status_metrics(site, state), problems=exc.shareable())
    try:
        synthetic = read_synthetic(synthetic_csv, schema)
    except SyntheticTableError as exc:
        return SiteReply(INVALID_SYNTHETIC, status_metrics(site, state), problems=[str(exc)])
    count = (state.noisy_count if site.dp else float(len(rows))) if send_count else None
    if spend is not None:
        spend()
    scores = evaluate_site(rows, schema, synthetic, noisy_count=count,
                           include_privacy=site.validation_scores == "all")
    return SiteReply(EVALUATED, {**scores, **status_metrics(site, state)})


def released_table(
    site: SiteConfig,
    study: StudyConfig,
    schema_fp: str,
    arrays: dict[str, np.ndarray] | None,
    rows: int,
    seed: int,
    state: SiteState,
) -> pd.DataFrame | SiteReply:
    """The synthetic table the site agrees to score, sampled by the site itself from the
    released model; or the reply that refuses the request.

    A coordinator that could send any table would turn the scores into an oracle (a
    two-row table makes a per-column TVD reveal an exact category count; ``exact_copies``
    answers "is this record in your table"). Here the table is always a sample of the
    study's model architecture, of at least ``MIN_VALIDATION_ROWS`` rows; under CKKS
    the weights must also be those the site itself decrypted at release (up to the
    flooding noise the sites added), and it answers once per study.
    """
    refuse = status_metrics(site, state)
    if state.validated:
        return SiteReply(ALREADY_VALIDATED, refuse, problems=[
            "this site scored this study's release once already; it answers once per study"])
    if site.dp and state.rounds_trained == 0 and state.noisy_count is None:
        # Study ids are the coordinator's to pick: "once per study" alone would let it
        # name a new study for every question. A study the site took part in made a DP
        # release here first, charged to the table's lifetime ledger. (A site without
        # DP, the benchmarks' baseline, sends exact counts in training anyway.)
        return SiteReply(NOT_THE_RELEASE, refuse, problems=[
            f"this site made no release in study {study.study_id!r}, so there is no "
            "release of it to score; it scores only a study it took part in"])
    schema = site_schema(site, state, schema_fp)
    if isinstance(schema, SiteReply):
        return schema
    if arrays is None:
        return SiteReply(INVALID_SYNTHETIC, refuse, problems=[
            "the request holds no model: send the study's released model, the site samples "
            "the table from it"])
    if rows < MIN_VALIDATION_ROWS:
        return SiteReply(INVALID_SYNTHETIC, refuse, problems=[
            f"a validation table needs at least {MIN_VALIDATION_ROWS} rows; got {rows}"])
    model = get_generator(study.generator)(schema, seed=study.seed, **study.generator_params)
    try:
        model.load_state_dict(arrays)
    except (ValueError, KeyError) as exc:
        return SiteReply(INVALID_SYNTHETIC, refuse, problems=[
            f"the model sent for validation is not this study's generator: {exc}"])
    if study.encrypted:
        problem = _differs_from_release(site, study.study_id, model.state_dict())
        if problem:
            log.warning("site %s: refused federated validation: %s", site.name, problem)
            return SiteReply(NOT_THE_RELEASE, refuse, problems=[problem])
    return model.sample(rows, seed=seed)


def _differs_from_release(site: SiteConfig, study_id: str, state: dict[str, np.ndarray]) -> str:
    """Why ``state`` is not the final model this site decrypted and released, or ''."""
    path = released_model_path(site, study_id)
    if path is None or not path.is_file():
        return "this site has not released this study's final model, so it scores none"
    with np.load(path, allow_pickle=False) as kept:
        released = {k: kept[k] for k in kept.files}
    if set(released) != set(state):
        return "the model sent for validation is not the one this site released"
    peak = max((float(np.max(np.abs(v))) for v in released.values() if v.size), default=1.0)
    # the sites' flooding noise is 2**-20 of the peak; allow 2**-13 (well above it, far
    # below any change that would steer the scores)
    tol = 2.0**-13 * max(peak, 1.0)
    worst = max(
        (float(np.max(np.abs(np.asarray(state[k], float) - np.asarray(v, float))))
         for k, v in released.items() if v.size),
        default=0.0,
    )
    if worst > tol:
        return "the model sent for validation is not the one this site released"
    return ""
