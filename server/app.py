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

Each round waits at most ``round-timeout`` seconds for the sites; with
``record-messages`` set, every message's layout is logged (``server/recording.py``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ..client.secure import RELEASED
from ..common.encryption import KeySetupError, StateLayout, load_public_context
from ..common.generators import Generator, ModelFileError, get_generator
from ..common.schema import Schema
from ..common.study import ConfigError, StudyConfig, schema_fingerprint
from .optimizer import ServerMomentum, buffer_keys, load_velocity, save_velocity
from .recording import RecordingGrid
from .secure import (
    EncryptedCheckpoint,
    SecureAggregationMixin,
    make_secure_strategy,
    read_encrypted_checkpoint,
    write_encrypted_checkpoint,
)
from .strategy import RoundLog, SiteAwareMixin, make_strategy, update_bounds
from .validation import run_federated_validation, write_federated

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


class StudyFailed(RuntimeError):
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
    from ..simulations.datasets import bundled_schema_path

    return Schema.load(bundled_schema_path(ref))


def _history_to_json(history: list[RoundLog]) -> list[dict[str, Any]]:
    return [asdict(r) for r in history]


def _history_from_json(raw: list[dict[str, Any]]) -> list[RoundLog]:
    from .strategy import SiteRound

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


def run_study(
    grid: Grid,
    study: StudyConfig,
    schema: Schema,
    on_round: Callable[[RoundLog], None] | None = None,
) -> StudyOutcome:
    """Run (or resume) a study on ``grid`` and write its outputs to ``study.output_dir``."""
    out = Path(study.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = get_generator(study.generator)(schema, seed=study.seed, **study.generator_params)
    secure = study.secure_aggregation == "ckks"
    history: list[RoundLog] = []
    done = 0
    ckpt = out / (ENCRYPTED_CHECKPOINT if secure else CHECKPOINT)
    resumed: EncryptedCheckpoint | None = None
    if study.resume and ckpt.exists():
        if secure:
            resumed = read_encrypted_checkpoint(ckpt)
            meta = resumed.meta
        else:
            meta = Generator.read_meta(ckpt)
        if meta.get("study-id") != study.study_id:
            raise ModelFileError(
                f"checkpoint {ckpt} belongs to study {meta.get('study-id')!r}, not "
                f"{study.study_id!r}; use another output folder or the matching study id"
            )
        if not secure:
            model = Generator.load(ckpt)
        done = int(meta["round"])
        history = _history_from_json(meta.get("history", []))
        stream.info("resuming study %s after round %d (checkpoint %s)", study.study_id, done,
                    ckpt)
    remaining = study.num_server_rounds - done
    extra = {**study.to_flat(), "schema-fingerprint": schema_fingerprint(schema)}
    sealed: SecureAggregationMixin | None = None
    strategy: SiteAwareMixin
    if secure:
        strategy = sealed = _secure_strategy(study, model, extra, done, resumed, ckpt)
    else:
        strategy = make_strategy(
            study.strategy,
            num_sites=0,
            min_sites=study.min_sites,
            proximal_mu=study.proximal_mu,
            extra_config=extra,
            round_offset=done,
        )
    strategy.history = history
    strategy.on_round = on_round
    if not secure:
        strategy.max_update = update_bounds(
            model.networks(), model.hparams, study.local_epochs, study.sample_rate
        )
        strategy.server_opt = _server_step(study, out / MOMENTUM, done)
        strategy.plain_keys = frozenset(buffer_keys(model.networks()))
    if study.record_messages:
        grid = RecordingGrid(grid, Path(study.record_messages))

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        meta = {
            "study-id": study.study_id,
            "round": server_round + done,
            "history": _history_to_json(strategy.history),
        }
        if sealed is not None:  # nothing readable to save: the sum of ciphertexts is it
            meta["aggregate-round"] = sealed.aggregate_round
            write_encrypted_checkpoint(ckpt, meta, sealed.layout, sealed.aggregate)
            return None
        if strategy.server_opt is not None:  # first: a resume checks it against the model
            save_velocity(out / MOMENTUM, strategy.server_opt, server_round + done)
        model.load_state_dict({k: v.numpy() for k, v in arrays.items()})
        model.save(ckpt, extra=meta)
        return None

    start = time.perf_counter()
    if remaining > 0:
        result = strategy.start(  # type: ignore[attr-defined]
            grid=grid,
            initial_arrays=ArrayRecord({k: Array(v) for k, v in model.state_dict().items()}),
            num_rounds=remaining,
            timeout=study.round_timeout,
            train_config=ConfigRecord(),
            evaluate_fn=checkpoint,
        )
        if len(result.arrays) > 0:  # empty when no site trained, or when encrypted
            model.load_state_dict({k: v.numpy() for k, v in result.arrays.items()})
    secure_summary: dict[str, Any] | None = None
    if sealed is not None:
        secure_summary = _release(sealed, grid, model, study, ckpt)
    seconds = time.perf_counter() - start
    if not any(r.aggregated and r.included for r in strategy.history):
        # No round ever combined enough sites: an untrained model and samples from it
        # must not look like a study's result.
        failed = {
            "study": study.to_flat(),
            "status": "no-training",
            "rounds_completed": len(strategy.history),
            "sites": final_site_privacy(strategy.history),
            "rounds": _history_to_json(strategy.history),
        }
        (out / SUMMARY).write_text(json.dumps(failed, indent=1, default=_json_default))
        raise StudyFailed(
            f"no round had at least {study.min_sites} site(s) that trained; see "
            f"{out / SUMMARY} for what each site replied"
        )
    model.save(out / MODEL, extra={"study-id": study.study_id, "round": study.num_server_rounds})

    n = study.n_synthetic
    if n <= 0:
        # Encrypted studies log no row counts (weights are None), so this falls back to
        # 1000 rows: the coordinator does not know the total, by design.
        last = next((r for r in reversed(strategy.history) if r.included), None)
        weights = [s.weight or 0.0 for s in last.sites if s.weight] if last else []
        n = max(1, int(round(sum(weights)))) if weights else 1000
    write_synthetic(model, out / SYNTHETIC, n, seed=study.seed)
    summary = {
        "study": study.to_flat(),
        "schema": schema.name,
        "generator_parameters": model.num_parameters(),
        "rounds_completed": len(strategy.history),
        "n_synthetic": n,
        "seconds_federated": seconds,
        "sites": final_site_privacy(strategy.history),
        "rounds": _history_to_json(strategy.history),
    }
    if secure_summary is not None:
        summary["secure_aggregation"] = secure_summary
    if study.federated_validation:
        summary["federated_validation"] = validate_at_sites(grid, study, schema, out)
    (out / SUMMARY).write_text(json.dumps(summary, indent=1, default=_json_default))
    return StudyOutcome(out, len(strategy.history), strategy.history, seconds)


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


def validate_at_sites(grid: Grid, study: StudyConfig, schema: Schema, out: Path) -> dict[str, Any]:
    """Federated validation of the released synthetic table: every site scores it against
    its own rows and sends back scores only; the coordinator combines them."""
    synthetic = pd.read_csv(out / SYNTHETIC)
    config = {**study.to_flat(), "schema-fingerprint": schema_fingerprint(schema)}
    result, skipped = run_federated_validation(
        grid, synthetic, config, min_sites=1, wait=60.0, timeout=study.round_timeout
    )
    written = write_federated(result, out) if result is not None else None
    return {"written": str(written) if written else None, "left_out": skipped}


def _secure_strategy(
    study: StudyConfig,
    model: Generator,
    extra: dict[str, Any],
    done: int,
    resumed: EncryptedCheckpoint | None,
    ckpt: Path,
) -> SecureAggregationMixin:
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
                f"checkpoint {ckpt} holds ciphertexts of another model layout (generator, "
                "its parameters or count-bound changed); resume with the study's settings"
            )
        aggregate = resumed.aggregate or None
        aggregate_round = int(resumed.meta.get("aggregate-round", 0))
    return make_secure_strategy(
        study.strategy,
        min_sites=study.min_sites,
        proximal_mu=study.proximal_mu,
        extra_config=extra,
        public_ctx=public_ctx,
        layout=layout,
        round_offset=done,
        aggregate=aggregate,
        aggregate_round=aggregate_round,
    )


def _release(
    strategy: SecureAggregationMixin, grid: Grid, model: Generator, study: StudyConfig,
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
        "scheme": "ckks",
        "public_context": study.public_context,
        "ciphertexts_per_update": strategy.layout.n_chunks,
        "bytes_per_update": sum(len(c) for c in strategy.aggregate or []),
        "plaintext_bytes_per_update": plain_bytes,
        "released_by": next(
            (e.site for e in strategy.releases if e.status == RELEASED), None
        ),
        "release_attempts": [asdict(e) for e in strategy.releases],
    }


def final_site_privacy(history: list[RoundLog]) -> dict[str, dict[str, Any]]:
    """Each site's last reported epsilon and status, and the rounds it trained in."""
    sites: dict[str, dict[str, Any]] = {}
    for record in history:
        for s in record.sites:
            entry = sites.setdefault(
                s.site,
                {"epsilon": None, "rounds_trained": 0, "last_status": None, "problems": []},
            )
            if s.epsilon is not None:
                entry["epsilon"] = None if s.epsilon < 0 else s.epsilon
            entry["rounds_trained"] += int(s.status == "trained")
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
        run_study(grid, cfg, resolve_schema(cfg.schema), on_round)

    return app


app = make_server_app()
