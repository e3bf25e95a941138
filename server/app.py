"""The coordinator's Flower ServerApp.

It starts from a fresh generator built from the published schema (no data needed),
runs the rounds with a site-aware FedAvg or FedProx, checkpoints the global generator
after every round (so an interrupted study resumes where it stopped), and at the end
saves the generator and samples the synthetic table. Everything it writes is DP
post-processing of the sites' releases.
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

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ..common.generators import Generator, ModelFileError, get_generator
from ..common.schema import Schema
from ..common.study import StudyConfig, schema_fingerprint
from .strategy import RoundLog, make_strategy

log = logging.getLogger("fedsynth.coordinator")

CHECKPOINT = "checkpoint.fsg"
MODEL = "model.fsg"
SYNTHETIC = "synthetic.csv"
SUMMARY = "summary.json"


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

    return [RoundLog(round=r["round"], sites=[SiteRound(**s) for s in r["sites"]]) for r in raw]


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
    history: list[RoundLog] = []
    done = 0
    ckpt = out / CHECKPOINT
    if study.resume and ckpt.exists():
        meta = Generator.read_meta(ckpt)
        if meta.get("study-id") != study.study_id:
            raise ModelFileError(
                f"checkpoint {ckpt} belongs to study {meta.get('study-id')!r}, not "
                f"{study.study_id!r}; use another output folder or the matching study id"
            )
        model = Generator.load(ckpt)
        done = int(meta["round"])
        history = _history_from_json(meta.get("history", []))
        log.info("resuming study %s after round %d", study.study_id, done)
    remaining = study.num_server_rounds - done
    extra = {**study.to_flat(), "schema-fingerprint": schema_fingerprint(schema)}
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

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        model.load_state_dict({k: v.numpy() for k, v in arrays.items()})
        model.save(
            ckpt,
            extra={
                "study-id": study.study_id,
                "round": server_round + done,
                "history": _history_to_json(strategy.history),
            },
        )
        return None

    start = time.perf_counter()
    if remaining > 0:
        result = strategy.start(  # type: ignore[attr-defined]
            grid=grid,
            initial_arrays=ArrayRecord({k: Array(v) for k, v in model.state_dict().items()}),
            num_rounds=remaining,
            train_config=ConfigRecord(),
            evaluate_fn=checkpoint,
        )
        if len(result.arrays) > 0:  # empty when no site could train in any round
            model.load_state_dict({k: v.numpy() for k, v in result.arrays.items()})
    seconds = time.perf_counter() - start
    model.save(out / MODEL, extra={"study-id": study.study_id, "round": study.num_server_rounds})

    n = study.n_synthetic
    if n <= 0:
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
    (out / SUMMARY).write_text(json.dumps(summary, indent=1, default=_json_default))
    return StudyOutcome(out, len(strategy.history), strategy.history, seconds)


def final_site_privacy(history: list[RoundLog]) -> dict[str, dict[str, Any]]:
    """Each site's last reported epsilon and status, and the rounds it trained in."""
    sites: dict[str, dict[str, Any]] = {}
    for record in history:
        for s in record.sites:
            entry = sites.setdefault(
                s.site, {"epsilon": None, "rounds_trained": 0, "last_status": None}
            )
            if s.epsilon is not None:
                entry["epsilon"] = None if s.epsilon < 0 else s.epsilon
            entry["rounds_trained"] += int(s.status == "trained")
            entry["last_status"] = s.status
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
