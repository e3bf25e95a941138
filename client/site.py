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
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..common.encoding import TabularEncoder
from ..common.generators import get_generator
from ..common.generators.base import release_histogram
from ..common.privacy import (
    DPSettings,
    PrivacyLedger,
    RoundPlan,
    dp_loss_report,
    round_cost,
    train_round,
)
from ..common.privacy.plan import PrivacyPlan
from ..common.privacy.randomness import DPRandomness
from ..common.protocol import (
    DELTA,
    EPSILON,
    EPSILON_ALONE,
    EPSILON_BUDGET,
    HONEST_SITES,
    LOSS,
    NOISE_MULTIPLIER,
    NUM_EXAMPLES,
    REPRODUCIBLE_NOISE,
    STEPS,
    SiteReply,
    Status,
)
from ..common.schema import Schema, SchemaError
from ..common.study import SiteConfig, StudyConfig, schema_fingerprint
from ..common.table import TableCheckError, read_table

log = logging.getLogger("fedsynth.site")

# The statuses a training reply can have (common/protocol.py), under their old names.
TRAINED = Status.TRAINED
BUDGET_EXHAUSTED = Status.BUDGET_EXHAUSTED
INVALID_DATA = Status.INVALID_DATA
SCHEMA_MISMATCH = Status.SCHEMA_MISMATCH
ENCRYPTION_REQUIRED = Status.ENCRYPTION_REQUIRED
NOT_A_REAL_NODE_SETTING = "not allowed on a real SuperNode"


@dataclass
class SiteState:
    """What a site remembers: its table's lifetime ledger and the current study's state.

    The ledger is the table's, not the study's: it holds every release the table made in
    every study, so a coordinator that starts a new study id gets what is left of the
    budget, never a fresh one. The per-study fields (the one count release, the noise
    calibrated at the study's first round, rounds trained, the replayable reply, the
    once-per-study answers) belong to ``study_id``; other studies' are kept aside in
    ``other_studies`` so a site can take part in two studies in turn.
    """

    ledger: PrivacyLedger = field(default_factory=PrivacyLedger)
    study_id: str = ""
    noisy_count: float | None = None
    histogram: np.ndarray | None = None  # the one DP histogram release (sum = count)
    # the one quantile-grid release (client/grid.py): asked again, the site resends it
    grid_counts: np.ndarray | None = None
    # the Gaussian std that release was drawn with (0 without DP): a resend reports this,
    # not one computed from the asking request's grid-share (None: a state file written
    # before this was kept)
    grid_noise: float | None = None
    # How a masked grid release was made, "<H>:<common noise multiplier>" ("" in clear):
    # asked again, the site resends it only under the same split (client/grid.py)
    grid_split: str = ""
    # Whether this site decrypted a CKKS study's summed grid: once per study, as the
    # final model (fresh flooding each time could be averaged away)
    grid_decrypted: bool = False
    # The noise multiplier calibrated at this study's first round against what was left
    # of the lifetime budget then; fixed for the rest of the study.
    noise_multiplier: float | None = None
    rounds_trained: int = 0
    # The last trained reply, kept in state-dir for a coordinator that asks the same
    # round again (client/replay.py): its round, the digest of the model it answered and
    # the checksum of the stored reply. Empty when nothing is kept.
    replay_round: int = 0
    replay_digest: str = ""
    replay_checksum: str = ""
    # Questions a site answers once per study: the release of an encrypted study's final
    # model (a coordinator that asks again could average the flooding noise away) and
    # federated validation (each answer is a statistic of the rows).
    final_released: bool = False
    validated: bool = False
    # The request digests this study's masked replies answered (common/encryption/
    # masks.py): a digest is never masked twice, so no two vectors share a mask.
    masked_digests: list[str] = field(default_factory=list)
    # The honest-sites split of this study's first split-able release (0: none yet): a
    # site never mixes splits in one study (a score against a 1-way *share* made under
    # H > 1, asked at H = 1, would cost about twice its charge).
    split_h: int = 0
    # The layouts of the vectors this site encrypted in a CKKS marginal study, one per
    # vector: each allows one decryption of a sum so laid out (a sum per release, no
    # more; the flooding of many decryptions of one ciphertext could be averaged away).
    decryptable: list[str] = field(default_factory=list)
    # Lifetime, like the ledger: the releases made with distributed noise, as (std the
    # ledger charged, std this site added, count); ``alone_ledger`` swaps them in.
    shares: list[tuple[float, float, int]] = field(default_factory=list)
    other_studies: dict[str, dict[str, Any]] = field(default_factory=dict)

    def alone_ledger(self) -> PrivacyLedger:
        """The ledger as it would read were every other site to collude with the
        coordinator: each distributed-noise release at the noise this site added."""
        if not self.shares:
            return self.ledger
        history = [list(h) for h in self.ledger.history]
        for charged, added, count in self.shares:
            left = count
            for entry in history:
                if left and entry[0] == charged and entry[1] == 1.0:
                    take = min(left, entry[2])
                    entry[2] -= take
                    left -= take
            history.append([added, 1.0, count])
        return PrivacyLedger(self.ledger.mechanism,
                             [(float(a), float(b), int(c)) for a, b, c in history if c > 0])

    def _study_record(self) -> dict[str, Any]:
        return {
            "noisy-count": -1.0 if self.noisy_count is None else float(self.noisy_count),
            "histogram": [] if self.histogram is None else [float(v) for v in self.histogram],
            "released": self.histogram is not None,
            "grid-counts": [] if self.grid_counts is None else [float(v) for v in self.grid_counts],
            "grid-release-made": self.grid_counts is not None,
            "grid-noise": -1.0 if self.grid_noise is None else float(self.grid_noise),
            "grid-split": self.grid_split,
            "grid-decrypted": self.grid_decrypted,
            "noise-multiplier-used": -1.0 if self.noise_multiplier is None
            else float(self.noise_multiplier),
            "rounds-trained": self.rounds_trained,
            "replay-round": self.replay_round,
            "replay-digest": self.replay_digest,
            "replay-checksum": self.replay_checksum,
            "final-released": self.final_released,
            "validated": self.validated,
            "masked-digests": list(self.masked_digests),
            "split-h": self.split_h,
            "decryptable": list(self.decryptable),
        }

    def _load_study(self, rec: dict[str, Any]) -> None:
        count = float(rec.get("noisy-count", -1.0))
        sigma = float(rec.get("noise-multiplier-used", -1.0))
        released = bool(rec.get("released", False))
        self.noisy_count = None if count < 0 else count
        self.histogram = (
            np.asarray(rec.get("histogram", []), dtype=float) if released else None
        )
        self.grid_counts = (np.asarray(rec.get("grid-counts", []), dtype=float)
                            if rec.get("grid-release-made", False) else None)
        kept = float(rec.get("grid-noise", -1.0))
        self.grid_noise = None if kept < 0 else kept
        self.grid_split = str(rec.get("grid-split", ""))
        self.grid_decrypted = bool(rec.get("grid-decrypted", False))
        self.noise_multiplier = None if sigma <= 0 else sigma
        self.rounds_trained = int(rec.get("rounds-trained", 0))
        self.replay_round = int(rec.get("replay-round", 0))
        self.replay_digest = str(rec.get("replay-digest", ""))
        self.replay_checksum = str(rec.get("replay-checksum", ""))
        self.final_released = bool(rec.get("final-released", False))
        self.validated = bool(rec.get("validated", False))
        self.masked_digests = [str(d) for d in rec.get("masked-digests", [])]
        self.split_h = int(rec.get("split-h", 0))
        self.decryptable = [str(d) for d in rec.get("decryptable", [])]

    def for_study(self, study_id: str) -> SiteState:
        """Make ``study_id`` the current study, keeping the others' state (and the ledger)."""
        if study_id == self.study_id:
            return self
        record = self._study_record()
        # a study that released nothing has nothing to keep: a coordinator that sends
        # refused requests under ever new ids would otherwise grow the file without end
        if self.study_id and record != _FRESH_STUDY:
            self.other_studies[self.study_id] = record
        self._load_study(self.other_studies.pop(study_id, {}))
        self.study_id = study_id
        return self

    def to_record(self) -> dict[str, Any]:
        """Flat values (a Flower ConfigRecord can hold them); other studies as JSON."""
        rec = self.ledger.to_record()
        rec.update(self._study_record())
        rec["study-id"] = self.study_id
        rec["shares"] = json.dumps([list(x) for x in self.shares])
        rec["other-studies"] = json.dumps(self.other_studies, sort_keys=True)
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> SiteState:
        state = cls(ledger=PrivacyLedger.from_record(rec), study_id=str(rec.get("study-id", "")))
        state._load_study(rec)
        shares = rec.get("shares", "[]")
        state.shares = [(float(a), float(b), int(c)) for a, b, c in
                        (json.loads(shares) if isinstance(shares, str) else shares)]
        others = rec.get("other-studies", "{}")
        state.other_studies = json.loads(others) if isinstance(others, str) else dict(others)
        return state

    def save(self, path: Path) -> None:
        """Write atomically, owner-only: a crash must never leave half a ledger."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ledger-")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.to_record(), fh)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        if self.ledger.history:  # a trace the ledger's loss cannot take with it
            path.with_name(LEDGER_KEPT).touch(mode=0o600, exist_ok=True)


#: A study's record before it released anything (``SiteState.for_study`` keeps no such).
_FRESH_STUDY = SiteState()._study_record()

#: An empty file beside the ledger once it records a release (``past_activity``).
LEDGER_KEPT = ".ledger-kept"

_TABLES: dict[tuple[str, float, str], np.ndarray] = {}

#: The site's encoded table, kept in its state-dir between rounds (see ``load_encoded``).
ENCODED_PREFIX = "encoded-"


def _code_digest() -> str:
    """The checker's and encoder's source: a cached table made by other code is stale."""
    common = Path(__file__).resolve().parents[1] / "common"
    h = hashlib.sha256()
    for name in ("table.py", "encoding.py", "schema.py"):
        h.update((common / name).read_bytes())
    return h.hexdigest()


def _encoded_cache(site: SiteConfig, path: Path, schema: Schema) -> Path | None:
    """``state-dir/encoded-<digest>.npy``, keyed by the file's bytes, the schema and the
    code that checks and encodes it; None without a state-dir."""
    if not site.state_dir or not path.is_file():
        return None
    h = hashlib.sha256(path.read_bytes())
    h.update(schema_fingerprint(schema).encode())
    h.update(_code_digest().encode())
    return Path(site.state_dir) / f"{ENCODED_PREFIX}{h.hexdigest()[:40]}.npy"


def load_encoded(site: SiteConfig, schema: Schema) -> np.ndarray:
    """Read, check and encode the site's table once per file content.

    Within a process the result is kept in memory; a deployed site, whose SuperNode
    starts a new ClientApp process for every round, also keeps it in its ``state-dir``
    (owner-only, like the ledger: it is the site's own rows, encoded), keyed by the
    SHA-256 of the file, so a round reads one array instead of checking and encoding
    the table again. A changed file gets a new key (and is checked again); the stale
    copy is removed. Nothing random is kept: the encoding is a fixed function of the
    file and the schema.
    """
    path = Path(site.data_path)
    mtime = path.stat().st_mtime if path.exists() else -1.0
    key = (str(path.resolve()), mtime, schema_fingerprint(schema))
    if key in _TABLES:
        return _TABLES[key]
    cache = _encoded_cache(site, path, schema)
    if cache is not None and cache.is_file():
        try:
            _TABLES[key] = np.load(cache, allow_pickle=False)
            return _TABLES[key]
        except (OSError, ValueError):  # a torn or foreign file: rebuild it below
            cache.unlink(missing_ok=True)
    frame = read_table(path, schema)
    _TABLES[key] = TabularEncoder(schema).encode(frame)
    if cache is not None:
        _save_private_array(cache, _TABLES[key])
    return _TABLES[key]


def _save_private_array(path: Path, array: np.ndarray) -> None:
    """Write atomically and owner-only; drop the site's older encoded tables."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".encoded-", suffix=".npy")
    with os.fdopen(fd, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    for old in path.parent.glob(f"{ENCODED_PREFIX}*.npy"):
        if old != path:
            old.unlink(missing_ok=True)


LEDGER_FILE = "site-ledger.json"


def ledger_path(site: SiteConfig) -> Path | None:
    """The one ledger of the site's table, for every study: ``state-dir/site-ledger.json``.

    Not keyed by the study id: the coordinator picks study ids, and a ledger per study
    would let it reset a site's budget by naming a new study.
    """
    if not site.state_dir:
        return None
    return Path(site.state_dir) / LEDGER_FILE


class LostLedgerError(RuntimeError):
    """The site's ledger is gone or damaged while its state-dir shows it was used: the
    site refuses every request until an operator restores it."""


def past_activity(state_dir: Path) -> list[str]:
    """Files a site writes only once its ledger records a release (the ledger's own
    trace, a stored reply, a released model): a state-dir holding any had a ledger.
    The encoded table is a cache, written before any release, and does not count."""
    return sorted(p.name for pattern in (LEDGER_KEPT, "reply-*.bin", "released-*.npz")
                  for p in state_dir.glob(pattern))


def load_site_state(site: SiteConfig, study_id: str) -> SiteState:
    """The site's state from its state-dir (empty without one), switched to ``study_id``.

    Ledgers of an older layout (one ``ledger-<study>.json`` per study) are composed into
    the lifetime ledger the first time, so their releases keep counting.
    """
    path = ledger_path(site)
    if path is None:
        return SiteState().for_study(study_id)
    if path.is_file():
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or "noise" not in record:
            raise LostLedgerError(f"{path} holds no ledger (no 'noise' history): it is "
                                  "damaged; restore it from a backup")
        return SiteState.from_record(record).for_study(study_id)
    if traces := past_activity(Path(site.state_dir)):
        raise LostLedgerError(
            f"{path} is missing, but {site.state_dir} holds files of earlier rounds "
            f"({', '.join(traces[:3])}): the ledger was lost, and starting from zero "
            "would spend this table's budget again. Restore it from a backup")
    state = SiteState()
    for old in sorted(Path(site.state_dir).glob("ledger-*.json")):
        prior = SiteState.from_record(json.loads(old.read_text()))
        state.ledger.mechanism = prior.ledger.mechanism
        for release in prior.ledger.history:
            state.ledger.record(*release)
        study = old.stem.removeprefix("ledger-")
        state.other_studies[study] = prior._study_record()
    return state.for_study(study_id)


def released_model_path(site: SiteConfig, study_id: str) -> Path | None:
    """Where an encrypted study's site keeps the final model it decrypted and released,
    so that federated validation can check the coordinator asks about that model only."""
    if not site.state_dir:
        return None
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in study_id)
    return Path(site.state_dir) / f"released-{safe}.npz"


def noise_for(site: SiteConfig, study: StudyConfig, prior: PrivacyLedger | None = None) -> float:
    """The site's own fixed noise, or the smallest that fits what is left of its budget.

    ``prior`` is the table's ledger before this study (earlier studies' releases): the
    whole planned study must fit in the budget that they left.
    """
    if site.noise_multiplier is not None:
        return site.noise_multiplier
    return _calibrated(
        PrivacyPlan.from_study(study, site.epsilon, site.delta),
        site.epsilon,
        site.delta,
        tuple(prior.history) if prior is not None else (),
    )


@functools.lru_cache(maxsize=64)
def _calibrated(
    plan: PrivacyPlan, epsilon: float, delta: float, prior: tuple[tuple[float, float, int], ...]
) -> float:
    return plan.noise_for(epsilon, delta, prior)


def status_metrics(site: SiteConfig, state: SiteState) -> dict[str, float]:
    """The privacy a site has spent, and its budget, sent with every reply.

    None depends on a row: the spent epsilon on the public plan (and on earlier studies'
    plans), the budget on the site's policy. The coordinator refuses a reply whose
    epsilon passes the budget.
    """
    eps = state.ledger.epsilon(site.delta) if site.dp else -1.0
    return {
        EPSILON: eps,
        DELTA: site.delta if site.dp else 0.0,
        EPSILON_BUDGET: site.epsilon if site.dp else -1.0,
        # 1: this site's noise was replayable (tests, benchmarks): nothing it sent is a
        # DP release, and the coordinator labels every output so.
        REPRODUCIBLE_NOISE: 1.0 if site.reproducible_noise_seed is not None else 0.0,
    }


#: The smallest noise std (per count, in the release's own units) a site adds when it
#: splits its noise: the sum of h discrete Gaussians of std >= 1 is charged as one
#: Gaussian exactly to 6 decimals of the Renyi divergence (benchmarks/distributed-noise),
#: at 0.5 up to 15% under (the family is not closed under sums).
MIN_SHARE_STD = 1.0
#: A split release is charged as a Gaussian of this fraction of the sum's noise: the
#: exact Renyi divergence of a sum of 2-18 discrete Gaussian shares of std >= 1 exceeds
#: the Gaussian's by at most 2.1e-7 (relative, orders 1.5-256; benchmarks/
#: distributed-noise/summed_discrete_gaussian.py), and (1 - 1e-6)^-2 covers that.
SPLIT_CHARGE_MARGIN = 1.0 - 1e-6


def over_budget(site: SiteConfig, ledger: PrivacyLedger) -> bool:
    """Whether ``ledger`` (the site's, with a release it is about to make) passes the
    site's budget: every kind of release asks this before anything is drawn."""
    return ledger.epsilon(site.delta) > site.epsilon * (1 + 1e-9)


def split_problem(state: SiteState, h: int) -> str:
    """Why a request's split ``h`` is refused in this study ("" if it is not): every
    release of a study is made under the split of its first (``SiteState.split_h``)."""
    if state.split_h and state.split_h != h:
        return (f"this study's releases were made with honest-sites = {state.split_h}; a "
                f"request with honest-sites = {h} is refused (a site never mixes splits "
                "within a study): ask under a new study id")
    return ""


def study_metrics(site: SiteConfig, study: StudyConfig, state: SiteState) -> dict[str, float]:
    """Status metrics; in a masked study also the split and ``epsilon-alone``, in every
    reply (a site that split its grid and then ran out of budget still says what it
    spent should the others collude)."""
    if not study.masked:
        return status_metrics(site, state)
    return {**status_metrics(site, state), **split_metrics(site, state, study.honest_sites)}


def split_metrics(site: SiteConfig, state: SiteState, honest_sites: int) -> dict[str, float]:
    """The distributed-noise metrics of a reply: the split ``honest_sites`` and the
    site's epsilon were every other site to collude with the coordinator (its ledger
    with the noise it added itself). Both public: functions of its trust setting and
    the plans, never of a row."""
    alone = state.alone_ledger().epsilon(site.delta) if site.dp else -1.0
    return {HONEST_SITES: float(honest_sites), EPSILON_ALONE: alone}


def round_randomness(site: SiteConfig, study: StudyConfig, server_round: int) -> DPRandomness:
    """Where this round's DP draws come from: the OS CSPRNG, fresh on every call.

    Nothing the coordinator sends or knows (study seed, round, site name) determines
    them. Only a site-local ``reproducible-noise-seed`` (tests and benchmarks; refused
    on a real SuperNode) makes them repeatable, and then study and round keep each
    round's draws apart.
    """
    return site.randomness(f"{study.study_id}:{server_round}")


def site_table(site: SiteConfig, state: SiteState, schema_fp: str
               ) -> tuple[Schema, np.ndarray] | SiteReply:
    """The study's schema and the site's encoded table, or the reply that refuses the
    request (another schema, or a table that fails its check)."""
    schema = site_schema(site, state, schema_fp)
    if isinstance(schema, SiteReply):
        return schema
    try:
        return schema, load_encoded(site, schema)
    except TableCheckError as exc:
        log.warning("site %s: %s", site.name, exc)  # full detail stays in the site's log
        return SiteReply(INVALID_DATA, status_metrics(site, state), problems=exc.shareable())


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


def _admit(site: SiteConfig, study: StudyConfig, state: SiteState, plan: RoundPlan,
           commit: Callable[[SiteState], None] | None) -> DPSettings | SiteReply:
    """The round's DP settings once its whole cost fits the budget, or the refusal.

    The whole planned cost (count release, every step, the loss report) is saved
    through ``commit`` before anything is drawn: a round that then fails (an exception,
    the process killed for memory) stays charged. The failure of a round is itself a
    fact the coordinator sees, and it can make it depend on the rows (the twelfth
    session's audit: a ddpm multiplicity whose per-sample norms outgrow memory exactly
    above a row count), so an uncharged failure was a free probe, as often as asked."""
    state.ledger.mechanism = study.accountant
    if state.noise_multiplier is None:
        try:  # calibrated once per study, against what earlier studies left
            state.noise_multiplier = noise_for(site, study, prior=state.ledger)
        except ValueError as exc:
            log.warning("site %s: %s", site.name, exc)
            return SiteReply(BUDGET_EXHAUSTED, study_metrics(site, study, state))
    sigma = state.noise_multiplier
    # pending exactly when the release below will be made (a marginal 1-way release
    # under the same study id sets the noisy count but makes no histogram)
    count_pending = study.count_noise if state.histogram is None else None
    nxt = round_cost(state.ledger, sigma, plan, count_pending)
    if over_budget(site, nxt):
        return SiteReply(BUDGET_EXHAUSTED, study_metrics(site, study, state))
    if commit is not None:  # the in-memory ledger records the steps as they run
        commit(replace(state, ledger=nxt))
    return DPSettings(noise_multiplier=sigma, max_grad_norm=study.max_grad_norm)


def train_site(
    site: SiteConfig,
    study: StudyConfig,
    schema_fp: str,
    global_state: dict[str, np.ndarray],
    state: SiteState,
    server_round: int,
    commit: Callable[[SiteState], None] | None = None,
) -> SiteReply:
    """Run one round at a site; mutates ``state`` only when something was released.
    ``commit`` saves a state: the round's whole cost is saved through it before any
    draw (``_admit``)."""
    table = site_table(site, state, schema_fp)
    if isinstance(table, SiteReply):
        return table
    schema, data = table

    plan = RoundPlan(study.sample_rate, study.local_epochs, study.loss_report)
    rand = round_randomness(site, study, server_round)
    dp: DPSettings | None = None
    if site.dp:
        admitted = _admit(site, study, state, plan, commit)
        if isinstance(admitted, SiteReply):
            return admitted
        dp = admitted

    model = get_generator(study.generator)(schema, seed=study.seed, **study.generator_params)
    model.load_state_dict(global_state)
    data = model.encoder.reencode(data, TabularEncoder(schema))  # onto the study's grid
    if state.histogram is None:
        state.histogram = release_histogram(
            model, data, study.count_noise if dp else None, rand.release("count-release")
        )
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
        randomness=rand,
        proximal_mu=study.proximal_mu if study.strategy == "fedprox" else 0.0,
        federated=True,
        rows=state.noisy_count if dp is not None else None,  # the DP count, not len(data)
    )
    if dp is not None and study.loss_report:
        loss = dp_loss_report(
            model,
            data,
            sample_rate=study.sample_rate,
            noise_multiplier=dp.noise_multiplier,
            ledger=state.ledger,
            randomness=rand,
        )
    else:
        loss = stats.mean_loss if dp is None else math.nan
    state.rounds_trained += 1
    count = float(state.noisy_count) if dp is not None else float(len(data))
    metrics = {  # no timing: a round's seconds grow with the row count, uncharged
        NUM_EXAMPLES: count,
        LOSS: float(loss) if math.isfinite(loss) else -1.0,
        STEPS: float(stats.steps),
        NOISE_MULTIPLIER: dp.noise_multiplier if dp else 0.0,
        **study_metrics(site, study, state),  # a masked study's split: its grid's
    }
    return SiteReply(TRAINED, metrics, arrays=model.state_dict())
