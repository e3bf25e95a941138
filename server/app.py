"""The coordinator's Flower ServerApp.

It starts from a fresh generator built from the published schema (no data needed),
runs the rounds with a site-aware FedAvg or FedProx, checkpoints the global generator
after every round (so an interrupted study resumes where it stopped), and at the end
saves the generator and samples the synthetic table. Everything it writes is DP
post-processing of the sites' releases.

With ``secure-aggregation = "ckks"`` (``server/secure.py``) it holds only the public
context, so it checkpoints the summed ciphertexts (``checkpoint.ckks``) instead of a
model, and after the last round one site releases the decrypted, flooded final model,
which is then saved and sampled as usual.

Each round waits at most ``round-timeout`` seconds for the sites, every ask through
one prompt reply loop (``server/prompt_grid.py``), every array record packed into one
array on the wire (``server/packed_grid.py``); with ``record-messages`` set, every
message's layout is logged as it crosses the network (``server/recording.py``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ..common.encryption import KeySetupError, StateLayout, load_public_context
from ..common.errors import FedsynthError
from ..common.generators import Generator, ModelFileError, get_generator
from ..common.generators.base import GRID_PARAM, HEAPS_PARAM, NO_DP_RELEASE
from ..common.privacy.randomness import NOT_A_DP_RELEASE
from ..common.protocol import AGGREGATE_ROUND, SCHEMA_FINGERPRINT, Status
from ..common.schema import Schema
from ..common.study import ConfigError, StudyConfig, schema_fingerprint
from .grid import CHECKPOINT_GRID, with_grid
from .guards import clear_guards, update_bounds
from .optimizer import ServerMomentum, buffer_keys, load_velocity, save_velocity
from .packed_grid import PackedGrid
from .prompt_grid import PromptGrid
from .recording import RecordingGrid
from .rounds import RoundLog, SiteRound
from .secure import (
    EncryptedCheckpoint,
    SecureAggregation,
    make_secure_strategy,
    read_encrypted_checkpoint,
    write_encrypted_checkpoint,
)
from .strategy import SiteAware, make_strategy

log = logging.getLogger("fedsynth.coordinator")
# Flower's own logger: what `flwr run --stream` and `flwr log` show the coordinator at
# INFO level (our logger reaches that stream from WARNING up only).
stream = logging.getLogger("flwr")

CHECKPOINT = "checkpoint.fsg"
ENCRYPTED_CHECKPOINT = "checkpoint.ckks"
MODEL = "model.fsg"
SYNTHETIC = "synthetic.csv"
MOMENTUM = "momentum.npz"
SUMMARY = "summary.json"
#: The coordinator's wall time of the run, kept out of the publishable summary.json: a
#: round's time grows with the sites' rows (Poisson batches), a side channel DP does not
#: cover (docs/privacy.md, "Timing"). ``fedsynth simulate`` moves it into its
#: ``validation.json``, where the row counts and its other timings stay with the data.
TIMINGS = "timings.json"
SECONDS_FEDERATED = "seconds_federated"
#: The simulation's file of figures computed in clear (row counts, timings, validation).
VALIDATION = "validation.json"
#: The checkpoint meta key of the quantile-grid step's replies (a resumed study's figures
#: must still count a grid release made before the restart).
GRID_LOG = "grid-log"


class StudyFailed(FedsynthError, RuntimeError):
    """The study produced no trained model; the summary says what each site replied."""


@dataclass
class StudyOutcome:
    output_dir: Path
    rounds_completed: int
    history: list[RoundLog]
    seconds: float


def resolve_schema(ref: str) -> Schema:
    """A schema file path, or the name of a bundled dataset's schema."""
    path = Path(ref)
    if path.is_file():
        return Schema.load(path)
    from ..common.bundled import bundled_schema_path

    return Schema.load(bundled_schema_path(ref))


def _history_to_json(history: list[RoundLog]) -> list[dict[str, Any]]:
    return [asdict(r) for r in history]


def _history_from_json(raw: list[dict[str, Any]]) -> list[RoundLog]:
    return [
        RoundLog(
            round=r["round"],
            sites=[SiteRound(**s) for s in r["sites"]],
            aggregated=bool(r.get("aggregated", True)),
        )
        for r in raw
    ]


def write_synthetic(model: Generator, path: Path, n: int, seed: int, header: bool = True) -> None:
    frame = model.sample(n, seed=seed)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False, header=header)
    tmp.replace(path)


@dataclass
class Resumed:
    """Where a study picks up: rounds done, the log so far, the encrypted sum if any."""

    done: int = 0
    history: list[RoundLog] = field(default_factory=list)
    encrypted: EncryptedCheckpoint | None = None
    grid_log: list[SiteRound] = field(default_factory=list)  # the grid step's replies


def run_study(
    grid: Grid,
    study: StudyConfig,
    schema: Schema,
    on_round: Callable[[RoundLog], None] | None = None,
) -> StudyOutcome:
    """Run (or resume) a study on ``grid`` and write its outputs to ``study.output_dir``:
    resume from the checkpoint, train the remaining rounds, release the final model
    (an encrypted study's sites decrypt it), publish the model, samples and summary."""
    if study.record_messages:  # every message of the study, as it crosses the network
        grid = RecordingGrid(grid, Path(study.record_messages))
    grid = PackedGrid(grid)  # each array record travels as one array (common/protocol.py)
    if study.generator == "marginal":  # measured, not trained: its own message kind
        from .marginal import run_marginal_study

        return run_marginal_study(grid, study, schema, on_round)
    out = Path(study.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / (ENCRYPTED_CHECKPOINT if study.encrypted else CHECKPOINT)
    study, grid_log = with_grid(grid, study, schema, ckpt)  # the sites' DP grid, if any
    model = get_generator(study.generator)(schema, seed=study.seed, **study.generator_params)
    resumed = resume(study, ckpt, model)
    grid_log = grid_log or resumed.grid_log
    strategy = build_strategy(study, schema, model, resumed, out, on_round)
    start = time.perf_counter()
    train(grid, study, model, strategy, resumed.done, ckpt, out, grid_log)
    secure_summary = None
    if isinstance(strategy, SecureAggregation):
        secure_summary = _release(strategy, grid, model, study, ckpt)
    seconds = time.perf_counter() - start
    publish(grid, study, schema, model, strategy.history, out, seconds, secure_summary,
            grid_log)
    return StudyOutcome(out, len(strategy.history), strategy.history, seconds)


def resume(study: StudyConfig, ckpt: Path, model: Generator) -> Resumed:
    """The state a resumed study starts from (nothing when it does not resume); a clear
    study's checkpoint is loaded into ``model``."""
    if not (study.resume and ckpt.exists()):
        return Resumed()
    encrypted = read_encrypted_checkpoint(ckpt) if study.encrypted else None
    meta = encrypted.meta if encrypted is not None else Generator.read_meta(ckpt)
    if meta.get("study-id") != study.study_id:
        raise ModelFileError(
            f"checkpoint {ckpt} belongs to study {meta.get('study-id')!r}, not "
            f"{study.study_id!r}; use another output folder or the matching study id"
        )
    if encrypted is None:
        model.load_state_dict(Generator.load(ckpt).state_dict())
    done = int(meta["round"])
    stream.info("resuming study %s after round %d (checkpoint %s)", study.study_id, done, ckpt)
    return Resumed(done, _history_from_json(meta.get("history", [])), encrypted,
                   [SiteRound(**s) for s in meta.get(GRID_LOG, [])])


def build_strategy(
    study: StudyConfig,
    schema: Schema,
    model: Generator,
    resumed: Resumed,
    out: Path,
    on_round: Callable[[RoundLog], None] | None,
) -> SiteAware | SecureAggregation:
    """The study's strategy: site-aware FedAvg/FedProx with the guards of a study in
    clear (shapes, update bound, epsilon) and server momentum, or wrapped for CKKS."""
    common: dict[str, Any] = {
        "min_sites": study.min_sites,
        "proximal_mu": study.proximal_mu,
        "extra_config": {**study.to_flat(), SCHEMA_FINGERPRINT: schema_fingerprint(schema)},
        "round_offset": resumed.done,
        "history": resumed.history,
        "on_round": on_round,
    }
    if study.encrypted:
        return _secure_strategy(study, model, common, resumed.encrypted, out)
    bounds = update_bounds(model.networks(), model.training_spec(), study.local_epochs,
                           study.sample_rate)
    return make_strategy(
        study.strategy,
        guards=clear_guards(bounds),
        server_optimizer=_server_step(study, out / MOMENTUM, resumed.done),
        plain_keys=frozenset(buffer_keys(model.networks())),
        **common,
    )


def train(
    grid: Grid,
    study: StudyConfig,
    model: Generator,
    strategy: SiteAware | SecureAggregation,
    done: int,
    ckpt: Path,
    out: Path,
    grid_log: list[SiteRound],
) -> None:
    """The remaining rounds on Flower's loop, checkpointing after each; ``model`` ends
    as the last global model (in clear; an encrypted study's is released after)."""
    if study.num_server_rounds - done <= 0:
        return

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        meta = {
            "study-id": study.study_id,
            "round": server_round + done,
            "history": _history_to_json(strategy.history),
            GRID_LOG: [asdict(s) for s in grid_log],
        }
        if isinstance(strategy, SecureAggregation):  # the sum of ciphertexts is all
            meta[AGGREGATE_ROUND] = strategy.aggregate_round
            # the grid (post-processing, in the model anyway): a resumed study reads it
            # here, since each site decrypts the grid's sum once only
            meta[CHECKPOINT_GRID] = {k: study.generator_params[k] for k in
                                     (GRID_PARAM, HEAPS_PARAM) if k in study.generator_params}
            write_encrypted_checkpoint(ckpt, meta, strategy.layout, strategy.aggregate)
            return None
        if strategy.server_opt is not None:  # first: a resume checks it against the model
            save_velocity(out / MOMENTUM, strategy.server_opt, server_round + done)
        model.load_state_dict({k: v.numpy() for k, v in arrays.items()})
        model.save(ckpt, extra=meta)
        return None

    result = strategy.start(  # type: ignore[union-attr]
        grid=grid,
        initial_arrays=ArrayRecord({k: Array(v) for k, v in model.state_dict().items()}),
        num_rounds=study.num_server_rounds - done,
        timeout=study.round_timeout,
        train_config=ConfigRecord(),
        evaluate_fn=checkpoint,
    )
    if len(result.arrays) > 0:  # empty when no site trained, or when encrypted
        model.load_state_dict({k: v.numpy() for k, v in result.arrays.items()})


def publish(
    grid: Grid,
    study: StudyConfig,
    schema: Schema,
    model: Generator,
    history: list[RoundLog],
    out: Path,
    seconds: float,
    secure_summary: dict[str, Any] | None,
    grid_log: list[SiteRound],
) -> None:
    """Write the released model, the synthetic table and the summary (DP releases and
    public settings only), the run's timings beside it (``TIMINGS``); ask the sites to
    validate when the study says so."""
    privacy = privacy_log(grid_log, history)
    if not any(r.aggregated and r.included for r in history):
        # No round ever combined enough sites: an untrained model and samples from it
        # must not look like a study's result.
        failed = {
            "study": study.to_flat(),
            "status": "no-training",
            "rounds_completed": len(history),
            "sites": final_site_privacy(privacy),
            "grid_release": [asdict(s) for s in grid_log],
            "rounds": _history_to_json(history),
        }
        (out / SUMMARY).write_text(json.dumps(failed, indent=1, default=_json_default))
        raise StudyFailed(
            f"no round had at least {study.min_sites} site(s) that trained; see "
            f"{out / SUMMARY} for what each site replied"
        )
    label = release_label(privacy)
    model.save(out / MODEL, extra={"study-id": study.study_id,
                                   "round": study.num_server_rounds, "privacy": label})
    n = study.n_synthetic
    if n <= 0:
        # The sum of the last round's DP counts (a release, so post-processing); an
        # encrypted study logs none, so 1000 rows: the coordinator does not know the total.
        last = next((r for r in reversed(history) if r.included), None)
        weights = [s.weight or 0.0 for s in last.sites if s.weight] if last else []
        n = max(1, int(round(sum(weights)))) if weights else 1000
    write_synthetic(model, out / SYNTHETIC, n, seed=study.seed)
    summary = {
        "privacy": label,
        "study": study.to_flat(),
        "schema": schema.name,
        "generator_parameters": model.num_parameters(),
        "rounds_completed": len(history),
        "n_synthetic": n,
        "sites": final_site_privacy(privacy),
        "grid_release": [asdict(s) for s in grid_log],
        "rounds": _history_to_json(history),
    }
    if secure_summary is not None:
        summary["secure_aggregation"] = secure_summary
    elif study.masked:
        summary["secure_aggregation"] = masked_summary(privacy)
    if study.federated_validation:
        summary["federated_validation"] = validate_at_sites(grid, study, schema, out, model, n)
    write_timings(out, seconds)
    (out / SUMMARY).write_text(json.dumps(summary, indent=1, default=_json_default))


def write_timings(out: Path, seconds: float) -> None:
    """Keep the run's wall time beside the summary, not in it (``TIMINGS``): written
    before summary.json, so a fresh summary always has fresh timings."""
    (out / TIMINGS).write_text(json.dumps({SECONDS_FEDERATED: seconds}, indent=1))


def read_timings(folder: str | Path) -> dict[str, float]:
    """A study folder's coordinator timings: ``TIMINGS`` (a coordinator's folder), else
    the simulation's ``VALIDATION`` it was moved into; empty when neither has them."""
    folder = Path(folder)
    for name in (TIMINGS, VALIDATION):
        path = folder / name
        if path.is_file():
            saved = json.loads(path.read_text())
            if SECONDS_FEDERATED in saved:
                return {SECONDS_FEDERATED: float(saved[SECONDS_FEDERATED])}
    return {}


def _server_step(study: StudyConfig, velocity_file: Path, done: int) -> ServerMomentum | None:
    """The coordinator's momentum step, with its velocity when a study resumes (none for
    a generator that opts out: ``Generator.server_momentum``)."""
    if study.server_lr == 1.0 and study.server_momentum == 0.0:
        return None
    if not get_generator(study.generator).server_momentum:
        return None
    opt = ServerMomentum(study.server_lr, study.server_momentum)
    if done > 0:
        opt.velocity = load_velocity(velocity_file, done)
        if not opt.velocity:
            stream.info("server momentum restarts from zero (no velocity saved for round %d)",
                        done)
    return opt


def validate_at_sites(
    grid: Grid, study: StudyConfig, schema: Schema, out: Path, model: Generator, rows: int
) -> dict[str, Any]:
    """Federated validation of the released synthetic table: every site samples it from
    the released model (so it is synthetic.csv), scores it against its own rows and
    sends back scores only; the coordinator combines them."""
    # Imported here: the validation suite (scikit-learn, the report's matplotlib) costs
    # a second of every ServerApp's start, and only a study that validates needs it.
    from .validation import run_federated_validation, write_federated

    config = {**study.to_flat(), SCHEMA_FINGERPRINT: schema_fingerprint(schema)}
    result, skipped = run_federated_validation(
        grid, model.state_dict(), rows, study.seed, config, min_sites=1, wait=60.0,
        timeout=study.round_timeout,
    )
    written = write_federated(result, out) if result is not None else None
    return {"written": str(written) if written else None, "left_out": skipped}


def _secure_strategy(
    study: StudyConfig,
    model: Generator,
    common: dict[str, Any],
    resumed: EncryptedCheckpoint | None,
    out: Path,
) -> SecureAggregation:
    """The encrypted strategy, with the coordinator's public context and a resumed sum."""
    if not study.public_context:
        raise ConfigError(
            "secure-aggregation = 'ckks' needs public-context: the coordinator's public CKKS "
            "context written by `fedsynth keys study-init` (it holds no key)"
        )
    try:
        public_ctx = load_public_context(study.public_context)
    except KeySetupError as exc:
        raise ConfigError(str(exc)) from None
    layout = StateLayout.from_state(model.state_dict(), count_bound=study.count_bound)
    aggregate, aggregate_round = None, 0
    if resumed is not None:
        if resumed.layout != layout:
            raise ModelFileError(
                f"checkpoint {out / ENCRYPTED_CHECKPOINT} holds ciphertexts of another model "
                "layout (generator, its parameters or count-bound changed); resume with the "
                "study's settings"
            )
        aggregate = resumed.aggregate or None
        aggregate_round = int(resumed.meta.get(AGGREGATE_ROUND, 0))
    return make_secure_strategy(
        study.strategy,
        public_ctx=public_ctx,
        layout=layout,
        aggregate=aggregate,
        aggregate_round=aggregate_round,
        **common,
    )


def _release(
    strategy: SecureAggregation, grid: Grid, model: Generator, study: StudyConfig,
    ckpt: Path
) -> dict[str, Any]:
    """The release step of an encrypted study: one site hands over the final model."""
    released = strategy.release(
        grid, final_round=study.num_server_rounds, timeout=study.round_timeout
    )
    if released is not None:
        model.load_state_dict(released)
    elif strategy.aggregate is not None:
        reasons = "; ".join(f"{e.site}: {e.status} ({e.reason})" for e in strategy.releases)
        raise RuntimeError(
            f"no site released the final model ({reasons or 'no site answered'}); the "
            f"encrypted sum is kept in {ckpt}: rerun with resume to ask the sites again"
        )
    plain_bytes = sum(
        math.prod(s) * np.dtype(d).itemsize
        for s, d in zip(strategy.layout.shapes, strategy.layout.dtypes, strict=True)
    )
    return {
        "scheme": study.secure_aggregation,
        "public_context": study.public_context,
        "ciphertexts_per_update": strategy.layout.n_chunks,
        "bytes_per_update": sum(len(c) for c in strategy.aggregate or []),
        "plaintext_bytes_per_update": plain_bytes,
        "released_by": next(
            (e.site for e in strategy.releases if e.status == Status.RELEASED), None
        ),
        "release_attempts": [asdict(e) for e in strategy.releases],
    }


def privacy_log(grid_log: list[SiteRound], history: list[RoundLog]) -> list[RoundLog]:
    """Every reply that may have spent a site's budget, for the privacy figures and the
    label: the quantile-grid step's (round 0) and the training rounds'. A site that
    released its grid and never trained has spent that release all the same."""
    return [RoundLog(0, list(grid_log), aggregated=False), *history] if grid_log else history


def release_label(history: list[RoundLog]) -> str:
    """What the study's outputs are, privacy-wise, from what the sites said they ran.

    A site that trained with a reproducible (replayable) noise seed or without DP makes
    the whole release non-DP; every output then says so, so that a benchmark's model
    cannot pass for a private one.
    """
    replayable = sorted({s.site for r in history for s in r.sites if s.reproducible_noise})
    released = (Status.TRAINED, Status.GRID_RELEASED)
    no_dp = sorted({s.site for r in history for s in r.sites
                    if s.status in released and s.epsilon is not None and s.epsilon < 0})
    if replayable:
        return f"{NOT_A_DP_RELEASE} (sites {', '.join(replayable)})"
    if no_dp:
        return f"{NO_DP_RELEASE} (sites {', '.join(no_dp)} trained without DP)"
    if trusting := sorted({s.site for r in history for s in r.sites if s.honest_sites > 1}):
        return ("DP release under distributed noise: each site's epsilon holds while "
                "its honest-sites (itself included) do not collude with the coordinator; "
                f"sites {', '.join(trusting)} split their noise (summary: epsilon_alone)")
    return "DP release: post-processing of every site's DP training"


def masked_summary(history: list[RoundLog]) -> dict[str, Any]:
    """A masked deep study's aggregation: its quantile grid was summed under masks (and
    split ``honest_sites`` ways), its model updates travelled in clear. Each site's
    split and its epsilon should every other site collude with the coordinator, from
    its last reply that says so: trained, its grid release, or a spent budget (a site
    that split its grid and then stopped spent it all the same; docs/privacy.md,
    "Distributed noise")."""
    spent = (Status.TRAINED, Status.GRID_RELEASED, Status.BUDGET_EXHAUSTED)
    last = {s.site: s for r in history for s in r.sites if s.status in spent}
    return {
        "scheme": "masks",
        "masked": "quantile-grid release (model updates in clear)",
        "honest_sites": {n: s.honest_sites for n, s in sorted(last.items())},
        "epsilon_alone": {n: s.epsilon_alone for n, s in sorted(last.items())},
    }


def final_site_privacy(history: list[RoundLog]) -> dict[str, dict[str, Any]]:
    """Each site's epsilon, its last status, and the rounds it trained in.

    The epsilon is the largest the site reported, not the last: a ledger only grows,
    so a lower figure later is a reply the coordinator's guards refused (its figure is
    not trusted) or an error; the grid step's replies count (``privacy_log``)."""
    sites: dict[str, dict[str, Any]] = {}
    for record in history:
        for s in record.sites:
            entry = sites.setdefault(
                s.site,
                {"epsilon": None, "epsilon_budget": None, "delta": None, "rounds_trained": 0,
                 "last_status": None, "problems": [], "reproducible_noise": False},
            )
            if s.epsilon is not None:
                eps = None if s.epsilon < 0 else s.epsilon
                entry["epsilon"] = (eps if eps is None or entry["epsilon"] is None
                                    else max(entry["epsilon"], eps))
            if s.budget is not None:
                entry["epsilon_budget"] = None if s.budget < 0 else s.budget
            if s.delta is not None:
                entry["delta"] = s.delta
            entry["reproducible_noise"] |= s.reproducible_noise
            entry["rounds_trained"] += int(s.status == Status.TRAINED)
            entry["last_status"] = s.status
            entry["problems"] = list(s.problems) or ([s.reason] if s.reason else [])
    return sites


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def make_server_app(
    study: StudyConfig | None = None,
    on_round: Callable[[RoundLog], None] | None = None,
) -> ServerApp:
    """A ServerApp; ``study`` fixes the config (else it is read from the run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = study or StudyConfig.from_flat(dict(context.run_config))
        # Every ask of the study waits for replies in one prompt loop (a deployment's
        # Flower grid would look only every 3 s): server/prompt_grid.py.
        run_study(PromptGrid(grid), cfg, resolve_schema(cfg.schema), on_round)

    return app


app = make_server_app()
