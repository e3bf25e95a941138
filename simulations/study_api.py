"""The public Python entry to a federated study: ``fedsynth.run_study``.

A researcher with a table per hospital should not need Flower, the checkpoint format
or the holdout code to get a first result. ``run_study`` takes a mapping of site name
to DataFrame (or to a CSV/Parquet path), the schema, the generator and the sites'
budgets, runs the same study as ``fedsynth simulate`` (which is a thin layer over the
same code: ``simulate.run_simulation_study``), and returns a :class:`StudyResult`
with the global model, the synthetic table, each site's privacy spent, the round
history, the validation and the verdict. Example (the README runs it as a test)::

    import fedsynth

    schema = fedsynth.Schema.load("schema.yaml")
    result = fedsynth.run_study({"north": north_df, "south": "south.csv"}, schema,
                                generator="tvae", epsilon=3.0, budgets={"south": 1.0},
                                rounds=10, out="my-study")
    result.synthetic.head(); result.privacy["south"]["epsilon_spent"]
    result.model.sample(500); result.verdict.headline
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..common.schema import Schema
from ..common.study import DEFAULT_DELTA, DEFAULT_EPSILON, StudyConfig

if TYPE_CHECKING:
    from rich.console import Console

    from ..common.generators import Generator
    from ..common.validation import ValidationResult
    from ..common.validation.verdict import Verdict


@dataclass
class StudyResult:
    """What a federated study produced; everything here may leave the study except
    ``output_dir/real`` (real rows, the holdout)."""

    model: Generator  # the global generator: .sample(n), .save(path)
    synthetic: pd.DataFrame  # the released synthetic table (DP post-processing)
    privacy: dict[str, dict[str, Any]]  # per site: epsilon spent, budget, delta, rounds
    rounds: list[dict[str, Any]]  # per round: each site's status, DP loss, epsilon
    validation: ValidationResult  # every metric against the held-out real patients
    verdict: Verdict  # per area pass/fail with advice
    output_dir: Path
    summary: dict[str, Any] = field(repr=False, default_factory=dict)  # summary.json

    def sample(self, n: int, seed: int = 0, **kwargs: Any) -> pd.DataFrame:
        """More synthetic rows from the global generator (free: post-processing)."""
        return self.model.sample(n, seed=seed, **kwargs)


def run_study(
    sites: Mapping[str, pd.DataFrame | str | os.PathLike[str]],
    schema: Schema | str | os.PathLike[str],
    *,
    generator: str = "tvae",
    generator_params: Mapping[str, Any] | None = None,
    epsilon: float = DEFAULT_EPSILON,
    delta: float = DEFAULT_DELTA,
    budgets: Mapping[str, float] | None = None,
    dp: bool = True,
    rounds: int | None = None,
    local_epochs: int | None = None,
    engine: str = "inprocess",
    holdout: float = 0.2,
    target: str | None = None,
    positive: tuple[Any, ...] = (),
    out: str | os.PathLike[str] | None = None,
    force: bool = False,
    resume: bool = False,
    seed: int | None = None,
    verbose: bool = False,
    console: Console | None = None,
    reproducible_noise: bool = False,
    **study: Any,
) -> StudyResult:
    """Run a federated, DP study over ``sites`` and validate it on held-out patients.

    ``sites`` maps each site's name to its table (a DataFrame, or a CSV/Parquet path);
    every table is checked against ``schema`` first, all problems in one
    ``SiteDataError``. ``epsilon``/``delta`` is each site's budget for the whole study,
    ``budgets`` overrides epsilon per site. ``engine`` is "inprocess" (the real
    ServerApp and ClientApp in this process) or "ray" (Flower's simulation engine).
    ``target`` is the label utility predicts (default: the schema's outcome). ``out``
    is the output folder (default: a new temporary folder; it holds real rows under
    ``real/``). Other keywords are ``StudyConfig`` fields (``sample_rate``,
    ``strategy``, ``server_momentum``, ``secure_aggregation``, ...).
    ``reproducible_noise`` (tests and benchmarks only) draws every site's DP noise from
    the seed: the outputs are then labelled "not a DP release".
    """
    from rich.console import Console

    from ..common.generators import Generator
    from ..common.table import read_table
    from ..server.app import MODEL, SYNTHETIC
    from .simulate import SimulationOptions, run_simulation_study

    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="fedsynth-study-"))
    config = {"generator": generator, "generator_params": dict(generator_params or {}),
              "output_dir": str(folder), "resume": resume, **study}
    if rounds is not None:
        config["num_server_rounds"] = rounds
    if local_epochs is not None:
        config["local_epochs"] = local_epochs
    if seed is not None:
        config["seed"] = seed
    opts = SimulationOptions(
        epsilon=epsilon, delta=delta, dp=dp, holdout=holdout, study=StudyConfig(**config),
        verbose=verbose, site_epsilon=dict(budgets or {}), schema=schema,
        site_tables=dict(sites), target=target or "", positive=tuple(positive),
        engine=engine, force=force, reproducible_noise=reproducible_noise,
    )
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 (closed below)
    try:
        summary, validation = run_simulation_study(opts, console or (
            Console() if verbose else quiet))
    finally:
        quiet.file.close()
    used = Schema.load(summary["study"]["schema"])
    budget = {s["name"]: s for s in summary["sites_config"]}
    privacy = {
        name: {
            "epsilon_spent": info["epsilon"],
            "epsilon_budget": budget[name].get("epsilon") if budget[name].get("dp") else None,
            "delta": budget[name].get("delta") if budget[name].get("dp") else None,
            "rounds_trained": info["rounds_trained"],
            "status": info["last_status"],
        }
        for name, info in summary["sites"].items()
    }
    from ..common.validation.verdict import verdict

    return StudyResult(
        model=Generator.load(folder / MODEL),
        synthetic=read_table(folder / SYNTHETIC, replace(used, header=True)),
        privacy=privacy,
        rounds=summary["rounds"],
        validation=validation,
        verdict=verdict(validation, rounds=int(summary["study"]["num-server-rounds"]),
                        generator=summary["study"].get("generator")),
        output_dir=folder,
        summary=summary,
    )
