"""A site's side of federated validation: score the released synthetic table against the
site's own rows and reply with scores only.

The ClientApp's ``@app.evaluate()`` handler is a few lines around ``evaluate_reply``
(see ``docs/validation.md``, "Federated validation").

The coordinator sends the synthetic table (public: DP post-processing); the site reads
its own table, computes ``common.validation.federated.site_scores`` and replies with a
flat dict of floats (one Flower MetricRecord). Besides the scores the reply carries the
row count the site already released under DP for its FedAvg weight: re-sending a DP
release is post-processing and costs no budget. A site that never released a count (it
never trained) sends none, and the coordinator leaves it out of the row-weighted
figures rather than spend budget on a new count here. With ``dp = false`` (benchmark
baseline) the exact count is sent, as in training.

Nothing else leaves the site: no frequency table, no quantile, no per-row figure.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence

import pandas as pd

from ..common.schema import Schema
from ..common.study import SiteConfig
from ..common.table import TableCheckError, read_table
from ..common.validation.federated import COUNT_KEY, site_scores
from .site import INVALID_DATA, SiteReply, SiteState, site_schema, status_metrics

log = logging.getLogger("fedsynth.site")

#: Config key carrying the synthetic table (CSV text) from the coordinator.
SYNTHETIC_KEY = "synthetic-csv"
EVALUATED = "evaluated"
INVALID_SYNTHETIC = "invalid-synthetic"
DECLINED = "declined"


class SyntheticTableError(ValueError):
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
) -> SiteReply:
    """What a site's ``@app.evaluate()`` handler replies: the scores, or why not.

    The scores are not DP, so only a site whose own node config opts in
    (``validation-scores``) sends any; the coordinator cannot turn this on for it.

    The schema and table checks are those of training (``site_schema``, ``read_table``);
    problems are sent without row numbers or values. ``send_count=False`` keeps the DP
    count at the site: an encrypted study sent it only inside ciphertexts, and
    validation should not reveal per site what encryption hid (the row-weighted
    figures are then left out; the exact and per-site ones remain).
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
    scores = evaluate_site(rows, schema, synthetic, noisy_count=count,
                           include_privacy=site.validation_scores == "all")
    return SiteReply(EVALUATED, {**scores, **status_metrics(site, state)})
