"""``fedsynth simulate``: a whole multicentre study on this machine.

One simulated Flower SuperNode per hospital, Flower's simulation engine (Ray) running
the real ServerApp and ClientApp, real DP-SGD at every site. Before training, a share
of each hospital's rows is held back; the synthetic data is then validated against
those patients, whom no generator saw.

The output folder holds: ``synthetic.csv``, ``model.fsg`` (loadable with
``fedsynth sample``), ``summary.json`` (config, per-site budget and epsilon spent, the
per-round log of DP releases: publishable), ``validation.json`` (row counts, timings and
the validation figures: computed on real rows in clear, not DP), ``report.html`` (built
from both, so it is not DP either), and under ``real/`` the real train parts and holdout
this run used (real patient rows: keep these three where the data may live).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..common.generators import get_generator
from ..common.privacy.plan import PrivacyPlan
from ..common.protocol import Status
from ..common.schema import Schema
from ..common.study import ConfigError, SiteConfig, StudyConfig
from ..common.table import read_table
from ..server.app import SUMMARY, SYNTHETIC, StudyFailed, make_server_app
from ..server.strategy import RoundLog
from .datasets import bundled_schema_path, load_site_frames
from .splits import holdout_split, write_site_table

#: Figures computed on the real rows in clear (not DP): they stay where the data may live.
VALIDATION_JSON = "validation.json"


@dataclass
class SimulationOptions:
    dataset: str = "heart_disease"
    epsilon: float = 3.0
    delta: float = 1e-5
    dp: bool = True
    holdout: float = 0.2
    study: StudyConfig = field(default_factory=StudyConfig)
    verbose: bool = False
    sites: tuple[str, ...] = ()  # a subset of the dataset's sites (default: all)
    site_epsilon: dict[str, float] = field(default_factory=dict)  # per-site budgets
    site_noise: dict[str, float] = field(default_factory=dict)  # sites that fix their noise
    # Tests and benchmarks only: every site's DP noise from a seed (derived from the
    # study seed), so runs compare noise for noise. The outputs are then labelled "not a
    # DP release". Off by default: the default study's outputs are safe to release.
    reproducible_noise: bool = False


def _quiet_logs(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("flwr").setLevel(level)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def prepare_sites(
    opts: SimulationOptions, out: Path
) -> tuple[list[SiteConfig], pd.DataFrame, pd.DataFrame]:
    """Split every hospital into train and holdout; write the train parts as site files."""
    schema, frames = load_site_frames(opts.dataset)
    unknown = set(opts.sites) - set(frames)
    unknown |= (set(opts.site_epsilon) | set(opts.site_noise)) - set(frames)
    if unknown:
        raise ConfigError(
            f"unknown site(s) {sorted(unknown)}; {opts.dataset} has {', '.join(frames)}"
        )
    if opts.sites:
        frames = {k: v for k, v in frames.items() if k in opts.sites}
    real_dir = out / "real"
    real_dir.mkdir(parents=True, exist_ok=True)
    schema_path = str(bundled_schema_path(opts.dataset))
    sites, trains, holds = [], [], []
    for i, (name, frame) in enumerate(frames.items()):
        train, hold = holdout_split(frame, schema, opts.holdout, seed=opts.study.seed + i)
        path = real_dir / f"site-{name}.csv"
        write_site_table(train, schema, str(path))
        sites.append(
            SiteConfig(
                name=name,
                data_path=str(path),
                schema_path=schema_path,
                epsilon=opts.site_epsilon.get(name, opts.epsilon),
                delta=opts.delta,
                dp=opts.dp,
                noise_multiplier=opts.site_noise.get(name),
                # the ledger must outlive a coordinator restart (--resume starts a new
                # Flower run, and with it a fresh context.state)
                state_dir=str(out / "site-state" / name),
                # one researcher holds every table of a simulation: the sites share all
                # their validation scores if the study asks for federated validation
                validation_scores="all",
                reproducible_noise_seed=(
                    opts.study.seed * 1000 + i if opts.reproducible_noise else None
                ),
            )
        )
        trains.append(train.assign(site=name))
        holds.append(hold.assign(site=name))
    train_all = pd.concat(trains, ignore_index=True)
    hold_all = pd.concat(holds, ignore_index=True)
    write_site_table(hold_all.drop(columns="site"), schema, str(real_dir / "holdout.csv"))
    write_site_table(train_all.drop(columns="site"), schema, str(real_dir / "train.csv"))
    return sites, train_all, hold_all


def setup_simulation_keys(
    out: Path, study: StudyConfig, sites: list[SiteConfig]
) -> tuple[StudyConfig, list[SiteConfig]]:
    """The key set of an encrypted simulation, made with the real key-setup code.

    Under ``out/keys``: one folder per site with its X25519 key pair (the first site is
    the key holder), and the coordinator's folder (public context, the key holder's
    public key, the wrapped contexts it relays). Each site then opens its wrapped
    context itself, as a hospital would, from the paths in its SiteConfig; the
    coordinator gets only the public context's path. A resumed study reuses the set,
    because its checkpoint holds ciphertexts under that key.
    """
    from ..common.encryption import KeySetupError, create_study_keys, generate_site_keypair
    from ..common.encryption.keys import (
        HOLDER_PUBLIC_KEY_FILE,
        MANIFEST_FILE,
        PRIVATE_KEY_FILE,
        PUBLIC_CONTEXT_FILE,
    )

    root = out / "keys"
    coordinator = root / "coordinator"
    site_dirs = {s.name: root / "sites" / s.name for s in sites}
    manifest_path = coordinator / MANIFEST_FILE
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("study_id") != study.study_id or set(manifest["sites"]) != set(site_dirs):
            raise ConfigError(
                f"{root} holds the keys of another study or site list; use another output "
                "folder (or remove that keys folder if its checkpoint is not needed)"
            )
        wrapped = {n: coordinator / manifest["sites"][n]["wrapped_file"] for n in site_dirs}
    else:
        try:
            for folder in site_dirs.values():
                if not (folder / PRIVATE_KEY_FILE).exists():  # a pair is whole or made anew
                    generate_site_keypair(folder, force=True)
            # No manifest means no complete set (it is written last): replace leftovers.
            keys = create_study_keys(
                study.study_id, site_dirs[sites[0].name], site_dirs, coordinator, force=True
            )
        except KeySetupError as exc:  # e.g. a site name a key file cannot carry
            raise ConfigError(f"cannot set up the study's keys: {exc}") from None
        wrapped = keys.wrapped
    sites = [
        replace(
            s,
            key_dir=str(site_dirs[s.name]),
            holder_public_key=str(coordinator / HOLDER_PUBLIC_KEY_FILE),
            wrapped_context=str(wrapped[s.name]),
        )
        for s in sites
    ]
    return replace(study, public_context=str(coordinator / PUBLIC_CONTEXT_FILE)), sites


class _RoundPrinter:
    """Shows round i of R, the DP loss and each site's epsilon as the study goes."""

    def __init__(self, console: Console, rounds: int, progress: Progress) -> None:
        self.console = console
        self.progress = progress
        self.task = progress.add_task("federated training", total=rounds)

    def __call__(self, record: RoundLog) -> None:
        parts = []
        for s in record.sites:
            if s.status == Status.TRAINED:
                eps = "no DP" if (s.epsilon is None or s.epsilon < 0) else f"eps {s.epsilon:.2f}"
                parts.append(f"{s.site} {eps} loss {s.loss:.1f}")
            else:
                parts.append(f"{s.site} [yellow]{s.status}[/yellow]")
        self.progress.console.print(f"round {record.round}: " + " | ".join(parts))
        self.progress.advance(self.task)


def check_budgets(opts: SimulationOptions) -> None:
    """Every simulated site's budget against the study's privacy plan, before anything
    runs: an infeasible budget is one message with the smallest feasible epsilon."""
    if not opts.dp:
        return
    plan = PrivacyPlan.from_study(opts.study)
    budgets = {"every site": opts.epsilon} | {f"site {k}": v for k, v in
                                              opts.site_epsilon.items()}
    for who, eps in budgets.items():
        if who == "every site" and opts.site_noise:
            continue  # sites that fix their noise are capped by rounds, not calibrated
        plan.check(eps, opts.delta, who=who)


def check_generator(opts: SimulationOptions) -> None:
    """Build the study's generator once, so that a wrong name or hyperparameter is one
    clear message before any file is written, not a traceback from inside a site."""
    schema = Schema.load(bundled_schema_path(opts.dataset))
    try:
        get_generator(opts.study.generator)(
            schema, seed=opts.study.seed, **opts.study.generator_params
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(
            f"generator {opts.study.generator!r} does not accept --generator-params "
            f"{json.dumps(opts.study.generator_params)}: {exc}"
        ) from None


def simulate(opts: SimulationOptions, console: Console | None = None) -> dict[str, Any]:
    """Run the study end to end and return the summary (also written to summary.json)."""
    from flwr.simulation import run_simulation

    from ..client.app import make_client_app

    console = console or Console()
    _quiet_logs(opts.verbose)
    check_generator(opts)  # before anything is written or cleared
    check_budgets(opts)
    out = Path(opts.study.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not opts.study.resume:
        # a new study in an old folder: the old study's ledgers are not this one's
        shutil.rmtree(out / "site-state", ignore_errors=True)
    sites, train, hold = prepare_sites(opts, out)
    schema_path = bundled_schema_path(opts.dataset)
    study = replace(opts.study, schema=str(schema_path), min_sites=min(opts.study.min_sites,
                                                                       len(sites)))
    if study.secure_aggregation == "ckks":
        study, sites = setup_simulation_keys(out, study, sites)
        console.print(
            f"CKKS secure aggregation: key holder {sites[0].name}; keys in {out / 'keys'} "
            "(the coordinator gets only the public context)"
        )
    console.print(
        f"[bold]fedsynth[/bold] study on {opts.dataset}: {len(sites)} sites, "
        f"{len(train)} training rows, {len(hold)} held out; generator {study.generator}, "
        + (f"DP eps={opts.epsilon} delta={opts.delta} per site" if opts.dp else "no DP")
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("round {task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        printer = _RoundPrinter(console, study.num_server_rounds, progress)
        try:
            run_simulation(
                server_app=make_server_app(study, on_round=printer),
                client_app=make_client_app(sites),
                num_supernodes=len(sites),
                backend_config={
                    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                    "init_args": {"num_cpus": max(1, min(len(sites), os.cpu_count() or 1))},
                },
                verbose_logging=opts.verbose,
            )
        except RuntimeError:
            # Flower wraps the ServerApp's exception; the summary below says what failed
            if not (out / SUMMARY).exists():
                raise
    t_train = time.perf_counter() - t0
    summary_path = out / SUMMARY
    if summary_path.exists() and json.loads(summary_path.read_text()).get("status") == (
        "no-training"
    ):
        raise StudyFailed(
            f"no round had enough sites that trained; {summary_path} lists what each "
            "site replied"
        )
    if not summary_path.exists():
        raise RuntimeError(
            "the federated study did not finish (no summary written); rerun with --verbose "
            "to see Flower's log"
        )
    summary = json.loads(summary_path.read_text())
    summary["sites_config"] = [s.to_dict() for s in sites]
    # What depends on the real rows in clear (row counts, validation figures, timings)
    # goes to validation.json, which stays with the data; summary.json holds only DP
    # releases and public settings, so it may be published.
    local: dict[str, Any] = {"rows": {"train": len(train), "holdout": len(hold)}}

    from ..common.schema import Schema

    schema = Schema.load(schema_path)
    synthetic = read_table(out / SYNTHETIC, replace(schema, header=True))
    console.print("validating the synthetic data against the held-out patients ...")
    t1 = time.perf_counter()
    local["validation"] = validate_and_report(
        train.drop(columns="site"), hold.drop(columns="site"), synthetic, schema, out, summary
    )
    local["seconds_validation"] = time.perf_counter() - t1
    local["seconds_total"] = time.perf_counter() - t0
    local["seconds_until_model"] = t_train
    summary_path.write_text(json.dumps(summary, indent=1, default=str))
    (out / VALIDATION_JSON).write_text(json.dumps(local, indent=1, default=str))
    summary = {**summary, **local}
    _print_summary(console, summary)
    return summary


def validate_and_report(
    train: pd.DataFrame,
    hold: pd.DataFrame,
    synthetic: pd.DataFrame,
    schema: Any,
    out: Path,
    summary: dict[str, Any],
) -> dict[str, Any]:
    from ..common.validation import validate
    from ..common.validation.report import write_report

    result = validate(
        train,
        hold,
        synthetic,
        schema,
        seed=int(summary["study"]["seed"]),
        # survival data (TCGA-BRCA, AMLSG): Kaplan-Meier, log-rank, Cox and C-index
        survival=schema.survival_pairs[0] if schema.survival_pairs else None,
        # anonymeter needs numpy < 2: it runs from its own environment when one is set
        anonymeter_python=os.environ.get("FEDSYNTH_ANONYMETER_PYTHON") or None,
    )
    extra = {"privacy_budget": summary["sites"], "rounds": summary["rounds"],
             "study": summary["study"]}
    write_report(
        result,
        out / "report.html",
        real_train=train,
        synthetic=synthetic,
        schema=schema,
        title=f"fedsynth study: {schema.name}",
        extra=extra,
    )
    return {"headline": result.headline(), "metrics": result.to_dict()}


def _print_summary(console: Console, summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="privacy spent per site (whole study)")
    table.add_column("site")
    table.add_column("epsilon")
    table.add_column("rounds trained")
    table.add_column("last status")
    delta = {s["name"]: s["delta"] for s in summary.get("sites_config", [])}
    for name, info in summary["sites"].items():
        eps = info["epsilon"]
        table.add_row(
            name,
            "no DP" if eps is None else f"{eps:.3f} (delta {delta.get(name, 0):g})",
            str(info["rounds_trained"]),
            str(info["last_status"]),
        )
    console.print(table)
    head = summary.get("validation", {}).get("headline", {})
    if head:
        console.print(
            "validation against held-out patients: "
            + ", ".join(f"{k} {v:.3f}" for k, v in head.items() if isinstance(v, float))
        )
    out = summary["study"]["output-dir"]
    console.print(
        f"wrote {out}/synthetic.csv, model.fsg, summary.json, report.html "
        f"in {summary['seconds_total']:.0f} s"
    )
