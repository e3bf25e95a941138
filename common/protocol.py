"""Every message between a site and the coordinator: its kinds, records, keys, statuses.

Both sides import this module and nothing of each other, so a key is written once and
a change to a message is one change here. Flower carries each message as a
``RecordDict`` of named records (``ArrayRecord``, ``ConfigRecord``, ``MetricRecord``);
the dataclasses below are the typed view of each message kind, with ``to_content()``
and ``from_content()`` at the Flower boundary:

- ``TrainRequest`` (Flower ``train``): the study's plan and the model to start from (in
  clear, or the CKKS sum of last round's updates); a site replies with a ``SiteReply``
  carrying its weights (in clear or as ciphertexts) and its DP metrics.
- ``ReleaseRequest`` (Flower ``query``): an encrypted study's last step: a site
  decrypts the final sum once, floods it and hands it back.
- ``ValidationRequest`` (Flower ``evaluate``): the released model and the size and seed
  of ``synthetic.csv``; a site scores its own sample of it (``client/evaluate.py``).

- a deep generator's ``query.grid`` (``GRID_MESSAGE``): before training, each site's
  noisy histograms of the numeric columns over their public bounds, from which the
  coordinator derives the study's quantile grid (``common/quantile_grid.py``); below.
- a measured study's ``query.marginal`` (``MARGINAL_MESSAGE``): the marginal
  generator's one message kind, below.

What each key may contain, privacy-wise, is the threat-model table of docs/privacy.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

# ---------------------------------------------------------------- record names


ARRAYS = "arrays"  # ArrayRecord: model weights (a request's start, a reply's update)
CONFIG = "config"  # ConfigRecord: the study's plan and the request's own keys
METRICS = "metrics"  # MetricRecord: a reply's DP metrics and its privacy status
SITE = "site"  # ConfigRecord: who replied, with what status and which problems
CKKS = "ckks"  # ConfigRecord: ciphertexts and their layout, both ways

# ---------------------------------------------------------------- keys of ``site``

SITE_NAME = "name"
STATUS = "status"
PROBLEMS = "problems"

# ---------------------------------------------------------------- keys of ``config``

SERVER_ROUND = "server-round"
SCHEMA_FINGERPRINT = "schema-fingerprint"
KIND = "kind"  # what a query asks for (see ``QueryKind``)
RELEASE = "release"  # the flag of the release query (kept for deployed coordinators)
VALIDATION_ROWS = "validation-rows"
VALIDATION_SEED = "validation-seed"

# ---------------------------------------------------------------- keys of ``metrics``

NUM_EXAMPLES = "num-examples"  # the DP count: FedAvg's weight (a constant under CKKS)
LOSS = "loss"  # the DP loss report
STEPS = "steps"
NOISE_MULTIPLIER = "noise-multiplier"
EPSILON = "epsilon"
DELTA = "delta"
EPSILON_BUDGET = "epsilon-budget"
REPRODUCIBLE_NOISE = "reproducible-noise"
# distributed noise (masked sums; docs/privacy.md "Distributed noise"): the split a
# site's releases used (the study's H; a marginal status reply: the largest the site
# accepts, its honest-sites), the std the sum carries (what its ledger charges) and its
# epsilon were every other site to collude with the coordinator (its ledger with the
# noise it added itself); all public, functions of settings and plans
HONEST_SITES = "honest-sites"
SIGMA_CHARGED = "sigma-charged"
EPSILON_ALONE = "epsilon-alone"
#: Every key a trained reply may hold in clear (tests pin the set); the last two only
#: in a masked deep study, whose quantile grid may have split the noise.
TRAIN_METRIC_KEYS = frozenset(
    {NUM_EXAMPLES, LOSS, STEPS, NOISE_MULTIPLIER, EPSILON, DELTA, EPSILON_BUDGET,
     REPRODUCIBLE_NOISE, HONEST_SITES, EPSILON_ALONE}
)
#: The privacy status every reply carries, whatever its kind.
STATUS_METRIC_KEYS = frozenset({EPSILON, DELTA, EPSILON_BUDGET, REPRODUCIBLE_NOISE})

# ---------------------------------------------------------------- keys of ``ckks``

CHUNKS = "chunks"  # a site's encrypted update: list of serialized CKKS vectors
AGGREGATE = "aggregate"  # the coordinator's sum of the accepted updates
LAYOUT = "layout"  # StateLayout.to_json(): a ConfigRecord cannot hold a nested dict
AGGREGATE_ROUND = "aggregate-round"  # the round whose replies were summed (0: none)
#: ``num-examples`` of every encrypted reply: the real weights are in the ciphertexts.
ENCRYPTED_WEIGHT = 1.0


class QueryKind(StrEnum):
    """What a Flower ``query`` message asks a site for."""

    RELEASE = "release"


class Status(StrEnum):
    """Every status a reply (or the coordinator's log of a site's round) can have."""

    # training
    TRAINED = "trained"
    BUDGET_EXHAUSTED = "budget-exhausted"
    INVALID_DATA = "invalid-data"
    SCHEMA_MISMATCH = "schema-mismatch"
    ENCRYPTION_REQUIRED = "encryption-required"
    # encryption
    NO_KEYS = "no-keys"
    AGGREGATE_REFUSED = "aggregate-refused"
    ENCRYPTION_FAILED = "encryption-failed"
    RELEASED = "released"
    GRID_RELEASED = "grid-released"  # a site's quantile-grid histograms (query.grid)
    BUDGET_STATED = "budget-stated"  # a status reply: the budget only, nothing released
    ALREADY_RELEASED = "already-released"
    UNSUPPORTED_QUERY = "unsupported-query"
    # federated validation
    EVALUATED = "evaluated"
    INVALID_SYNTHETIC = "invalid-synthetic"
    DECLINED = "declined"
    ALREADY_VALIDATED = "already-validated"
    NOT_THE_RELEASE = "not-the-release"
    # the coordinator's own verdicts on a reply
    REFUSED = "refused"
    FAILED = "failed"
    UNKNOWN = "unknown"


def _arrays(record: Any) -> dict[str, np.ndarray] | None:
    if not isinstance(record, ArrayRecord):
        return None
    return {k: v.numpy() for k, v in record.items()}


def _array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


@dataclass
class SiteReply:
    """What a site answers to any request: a status, metrics, and what it releases."""

    status: str
    metrics: dict[str, float]
    arrays: dict[str, np.ndarray] | None = None
    problems: list[str] = field(default_factory=list)
    # CKKS ciphertexts of the update and their layout, in an encrypted study
    chunks: list[bytes] | None = None
    layout: str | None = None

    def to_content(self, site_name: str) -> RecordDict:
        content = RecordDict(
            {
                METRICS: MetricRecord(self.metrics),
                SITE: ConfigRecord(
                    {SITE_NAME: site_name, STATUS: str(self.status), PROBLEMS: self.problems}
                ),
            }
        )
        if self.arrays is not None:
            content[ARRAYS] = _array_record(self.arrays)
        if self.chunks is not None:
            content[CKKS] = ConfigRecord({CHUNKS: self.chunks, LAYOUT: self.layout or ""})
        return content

    @staticmethod
    def site_of(content: RecordDict) -> tuple[str, str, list[str]]:
        """(name, status, problems) of a reply, tolerant of what a broken site sends."""
        info = dict(content[SITE]) if SITE in content else {}
        return (
            str(info.get(SITE_NAME, "")),
            str(info.get(STATUS, Status.UNKNOWN)),
            [str(p) for p in info.get(PROBLEMS, [])],
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> tuple[str, SiteReply]:
        """The site's name and its reply, as the coordinator reads them."""
        name, status, problems = cls.site_of(content)
        metrics = dict(content[METRICS]) if METRICS in content else {}
        ckks = dict(content[CKKS]) if CKKS in content else {}
        chunks = ckks.get(CHUNKS)
        return name, cls(
            status=status,
            metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
            arrays=_arrays(content[ARRAYS]) if ARRAYS in content else None,
            problems=problems,
            chunks=list(chunks) if isinstance(chunks, list) else None,
            layout=str(ckks[LAYOUT]) if LAYOUT in ckks else None,
        )


@dataclass
class TrainRequest:
    """The coordinator's training round: the study plan and where to start from.

    ``arrays`` is the global model in clear (every round of a study in clear; round 1 of
    an encrypted one), ``aggregate`` the CKKS sum of the last accepted updates."""

    config: dict[str, Any]
    arrays: dict[str, np.ndarray] | None = None
    aggregate: list[bytes] | None = None
    layout: str | None = None

    @property
    def server_round(self) -> int:
        return int(self.config.get(SERVER_ROUND, 0))

    @property
    def schema_fingerprint(self) -> str:
        return str(self.config[SCHEMA_FINGERPRINT])

    def to_content(self) -> RecordDict:
        content = RecordDict({CONFIG: ConfigRecord(self.config)})
        if self.arrays is not None:
            content[ARRAYS] = _array_record(self.arrays)
        if self.aggregate is not None or self.layout is not None:
            ckks: dict[str, Any] = {LAYOUT: self.layout or ""}
            if self.aggregate is not None:
                ckks[AGGREGATE] = self.aggregate
            content[CKKS] = ConfigRecord(ckks)
        return content

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainRequest:
        ckks = dict(content[CKKS]) if CKKS in content else {}
        aggregate = ckks.get(AGGREGATE)
        layout = ckks.get(LAYOUT)
        return cls(
            config=dict(content[CONFIG]),
            arrays=_arrays(content[ARRAYS]) if ARRAYS in content else None,
            aggregate=list(aggregate) if isinstance(aggregate, list) else None,
            layout=str(layout) if layout else None,
        )


@dataclass
class ValidationRequest:
    """Federated validation: the released model, and the size and seed of the table the
    coordinator sampled from it (``synthetic.csv``); the site samples it itself."""

    config: dict[str, Any]
    arrays: dict[str, np.ndarray] | None
    rows: int
    seed: int

    def to_content(self) -> RecordDict:
        config = {**self.config, VALIDATION_ROWS: int(self.rows), VALIDATION_SEED: int(self.seed)}
        content = RecordDict({CONFIG: ConfigRecord(config)})
        if self.arrays is not None:
            content[ARRAYS] = _array_record(self.arrays)
        return content

    @classmethod
    def from_content(cls, content: RecordDict) -> ValidationRequest:
        config = dict(content[CONFIG])
        return cls(
            config=config,
            arrays=_arrays(content[ARRAYS]) if ARRAYS in content else None,
            rows=int(config.get(VALIDATION_ROWS, 0)),
            seed=int(config.get(VALIDATION_SEED, 0)),
        )


# ---------------------------------------------------------------- marginal measurement
# A measured study's one message kind (``MARGINAL_MESSAGE``, a Flower ``query`` with
# its own action). The coordinator's content:
#
# - ``config``: the study's run config (``StudyConfig.to_flat``), the
#   ``schema-fingerprint``, and the keys below;
# - for ``score``: the ``MODEL_RECORD`` ArrayRecord, the model's normalised marginal of
#   each candidate under ``p.<i>`` (public: post-processing of earlier releases);
# - for ``decrypt``: the ``CKKS_COUNTS`` ConfigRecord with the summed ciphertexts.
#
# The site's reply: ``site`` (name, status, problems) and ``metrics`` (epsilon spent,
# budget, the noise levels it uses) as in every reply, plus the noisy vector in clear
# (``COUNTS_RECORD``, ArrayRecord ``values``), encrypted (``CKKS_COUNTS``) or masked
# (``MASKED_COUNTS``).

MARGINAL_ACTION = "marginal"
MARGINAL_MESSAGE = f"query.{MARGINAL_ACTION}"

# config keys of a marginal message
OP = "marginal-op"  # MEASURE_OP | SCORE_OP | DECRYPT_OP | STATUS_OP (also query.grid's)
RELEASE_KIND = "marginal-kind"  # plan.FINE|ONE_WAY|CODES|PAIRS|LINKS|MEASURE: what is charged
CLIQUES = "marginal-cliques"  # JSON list of attribute-name lists
PLAN = "marginal-plan"  # JSON of MarginalPlan: each site calibrates its own noise from it
STEP = "marginal-step"  # 1, 2, ...: the release's place in the study (logs, test noise)
# JSON of the cells to count on (generators/marginal/discretize.binning_to_json):
# {"fine": F} for the fine 1-way release, {"fine": F, "cuts": {column: [...]}} after it
# (bins made of fine cells, derived from the summed noisy fine counts: public). Absent:
# equal-width bins of the public range.
BINNING = "marginal-binning"

MEASURE_OP = "measure"
SCORE_OP = "score"
DECRYPT_OP = "decrypt"
# no release: the reply's status metrics only (the site's budget and delta, as in every
# reply), from which the coordinator plans for the noise its sums will carry
STATUS_OP = "status"

# distributed noise (study honest-sites H > 1): JSON of the common NoiseLevels every
# site adds 1/H of (the most private site's calibration; common/generators/marginal/
# plan.py); bound into the masks with the rest of the request
NOISE_LEVELS = "marginal-noise"

# records
MODEL_RECORD = "marginal-model"  # coordinator -> site (score): p.<i> arrays
COUNTS_RECORD = "marginal-counts"  # site -> coordinator, in clear: "values"
CKKS_COUNTS = "marginal-ckks"  # ciphertexts both ways: CHUNKS, LAYOUT
# site -> coordinator under secure-aggregation = "masks": "values", the vector in fixed
# point plus the site's pairwise masks, uint64 (common/encryption/masks.py)
MASKED_COUNTS = "marginal-masked"
VALUES = "values"

# reply metrics (besides epsilon, delta, epsilon-budget)
SIGMA_ONE_WAY = "sigma-one-way"
SIGMA_SCORE = "sigma-score"
SIGMA_MEASURE = "sigma-measure"
SIGMA_RELEASED = "sigma"  # the noise std of this reply's vector (what the site added)
#: Every metric a marginal reply may hold in clear (tests pin the set): all public.
MARGINAL_METRIC_KEYS = STATUS_METRIC_KEYS | {SIGMA_ONE_WAY, SIGMA_SCORE, SIGMA_MEASURE,
                                             SIGMA_RELEASED, HONEST_SITES, SIGMA_CHARGED,
                                             EPSILON_ALONE}


# ---------------------------------------------------------------- quantile grid
# A deep generator's study asks each site once, before round 1 (``GRID_MESSAGE``, a
# Flower ``query`` with its own action). The coordinator's content: ``config``, the
# study's run config and the ``schema-fingerprint``. The site's reply: ``site`` and
# ``metrics`` as in every reply, plus ``GRID_CELL_STD`` (the std of its noise per
# cell, 0 without DP) and the noisy counts (the ``arrays`` record, key ``values``: every
# numeric column's cells in schema order), in clear. Under CKKS the counts travel as
# ciphertexts (the ``CKKS`` record) and one site decrypts their sum (``OP`` =
# ``DECRYPT_OP``, the sum in the ``CKKS`` record; its reply: ``values``, flooded), once
# per study (docs/privacy.md). Under secure-aggregation = "masks" the counts travel masked
# (key ``GRID_MASKED``, uint64, common/encryption/masks.py) and the reply's metrics
# add ``HONEST_SITES``, ``SIGMA_CHARGED`` and ``EPSILON_ALONE``; a split (honest-sites
# H > 1) is preceded by one status request (``OP`` = ``STATUS_OP``: the budgets), and
# each grid request then carries ``GRID_NOISE``.

GRID_ACTION = "grid"
GRID_MESSAGE = f"query.{GRID_ACTION}"
GRID_CELL_STD = "grid-cell-std"  # the std of the noise this site added, per cell
GRID_MASKED = "masked-values"
# distributed noise: the common noise multiplier of the grid release (the largest any
# site's budget needs, quantile_grid.grid_noise_for); each site adds 1/H of its variance
GRID_NOISE = "grid-common-noise"


# ---------------------------------------------------------------- on the wire
# Flower 1.41 moves every Array of a message as objects of their own (the array and its
# chunk), and on a deployment each object is a request of its own at every hop
# (coordinator -> SuperLink -> SuperNode -> ClientApp, and back); the SuperNode pulls a
# message's objects two at a time and offers the message to its ClientApp before they
# are all in. The drill's TVAE (17 tensors) made a training message of 38 objects, which
# cost seconds per round on a loaded machine (docs/deployment.md). So every ArrayRecord
# of several arrays crosses the network as ONE array under ``PACKED`` (6 objects for the
# whole message): a uint8 vector holding a 4-byte little-endian header length, a JSON
# header listing each entry's key, dtype and shape in order, then the entries' bytes in
# C order. The coordinator packs what it sends and unpacks what it receives in one Grid
# wrapper (``server/packed_grid.py``), a site in one wrapper of its handlers
# (``client/app.py``); everything else sees the named arrays. The packing is lossless
# and adds nothing: the same arrays, the same bytes, in another envelope.

PACKED = "packed"
_PACKABLE_KINDS = "biuf"  # bool, signed and unsigned integers, floats: no objects, no text


class WireFormatError(ValueError):
    """A packed record that does not decode to exactly the arrays its header lists."""


def pack_arrays(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Named arrays as one uint8 vector (header, then each array's bytes)."""
    entries = [np.ascontiguousarray(a) for a in arrays.values()]
    header = json.dumps([[k, a.dtype.str, list(a.shape)]
                         for k, a in zip(arrays, entries, strict=True)]).encode()
    parts = [len(header).to_bytes(4, "little"), header, *(a.tobytes() for a in entries)]
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def unpack_arrays(packed: np.ndarray) -> dict[str, np.ndarray]:
    """The named arrays of ``pack_arrays``; a header that does not match the bytes, or
    a dtype that is not a number, is refused."""
    raw = np.ascontiguousarray(packed, dtype=np.uint8).tobytes()
    try:
        size = int.from_bytes(raw[:4], "little")
        header = json.loads(raw[4 : 4 + size])
        out: dict[str, np.ndarray] = {}
        offset = 4 + size
        for key, dtype_str, shape in header:
            dtype = np.dtype(dtype_str)
            if dtype.kind not in _PACKABLE_KINDS or str(key) in out:
                raise WireFormatError(f"entry {key!r}: dtype {dtype_str} or a repeated key")
            count = int(np.prod(shape, dtype=np.int64))
            end = offset + count * dtype.itemsize
            if count < 0 or end > len(raw):
                raise WireFormatError(f"entry {key!r} runs past the packed bytes")
            out[str(key)] = np.frombuffer(raw, dtype, count, offset).reshape(shape).copy()
            offset = end
    except (ValueError, TypeError) as exc:
        raise WireFormatError(f"a packed array record does not decode: {exc}") from None
    if offset != len(raw):
        raise WireFormatError(f"{len(raw) - offset} packed bytes belong to no entry")
    return out


def _worth_packing(record: Any) -> bool:
    """An ArrayRecord of several arrays (one array is one array already). ``PACKED`` is
    the envelope's name, which no array of a message may have."""
    if not isinstance(record, ArrayRecord) or len(record) < 2:
        return False
    if PACKED in record:
        raise WireFormatError(f"an array may not be named {PACKED!r} (the wire's envelope)")
    return True


def pack_content(content: RecordDict) -> RecordDict:
    """``content`` with every ArrayRecord of several arrays as one packed array (a
    packed record is one array: packing twice changes nothing)."""
    return RecordDict({
        name: ArrayRecord({PACKED: Array(pack_arrays(_arrays(record) or {}))})
        if _worth_packing(record) else record
        for name, record in content.items()
    })


def is_packed(record: Any) -> bool:
    """Whether ``record`` is a packed ArrayRecord (its one entry is the envelope)."""
    return isinstance(record, ArrayRecord) and list(record.keys()) == [PACKED]


def unpack_content(content: RecordDict, *, drop_bad: bool = False) -> RecordDict:
    """``content`` with every packed record as its named arrays again. A record that
    does not decode raises ``WireFormatError``, or with ``drop_bad`` (the coordinator
    reading a site's reply) is left out, as if the site had sent none."""
    out = RecordDict()
    for name, record in content.items():
        if is_packed(record):
            try:
                record = _array_record(unpack_arrays(record[PACKED].numpy()))
            except WireFormatError:
                if not drop_bad:
                    raise
                continue
        out[name] = record
    return out


# ---------------------------------------------------------------- waiting for replies
# How often the coordinator asks the SuperLink for the replies of a message it sent
# (``server/prompt_grid.py``): the first look comes this soon after sending, each later
# one waits half as long again, never more than the last figure. Flower 1.41's own
# ``send_and_receive`` waits a fixed 3 s between looks in a deployment (0.1 s in its
# simulation), which alone made a deployed round several times a simulated one.
REPLY_POLL_FIRST_S = 0.05
REPLY_POLL_GROWTH = 1.5
REPLY_POLL_MAX_S = 0.5

# Flower 1.41's setting for how often a SuperExec asks its SuperNode (or SuperLink) for
# a new task, in seconds (Flower's default 1.0): a documented environment variable. A
# site's runtime (client/runtime.py) and the local deployment harness use 0.2.
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_S = "0.2"
