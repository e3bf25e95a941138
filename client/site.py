"""A site's side of one round, free of Flower so it can be read and tested alone.

What leaves the site, and why each is allowed:

- the model weights after local DP-SGD (DP by Opacus' mechanism);
- the row count used as the FedAvg weight: released once per study with Gaussian noise
  and charged to the ledger (a count is a statistic of the private rows);
- a loss figure: a subsampled Gaussian query charged to the ledger (see
  ``privacy.trainer.dp_loss_report``), never the raw training loss;
- the epsilon spent, which depends only on the public plan (noise, rate, steps), not
  on the number of rows;
- on a failed schema check, the problem summaries without row numbers or values.

With ``dp = false`` in the site's config (a baseline for benchmarks only) the exact
count and loss are sent and the reported epsilon is -1 (no guarantee).

With ``secure-aggregation = "ckks"`` the weights and the count leave the site only
inside CKKS ciphertexts (see ``client/secure.py``); this module still does the round.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..common.generators import get_generator
from ..common.generators.base import release_histogram
from ..common.privacy import (
    DPSettings,
    PrivacyLedger,
    RoundPlan,
    calibrate_noise,
    dp_loss_report,
    round_cost,
    train_round,
)
from ..common.schema import Schema, SchemaError
from ..common.study import SiteConfig, StudyConfig, schema_fingerprint
from ..common.table import TableCheckError, read_table

log = logging.getLogger("fedsynth.site")

TRAINED = "trained"
BUDGET_EXHAUSTED = "budget-exhausted"
INVALID_DATA = "invalid-data"
SCHEMA_MISMATCH = "schema-mismatch"


@dataclass
class SiteState:
    """What a site remembers across rounds (kept in Flower's per-node context.state)."""

    ledger: PrivacyLedger = field(default_factory=PrivacyLedger)
    noisy_count: float | None = None
    histogram: np.ndarray | None = None  # the one DP histogram release (sum = count)
    rounds_trained: int = 0
    # The last trained reply, kept in state-dir for a coordinator that asks the same
    # round again (client/replay.py): its round, the digest of the model it answered and
    # the checksum of the stored reply. Empty when nothing is kept.
    replay_round: int = 0
    replay_digest: str = ""
    replay_checksum: str = ""

    def to_record(self) -> dict[str, Any]:
        rec = self.ledger.to_record()
        rec["noisy-count"] = -1.0 if self.noisy_count is None else float(self.noisy_count)
        rec["histogram"] = [] if self.histogram is None else [float(v) for v in self.histogram]
        rec["released"] = self.histogram is not None
        rec["rounds-trained"] = self.rounds_trained
        rec["replay-round"] = self.replay_round
        rec["replay-digest"] = self.replay_digest
        rec["replay-checksum"] = self.replay_checksum
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> SiteState:
        count = float(rec.get("noisy-count", -1.0))
        released = bool(rec.get("released", False))
        return cls(
            ledger=PrivacyLedger.from_record(rec),
            noisy_count=None if count < 0 else count,
            histogram=np.asarray(rec.get("histogram", []), dtype=float) if released else None,
            rounds_trained=int(rec.get("rounds-trained", 0)),
            replay_round=int(rec.get("replay-round", 0)),
            replay_digest=str(rec.get("replay-digest", "")),
            replay_checksum=str(rec.get("replay-checksum", "")),
        )

    def save(self, path: Path) -> None:
        """Write atomically, owner-only: a crash must never leave half a ledger."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ledger-")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.to_record(), fh)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)


@dataclass
class SiteReply:
    status: str
    metrics: dict[str, float]
    arrays: dict[str, np.ndarray] | None = None
    problems: list[str] = field(default_factory=list)


_TABLES: dict[tuple[str, float, str], np.ndarray] = {}


def load_encoded(site: SiteConfig, schema: Schema) -> np.ndarray:
    """Read, check and encode the site's table once per process (files are read-only)."""
    path = Path(site.data_path)
    mtime = path.stat().st_mtime if path.exists() else -1.0
    key = (str(path.resolve()), mtime, schema_fingerprint(schema))
    if key not in _TABLES:
        from ..common.encoding import TabularEncoder

        frame = read_table(path, schema)
        _TABLES[key] = TabularEncoder(schema).encode(frame)
    return _TABLES[key]


def ledger_path(site: SiteConfig, study_id: str) -> Path | None:
    if not site.state_dir:
        return None
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in study_id)
    return Path(site.state_dir) / f"ledger-{safe}.json"


def noise_for(site: SiteConfig, study: StudyConfig) -> float:
    """The site's own fixed noise, or the smallest that fits its budget to the plan."""
    if site.noise_multiplier is not None:
        return site.noise_multiplier
    return _calibrated(
        site.epsilon,
        site.delta,
        RoundPlan(study.sample_rate, study.local_epochs, study.loss_report),
        study.num_server_rounds,
        study.count_noise,
        study.accountant,
    )


@functools.lru_cache(maxsize=64)
def _calibrated(
    epsilon: float, delta: float, plan: RoundPlan, rounds: int, count_noise: float, mech: str
) -> float:
    return calibrate_noise(
        epsilon, delta, plan, rounds=rounds, count_noise=count_noise, mechanism=mech
    )


def status_metrics(site: SiteConfig, state: SiteState) -> dict[str, float]:
    """The privacy a site has spent, and its budget, sent with every reply.

    Both depend on no row: the spent epsilon on the public plan, the budget on the
    site's policy. The coordinator refuses a reply whose epsilon passes the budget.
    """
    eps = state.ledger.epsilon(site.delta) if site.dp else -1.0
    return {
        "epsilon": eps,
        "delta": site.delta if site.dp else 0.0,
        "epsilon-budget": site.epsilon if site.dp else -1.0,
    }


def round_seed(study: StudyConfig, site_name: str, server_round: int) -> int:
    """The seed of one site's round: distinct per site and round, fixed by the study seed.

    Public on purpose: a rerun of the same study (encrypted or not) draws the same
    sampling and noise, which is what lets two runs be compared seed for seed.
    """
    mixed = study.seed * 1_000_003 + server_round * 7919 + zlib.crc32(site_name.encode())
    return mixed % (2**31)


def site_schema(site: SiteConfig, state: SiteState, schema_fp: str) -> Schema | SiteReply:
    """The site's schema, or the reply that refuses the round because it is not the study's."""
    try:
        schema = Schema.load(site.schema_path)
    except SchemaError as exc:
        return SiteReply(SCHEMA_MISMATCH, status_metrics(site, state), problems=[str(exc)])
    if schema_fingerprint(schema) != schema_fp:
        return SiteReply(
            SCHEMA_MISMATCH,
            status_metrics(site, state),
            problems=[
                f"the site's schema {site.schema_path} differs from the study's published "
                "schema; get the coordinator's schema file"
            ],
        )
    return schema


def train_site(
    site: SiteConfig,
    study: StudyConfig,
    schema_fp: str,
    global_state: dict[str, np.ndarray],
    state: SiteState,
    server_round: int,
) -> SiteReply:
    """Run one round at a site; mutates ``state`` only when something was released."""
    schema = site_schema(site, state, schema_fp)
    if isinstance(schema, SiteReply):
        return schema
    try:
        data = load_encoded(site, schema)
    except TableCheckError as exc:
        log.warning("site %s: %s", site.name, exc)  # full detail stays in the site's log
        return SiteReply(INVALID_DATA, status_metrics(site, state), problems=exc.shareable())

    plan = RoundPlan(study.sample_rate, study.local_epochs, study.loss_report)
    seed = round_seed(study, site.name, server_round)
    dp: DPSettings | None = None
    if site.dp:
        state.ledger.mechanism = study.accountant
        sigma = noise_for(site, study)
        count_pending = study.count_noise if state.noisy_count is None else None
        nxt = round_cost(state.ledger, sigma, plan, count_pending)
        if nxt.epsilon(site.delta) > site.epsilon * (1 + 1e-9):
            return SiteReply(BUDGET_EXHAUSTED, status_metrics(site, state))
        dp = DPSettings(noise_multiplier=sigma, max_grad_norm=study.max_grad_norm)

    model = get_generator(study.generator)(schema, seed=study.seed, **study.generator_params)
    model.load_state_dict(global_state)
    if state.histogram is None:
        state.histogram = release_histogram(model, data, study.count_noise if dp else None, seed)
        state.noisy_count = max(1.0, float(round(state.histogram.sum())))
        if dp is not None:
            state.ledger.record(study.count_noise, 1.0, 1)
    if model.statistics_column() is not None:
        model.set_statistics(np.clip(state.histogram, 0.0, None))
    stats = train_round(
        model,
        data,
        epochs=study.local_epochs,
        sample_rate=study.sample_rate,
        dp=dp,
        ledger=state.ledger if dp else None,
        seed=seed,
        proximal_mu=study.proximal_mu if study.strategy == "fedprox" else 0.0,
    )
    if dp is not None and study.loss_report:
        loss = dp_loss_report(
            model,
            data,
            sample_rate=study.sample_rate,
            noise_multiplier=dp.noise_multiplier,
            ledger=state.ledger,
            seed=seed + 1,
        )
    else:
        loss = stats.mean_loss if dp is None else math.nan
    state.rounds_trained += 1
    count = float(state.noisy_count) if dp is not None else float(len(data))
    metrics = {
        "num-examples": count,
        "loss": float(loss) if math.isfinite(loss) else -1.0,
        "steps": float(stats.steps),
        "noise-multiplier": dp.noise_multiplier if dp else 0.0,
        "train-seconds": stats.seconds,
        **status_metrics(site, state),
    }
    return SiteReply(TRAINED, metrics, arrays=model.state_dict())
