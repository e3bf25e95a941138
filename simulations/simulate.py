"""``fedsynth simulate``: a whole multicentre study on this machine.

One simulated Flower SuperNode per hospital, the real ServerApp and ClientApp (in this
process by default, or on Flower's Ray simulation engine: ``engines.py``), real
DP-SGD at every site. The sites are a bundled dataset's hospitals or the researcher's
own tables (``--schema S.yaml --data DIR`` or ``--data TABLE --site-column C``;
``site_tables.py``), every table checked before anything is written. Before training,
a share of each hospital's rows is held back; the synthetic data is then validated
against those patients, whom no generator saw, and the study ends with a verdict per
validation area (``common/validation/verdict.py``).

The output folder's files are listed in ``OUTPUTS`` (and in the README). An existing
study's folder is never overwritten silently: ``force`` replaces those files,
``study.resume`` continues from the checkpoint. ``summary.json`` holds only DP releases
and public settings (it may be published); what is computed on the real rows in clear
(row counts, timings, the validation figures and the verdict) is in ``validation.json``,
which stays with the data, as do ``report.html``, ``real/`` (real patients, written
owner-only) and ``site-state/``: besides each site's privacy ledger it holds the site's
own rows, encoded, and its stored replies, as a deployed site's state-dir does.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..common.generators import get_generator
from ..common.privacy.plan import PrivacyPlan
from ..common.privacy.randomness import NOT_A_DP_RELEASE, is_not_a_release
from ..common.protocol import Status
from ..common.schema import Outcome, Schema
from ..common.study import (
    DEFAULT_DELTA,
    DEFAULT_EPSILON,
    ConfigError,
    SiteConfig,
    StudyConfig,
    check_budget,
)
from ..common.table import read_table
from ..server.app import (
    CHECKPOINT,
    ENCRYPTED_CHECKPOINT,
    SUMMARY,
    SYNTHETIC,
    TIMINGS,
    VALIDATION,
    StudyFailed,
    make_server_app,
    read_timings,
)
from ..server.strategy import RoundLog
from .datasets import bundled_schema_path, load_site_frames
from .engines import DEFAULT_ENGINE, ENGINES, close_log, route_framework_logs
from .splits import holdout_split, write_site_table

# Every file and folder a study writes in its output folder, with what it is (the
# README's table says the same). --force removes these and nothing else.
OUTPUTS: dict[str, str] = {
    "synthetic.csv": "the synthetic patients (DP post-processing: may be released)",
    "model.fsg": "the global generator (fedsynth sample --model ... draws more rows)",
    "summary.json": "config, each site's budget and epsilon spent, the per-round log of DP "
    "releases (publishable: no exact statistic of a site's rows)",
    "validation.json": "row counts, timings, the validation figures and the verdict: "
    "computed on the real rows in clear, not DP (keep it with the data)",
    "report.html": "the validation report (one file, plots embedded; built from the real "
    "rows: keep it with the data)",
    "fedsynth.log": "Flower's and Ray's log of the run (on the console only with --verbose)",
    "schema.yaml": "the schema of a study on your own data, as the sites used it",
    "checkpoint.fsg": "the global model after the last finished round (what --resume "
    "continues from)",
    "checkpoint.ckks": "the encrypted aggregate after the last round (CKKS studies; --resume)",
    "momentum.npz": "the coordinator's server-momentum velocity (needed by --resume)",
    "timings.json": "the coordinator's wall time of the run (not DP: it grows with the "
    "rows), moved into validation.json once the validation is written",
    "real/": "the real train parts and holdout this run used: real patients, owner-only "
    "files (0600), keep them where the data may live",
    "site-state/": "each site's state-dir, kept across --resume: its privacy ledger "
    "(site-ledger.json: epsilon spent so far, per-study state), its own table encoded "
    "(encoded-<sha256>.npy: real patients), its stored replies (reply-*.bin, what it "
    "sent the coordinator, for a replayed round) and an encrypted study's release "
    "(released-*.npz); owner-only, keep it where the data may live: in a deployment it "
    "stays at the site",
    "keys/": "CKKS and X25519 keys of an encrypted study (one folder per site, one for the "
    "coordinator)",
}
LOG_FILE = "fedsynth.log"
#: what ``--resume`` continues from: a clear study's model, an encrypted study's sum
CHECKPOINTS = (CHECKPOINT, ENCRYPTED_CHECKPOINT)
#: Figures computed on the real rows in clear (not DP): they stay where the data may live.
VALIDATION_JSON = VALIDATION


@dataclass
class SimulationOptions:
    dataset: str = "heart_disease"  # a bundled dataset, used when no own data is given
    epsilon: float = DEFAULT_EPSILON
    delta: float = DEFAULT_DELTA
    dp: bool = True
    holdout: float = 0.2
    study: StudyConfig = field(default_factory=StudyConfig)
    verbose: bool = False
    sites: tuple[str, ...] = ()  # a subset of the dataset's sites (default: all)
    site_epsilon: dict[str, float] = field(default_factory=dict)  # per-site budgets
    site_noise: dict[str, float] = field(default_factory=dict)  # sites that fix their noise
    # Own data (instead of ``dataset``): a schema (file or Schema) with either ``data``
    # (a folder of one table per site, or one table split by ``site_column``) or
    # ``site_tables`` (site name -> DataFrame or path, from the Python API).
    schema: str | Schema | None = None
    data: str = ""
    site_column: str = ""
    site_tables: Mapping[str, Any] | None = None
    # The label TSTR predicts (default: the schema's outcome) and its positive values
    # (default: a binary column's second category).
    target: str = ""
    positive: tuple[Any, ...] = ()
    engine: str = DEFAULT_ENGINE  # "inprocess" or "ray" (engines.py)
    force: bool = False  # replace an earlier study's outputs in the output folder
    # Tests and benchmarks only: every site's DP noise from a seed (derived from the
    # study seed), so runs compare noise for noise. The outputs are then labelled "not a
    # DP release". Off by default: the default study's outputs are safe to release.
    reproducible_noise: bool = False


@dataclass
class StudyData:
    """The checked sites' tables, their schema and the schema file the sites read."""

    schema: Schema
    frames: dict[str, pd.DataFrame]
    schema_path: Path | None  # None: written to the output folder (a Schema object)
    label: str  # what the console calls the data


def _quiet_logs(verbose: bool, log_file: Path | None = None) -> None:
    route_framework_logs(log_file, verbose)


def _schema_of(opts: SimulationOptions) -> tuple[Schema, Path | None]:
    if isinstance(opts.schema, Schema):
        return opts.schema, None
    if not opts.schema:
        raise ConfigError("own data needs its schema: pass --schema S.yaml (draft one with "
                          "`fedsynth schema draft TABLE --out S.yaml`)")
    return Schema.load(opts.schema), Path(opts.schema).resolve()


def load_study_data(opts: SimulationOptions) -> StudyData:
    """Every site's rows, checked against the schema; nothing is written.

    A bundled dataset by name, or the researcher's own tables; all the problems of all
    the sites come in one error (``site_tables.SiteDataError``).
    """
    from .site_tables import check_sites, sites_from_column, sites_from_folder

    if opts.site_tables is not None:
        schema, path = _schema_of(opts)
        return StudyData(schema, check_sites(opts.site_tables, schema), path, "your data")
    if opts.data:
        schema, path = _schema_of(opts)
        data = Path(opts.data)
        if opts.site_column:
            frames = sites_from_column(data, opts.site_column, schema)
        elif data.is_dir():
            frames = sites_from_folder(data, schema)
        elif data.is_file():
            raise ConfigError(
                f"--data {data} is one table: name the column that says each row's site with "
                "--site-column COLUMN, or pass a folder with one table per site"
            )
        else:
            raise ConfigError(f"--data {data} does not exist; pass a folder with one table per "
                              "site, or one table with --site-column")
        return StudyData(schema, frames, path, str(data))
    if opts.schema is not None or opts.site_column:
        raise ConfigError("--schema and --site-column go with --data (your own tables)")
    if Path(opts.dataset).suffix.lower() in (".yaml", ".yml", ".json"):
        raise ConfigError(
            f"{opts.dataset!r} is a schema file, not a bundled dataset: pass it as --schema "
            f"{opts.dataset} with --data DIR (one table per site) or --data TABLE "
            "--site-column COLUMN"
        )
    path = bundled_schema_path(opts.dataset)
    schema, frames = load_site_frames(opts.dataset)
    return StudyData(schema, frames, path, opts.dataset)


def study_target(opts: SimulationOptions, schema: Schema) -> tuple[str | None, tuple | None]:
    """The TSTR label: ``--target`` or the schema's outcome; checked before training."""
    from ..common.validation.suite import resolve_target

    target = opts.target or None
    positive = tuple(opts.positive) or None
    try:
        if target is not None and target not in schema.names:
            raise KeyError(f"--target {target!r} is not a column of the schema")
        resolved = resolve_target(schema, target, positive)
    except (KeyError, ValueError) as exc:
        raise ConfigError(str(exc).strip("'\"")) from None
    if resolved is None:
        return None, None
    return resolved.column, tuple(sorted(resolved.positive))


def check_resume(opts: SimulationOptions, out: Path) -> None:
    """``--resume`` continues the study in ``out``: refuse one that cannot, before
    anything runs.

    Why: a marginal study measures once, so "resuming" one started it again against
    ledgers the first run had spent, every site refused, and the command then
    validated and reported the *earlier* study's outputs as this run's, exit 0. A
    checkpoint of another generator or other hyperparameters would be loaded into a
    model it does not fit."""
    if not opts.study.resume:
        return
    if opts.study.generator == "marginal":
        raise ConfigError(
            f"--resume: a marginal study measures its marginals once and cannot continue "
            f"(its sites' ledgers keep what an earlier run spent); run it in a new --out, "
            f"or pass --force instead of --resume to replace the study in {out}")
    ckpt = out / CHECKPOINT
    if opts.study.encrypted or not ckpt.exists():
        return  # nothing to compare: an encrypted checkpoint holds ciphertexts only
    from ..common.generators.base import GRID_PARAM, HEAPS_PARAM, Generator

    meta = Generator.read_meta(ckpt)
    if meta.get("generator") != opts.study.generator:
        raise ConfigError(
            f"--resume: the checkpoint in {out} was trained by generator "
            f"{meta.get('generator')!r}, not {opts.study.generator!r}; resume with "
            f"--generator {meta.get('generator')}, or start a new --out")
    wanted = get_generator(opts.study.generator).defaults | opts.study.generator_params
    saved = {k: v for k, v in meta.get("hparams", {}).items()
             if k not in (GRID_PARAM, HEAPS_PARAM)}
    changed = sorted(k for k in wanted if k in saved and saved[k] != wanted[k])
    if changed:
        raise ConfigError(
            f"--resume: the checkpoint in {out} was trained with other --generator-params "
            f"({', '.join(f'{k}={saved[k]!r}' for k in changed)}); resume with those, or "
            "start a new --out")


def claim_output(out: Path, force: bool, resume: bool) -> None:
    """Refuse to write over an earlier study unless asked; ``force`` removes its files."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a folder")
    if not out.is_dir() or not any(out.iterdir()) or resume:
        return
    ours = [name for name in OUTPUTS if (out / name.rstrip("/")).exists()]
    if not force:
        found = ", ".join(ours) if ours else "other files"
        raise FileExistsError(
            f"{out} already holds {found}; pass --force to replace an earlier study's "
            "outputs, --resume to continue its checkpoint, or choose another --out"
        )
    for name in ours:
        target = out / name.rstrip("/")
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()


#: Held-out patients a study needs, pooled over its sites: with none the validation
#: failed after training (a ZeroDivisionError, --holdout 0.001 on heart disease), and a
#: handful makes every figure noise.
MIN_HOLDOUT_ROWS = 20


def site_splits(
    opts: SimulationOptions, data: StudyData
) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Each chosen site's (train, holdout), stratified by the study's target (also when
    ``--target`` names it); the same seeds whenever it is called, so the check before
    the study and the study itself see the same split."""
    frames = {k: v for k, v in data.frames.items() if not opts.sites or k in opts.sites}
    target, positive = (opts.target, opts.positive) if opts.target and opts.positive else (
        None, None)
    split_schema = data.schema if target is None else replace(
        data.schema, outcome=Outcome(column=target, positive=tuple(positive)))
    return {name: holdout_split(frame, split_schema, opts.holdout, seed=opts.study.seed + i)
            for i, (name, frame) in enumerate(frames.items())}


def check_holdout(opts: SimulationOptions, data: StudyData) -> None:
    """Refuse a holdout share that leaves too few patients to validate against, or a
    site nothing to train on, before anything runs. The message names no row count:
    those are statistics of the sites' rows."""
    splits = site_splits(opts, data)
    if sum(len(hold) for _, hold in splits.values()) < MIN_HOLDOUT_ROWS:
        raise ConfigError(
            f"--holdout {opts.holdout:g} holds back fewer than {MIN_HOLDOUT_ROWS} patients "
            "over all sites, too few to validate the synthetic rows against: raise "
            "--holdout (default 0.2)")
    bare = [name for name, (train, _) in splits.items() if len(train) == 0]
    if bare:
        raise ConfigError(f"--holdout {opts.holdout:g} leaves site(s) {', '.join(bare)} no "
                          "rows to train on: lower --holdout")


def prepare_sites(
    opts: SimulationOptions, out: Path, data: StudyData | None = None
) -> tuple[list[SiteConfig], pd.DataFrame, pd.DataFrame]:
    """Split every hospital into train and holdout; write the train parts as site files."""
    data = data or load_study_data(opts)
    schema, frames = data.schema, data.frames
    unknown = set(opts.sites) - set(frames)
    unknown |= (set(opts.site_epsilon) | set(opts.site_noise)) - set(frames)
    if unknown:
        raise ConfigError(
            f"unknown site(s) {sorted(unknown)}; {data.label} has {', '.join(frames)}"
        )
    real_dir = out / "real"
    real_dir.mkdir(parents=True, exist_ok=True)
    if data.schema_path is None:
        data.schema_path = out / "schema.yaml"
        schema.save(data.schema_path)
    schema_path = str(data.schema_path)
    sites, trains, holds = [], [], []
    for i, (name, (train, hold)) in enumerate(site_splits(opts, data).items()):
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


def check_honest_sites(study: StudyConfig, sites: int) -> None:
    """A noise split cannot trust more sites than the study has (StudyConfig checks the
    rest: a whole number, and masked sums)."""
    h = study.honest_sites
    if not 1 <= h <= sites:
        raise ConfigError(f"--honest-sites must be between 1 and the {sites} sites of the "
                          f"study, got {h}")


def setup_mask_keys(out: Path, sites: list[SiteConfig], honest_sites: int
                    ) -> list[SiteConfig]:
    """Every site's X25519 key pair and roster for masked sums, with the real key code.

    ``out/keys/sites/<name>/`` holds the pair (``fedsynth keys site-init``'s files) and
    ``peers/``, the other sites' public keys as ``<site>.pem``: what each hospital
    collects, checking fingerprints, in a deployment. The coordinator gets nothing."""
    from ..common.encryption import KeySetupError, generate_site_keypair
    from ..common.encryption.keys import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE
    from ..common.encryption.masks import PEER_KEY_SUFFIX

    site_dirs = {s.name: out / "keys" / "sites" / s.name for s in sites}
    try:
        for folder in site_dirs.values():
            if not (folder / PRIVATE_KEY_FILE).exists():
                generate_site_keypair(folder, force=True)
    except KeySetupError as exc:
        raise ConfigError(f"cannot set up the study's keys: {exc}") from None
    for name, folder in site_dirs.items():
        peers = folder / "peers"
        shutil.rmtree(peers, ignore_errors=True)
        peers.mkdir(parents=True)
        for other, theirs in site_dirs.items():
            if other != name:
                shutil.copyfile(theirs / PUBLIC_KEY_FILE, peers / f"{other}{PEER_KEY_SUFFIX}")
    return [replace(s, key_dir=str(site_dirs[s.name]), peer_keys=str(site_dirs[s.name] /
                                                                      "peers"),
                    honest_sites=honest_sites) for s in sites]


class _RoundPrinter:
    """Shows round i of R, the DP loss and each site's epsilon as the study goes."""

    def __init__(self, console: Console, rounds: int, progress: Progress) -> None:
        self.console = console
        self.progress = progress
        self.task = progress.add_task("federated training", total=rounds)
        console.print("[dim]loss: each site's training loss as a DP release (Gaussian noise "
                      "on a sample's clipped sum and count): noisy, can be negative; "
                      "eps: privacy spent so far, whole study[/dim]")

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
    runs: a budget that is not a number (NaN, inf, delta outside (0, 1)) or that cannot
    pay for the plan is one message, the latter with the smallest feasible epsilon."""
    if not opts.dp:
        return
    budgets = {"every site": opts.epsilon} | {f"site {k}": v for k, v in
                                              opts.site_epsilon.items()}
    for who, eps in budgets.items():
        check_budget(eps, opts.delta, who)
    for who, eps in budgets.items():
        if opts.study.generator == "marginal":  # it plans its own releases from the budget
            from ..common.generators.marginal.plan import budget_noise  # JAX: only here

            budget_noise(eps, opts.delta, opts.study.accountant, who=who)
            continue
        if who == "every site" and opts.site_noise:
            continue  # sites that fix their noise are capped by rounds, not calibrated
        PrivacyPlan.from_study(opts.study, eps, opts.delta).check(eps, opts.delta, who=who)


def check_generator(opts: SimulationOptions, schema: Schema | None = None) -> None:
    """Build the study's generator once, so that a wrong name or hyperparameter is one
    clear message before any file is written, not a traceback from inside a site."""
    schema = schema or Schema.load(bundled_schema_path(opts.dataset))
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
    """Run the study end to end and return the summary (as written to summary.json)
    merged with what validation.json holds (row counts, timings, validation figures)."""
    return run_simulation_study(opts, console)[0]


def run_simulation_study(
    opts: SimulationOptions, console: Console | None = None
) -> tuple[dict[str, Any], Any]:
    """The study end to end: (summary, the ValidationResult of the synthetic table).

    Every check that can fail on the user's input (data, schema, target, generator,
    sites, output folder) runs before the first file is written.
    """
    from ..client.app import make_client_app
    from .engines import run_inprocess, run_ray

    console = console or Console()
    if opts.engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {opts.engine!r}")
    data = load_study_data(opts)
    check_generator(opts, data.schema)  # before anything is written or cleared
    check_budgets(opts)
    target, positive = study_target(opts, data.schema)
    opts = replace(opts, target=target or "", positive=positive or ())
    unknown = (set(opts.sites) | set(opts.site_epsilon) | set(opts.site_noise)) - set(data.frames)
    if unknown:
        raise ConfigError(
            f"unknown site(s) {sorted(unknown)}; {data.label} has {', '.join(data.frames)}"
        )
    check_holdout(opts, data)
    check_honest_sites(opts.study, len(opts.sites or data.frames))
    out = Path(opts.study.output_dir)
    check_resume(opts, out)
    claim_output(out, opts.force, opts.study.resume)
    if opts.study.resume and not any((out / f).exists() for f in CHECKPOINTS):
        console.print(f"  note: --resume found no checkpoint in {out}: the study starts at "
                      "round 0 (the sites' ledgers keep whatever an earlier run spent)")
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / LOG_FILE
    t0 = time.perf_counter()
    if not opts.study.resume:
        # a new study in an old folder: the old study's ledgers are not this one's
        shutil.rmtree(out / "site-state", ignore_errors=True)
    sites, train, hold = prepare_sites(opts, out, data)
    schema_path = data.schema_path
    study = replace(opts.study, schema=str(schema_path), min_sites=min(opts.study.min_sites,
                                                                       len(sites)))
    if study.secure_aggregation == "ckks":
        study, sites = setup_simulation_keys(out, study, sites)
        console.print(
            f"CKKS secure aggregation: key holder {sites[0].name}; keys in {out / 'keys'} "
            "(the coordinator gets only the public context)"
        )
    elif study.masked:
        h = study.honest_sites
        sites = setup_mask_keys(out, sites, h)
        console.print(
            f"masked sums: every site's key pair and roster in {out / 'keys'} (the "
            "coordinator holds no key); "
            + (f"each site adds 1/{h} of the common noise, trusting {h} of the "
               f"{len(sites)} sites not to collude" if h > 1
               else "each site adds its whole noise")
            + ("; masks hide the quantile grid, the model updates travel in clear (DP "
               "releases at each site's whole budget)" if study.trains else ""))
    console.print(
        # no exact row counts on the console: they are statistics of the sites' private rows
        f"[bold]fedsynth[/bold] study on {data.label}: {len(sites)} sites, "
        f"{opts.holdout:.0%} of each site's rows held out; generator {study.generator}, "
        + (f"DP eps={opts.epsilon} delta={opts.delta} per site" if opts.dp else "no DP")
        + (f"; {NOT_A_DP_RELEASE}" if opts.reproducible_noise else "")
        + f"; engine {opts.engine}"
    )
    summary_path = out / SUMMARY
    # a resumed study's folder holds the earlier run's summary: only one this run writes
    # counts (else a run that failed reported the earlier study's outputs as its own)
    earlier = summary_path.stat().st_mtime_ns if summary_path.exists() else None

    def written() -> bool:
        return summary_path.exists() and summary_path.stat().st_mtime_ns != earlier

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("round {task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        printer = _RoundPrinter(console, study.num_server_rounds, progress)
        server_app = make_server_app(study, on_round=printer)
        _quiet_logs(opts.verbose, log_file)  # undone by close_log below
        try:
            if opts.engine == "ray":
                run_ray(server_app, make_client_app(sites), len(sites), opts.verbose)
            else:
                run_inprocess(server_app, make_client_app(sites), len(sites), study.to_flat())
        except (RuntimeError, StudyFailed):
            # Flower wraps the ServerApp's exception; the summary below says what failed
            if not written():
                raise
        finally:
            close_log(log_file)
    t_train = time.perf_counter() - t0
    if written() and json.loads(summary_path.read_text()).get("status") == "no-training":
        raise StudyFailed(
            f"no round had enough sites that trained; {summary_path} lists what each "
            "site replied"
        )
    if not written():
        raise RuntimeError(
            "the federated study did not finish (no summary written); rerun with --verbose "
            "to see Flower's log"
        )
    summary = json.loads(summary_path.read_text())
    summary["sites_config"] = [published_site_config(s) for s in sites]
    # What depends on the real rows in clear (row counts, validation figures, verdict,
    # timings) goes to validation.json, which stays with the data; summary.json holds
    # only DP releases and public settings, so it may be published.
    local: dict[str, Any] = {"rows": {"train": len(train), "holdout": len(hold)}}
    local.update(read_timings(out))  # the coordinator's, moved here below

    schema = data.schema
    synthetic = read_table(out / SYNTHETIC, replace(schema, header=True))
    console.print("validating the synthetic data against the held-out patients ...")
    t1 = time.perf_counter()
    local["validation"], result = validate_and_report(
        train.drop(columns="site"), hold.drop(columns="site"), synthetic, schema, out, summary,
        target=opts.target or None, positive=opts.positive or None,
    )
    local["seconds_validation"] = time.perf_counter() - t1
    local["seconds_total"] = time.perf_counter() - t0
    local["seconds_until_model"] = t_train
    local["verdict"] = study_verdict(result, summary).to_dict()
    summary_path.write_text(json.dumps(summary, indent=1, default=str))
    (out / VALIDATION_JSON).write_text(json.dumps(local, indent=1, default=str))
    (out / TIMINGS).unlink(missing_ok=True)  # now in validation.json
    summary = {**summary, **local}
    _print_summary(console, summary)
    return summary, result


def published_site_config(site: SiteConfig) -> dict[str, Any]:
    """A site's settings as summary.json publishes them: all but its noise seed.

    The budgets and paths are public settings (the privacy table reads the budgets);
    a ``reproducible-noise-seed`` is what replays the site's noise, so a file meant to
    be shared does not carry it, even from a run that is no DP release anyway.
    """
    config = site.to_dict()
    config.pop("reproducible-noise-seed", None)
    return config


def study_verdict(result: Any, summary: dict[str, Any]) -> Any:
    from ..common.validation.verdict import verdict

    return verdict(result, rounds=int(summary["study"]["num-server-rounds"]),
                   generator=summary["study"].get("generator"))


def validate_and_report(
    train: pd.DataFrame,
    hold: pd.DataFrame,
    synthetic: pd.DataFrame,
    schema: Any,
    out: Path,
    summary: dict[str, Any],
    target: str | None = None,
    positive: tuple[Any, ...] | None = None,
) -> tuple[dict[str, Any], Any]:
    from ..common.validation import validate
    from ..common.validation.report import write_report

    result = validate(
        train,
        hold,
        synthetic,
        schema,
        seed=int(summary["study"]["seed"]),
        target=target,
        positive=positive,
        # survival data (TCGA-BRCA, AMLSG): Kaplan-Meier, log-rank, Cox and C-index
        survival=schema.survival_pairs[0] if schema.survival_pairs else None,
        # anonymeter needs numpy < 2: it runs from its own environment when one is set
        anonymeter_python=os.environ.get("FEDSYNTH_ANONYMETER_PYTHON") or None,
    )
    write_report(
        result,
        out / "report.html",
        real_train=train,
        synthetic=synthetic,
        schema=schema,
        title=f"fedsynth study: {schema.name}",
        privacy=privacy_rows(summary),
        rounds=summary["rounds"],
        appendix={"per-round log (every site's reply)": summary["rounds"],
                  "study configuration": summary["study"]},
        generator=summary["study"].get("generator"),
        release=summary.get("privacy"),
    )
    metrics = result.to_dict()
    # exact train/holdout row counts are statistics of private rows: not in the summary
    metrics["info"].pop("rows", None)
    return {"headline": result.headline(), "metrics": metrics}, result


def privacy_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per site: epsilon spent beside its budget and delta (public: the site's config)."""
    config = {s["name"]: s for s in summary.get("sites_config", [])}
    shared = summary.get("secure_aggregation", {})
    split = {n for n, h in shared.get("honest_sites", {}).items() if h > 1}
    rows = []
    for name, info in summary["sites"].items():
        cfg = config.get(name, {})
        row = {"site": name, "epsilon_spent": info["epsilon"],
               "epsilon_budget": cfg.get("epsilon") if cfg.get("dp", True) else None,
               "delta": cfg.get("delta") if cfg.get("dp", True) else None,
               "rounds_trained": info["rounds_trained"], "status": info["last_status"],
               "problems": info.get("problems", [])}
        if name in split:  # distributed noise: the figure should all others collude
            row["epsilon_alone"] = shared.get("epsilon_alone", {}).get(name)
        rows.append(row)
    return rows


def _print_summary(console: Console, summary: dict[str, Any]) -> None:
    """The privacy table, the label of a run that is no DP release, the headline, the
    outputs written and the verdict."""
    from rich.markup import escape
    from rich.table import Table

    label = summary.get("privacy")
    table = Table(title="privacy spent per site (whole study)"
                  + (f": {escape(str(label))}" if is_not_a_release(label) else ""))
    table.add_column("site")
    table.add_column("epsilon")
    table.add_column("rounds trained")
    table.add_column("last status")
    config = {s["name"]: s for s in summary.get("sites_config", [])}
    shared = summary.get("secure_aggregation", {})
    split = {n: h for n, h in shared.get("honest_sites", {}).items() if h > 1}
    alone = shared.get("epsilon_alone", {})
    if split:
        table.add_column("if all others collude")
    for name, info in summary["sites"].items():
        eps = info["epsilon"]
        cfg = config.get(name, {})
        budget = f" of {cfg['epsilon']:g}" if "epsilon" in cfg else ""
        row = [
            name,
            "no DP" if eps is None else f"{eps:.3f}{budget} (delta {cfg.get('delta', 0):g})",
            str(info["rounds_trained"]),
            str(info["last_status"]),
        ]
        if split:
            row.append(f"{alone[name]:.3f} (trusts {split[name]} sites)"
                       if name in split and alone.get(name) is not None else "same")
        table.add_row(*row)
    console.print(table)
    if is_not_a_release(label):
        # the epsilons above read as a guarantee; the noise was replayable or absent
        console.print(f"[bold red]{escape(str(label))}[/]: the epsilons above are no "
                      "guarantee; do not publish these outputs as a DP release")
    if split:
        console.print(
            "distributed noise: each site added 1/h of its noise; its epsilon holds while "
            "at least h sites (itself included) do not collude with the coordinator, and "
            "the last column is what it spent if every other site does (docs/privacy.md)")
    head = summary.get("validation", {}).get("headline", {})
    if head:
        console.print("validation against held-out patients: " + headline_text(head))
    out = summary["study"]["output-dir"]
    console.print(
        f"wrote {out}/synthetic.csv, model.fsg, summary.json, report.html "
        f"in {summary['seconds_total']:.0f} s"
    )
    if "verdict" in summary:
        print_verdict(console, summary["verdict"], f"{out}/report.html")


def headline_text(head: dict[str, Any]) -> str:
    """The headline figures, named as the report names them (the metric "fidelity" is
    "marginal_similarity", apart from the area of that name)."""
    from ..common.validation.report import METRIC_DISPLAY

    return ", ".join(f"{METRIC_DISPLAY.get(k, k)} {v:.3f}" for k, v in head.items()
                     if isinstance(v, float))


def print_verdict(console: Console, verdict: dict[str, Any], report: str) -> None:
    """The study's verdict per validation area, with advice for each failing one."""
    from rich.markup import escape

    colour = {"pass": "green", "fail": "red", "not judged": "dim"}
    overall = "green" if verdict["passed"] else "red"
    console.print(f"[bold {overall}]verdict: {escape(verdict['headline'])}[/]")
    for area, info in verdict["areas"].items():
        word = info["verdict"]
        line = f"  [{colour[word]}]{word:>10}[/] {area}"
        if info["failed"]:
            shown = ", ".join(info["failed"][:3]) + (", ..." if len(info["failed"]) > 3 else "")
            line += f" ({len(info['failed'])} of {info['checks']} checks fail: {escape(shown)})"
        console.print(line)
        if info["advice"]:
            console.print(f"             [dim]what to do:[/] {escape(info['advice'])}")
    for note in verdict.get("notes", []):
        console.print(f"  note: {escape(note)}")
    console.print(f"details and plots: {report}")
