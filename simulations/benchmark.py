"""``fedsynth benchmark``: how close federated DP training comes to pooling, and at what cost.

For each dataset, each seed and each generator it runs the settings of
``docs/benchmark.md``: centralized training on the pooled training rows (no DP; DP),
each site alone, federated training (no DP; DP at each epsilon per site), each of the
federated ones with and without CKKS-encrypted aggregation; then the external
baselines trained centrally without DP (``benchmark_baselines``). Every synthetic table
is scored by the validation suite against real patients that no generator saw, and
the figures go to ``results.csv`` (one row per setting and seed), ``results.md``
(medians over seeds with their min-max range) and PNG plots.

Which code runs each setting:

- federated and site-alone settings: the real coordinator (``server.app.run_study``,
  its site-aware or encrypted strategy) and the real ClientApp, driven in this process
  by ``benchmark_inprocess.InProcessGrid`` (no Ray start per study; sites train one
  after another); ``--ray-check`` reruns one of them through ``fedsynth simulate`` (Ray)
  and reports how far apart the two are;
- centralized settings: ``Generator.fit``, the same trainer and accountant as a site;
- baselines: the packages themselves.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..common.generators import get_generator
from ..common.generators.base import NO_DP_RELEASE, fit_label
from ..common.privacy.randomness import DPRandomness
from ..common.schema import Schema
from ..common.study import DEFAULT_DELTA, DEFAULT_EPSILON, ConfigError, SiteConfig, StudyConfig
from ..common.table import read_table
from ..server.app import SYNTHETIC
from .benchmark_baselines import BASELINES, SDV_BASELINES, run_baseline, sdv_missing
from .benchmark_inprocess import run_inprocess
from .benchmark_measure import Measure, machine, measured
from .benchmark_report import write_outputs
from .datasets import DATASETS, bundled_schema_path, load_site_frames
from .simulate import SimulationOptions, prepare_sites, setup_mask_keys, setup_simulation_keys
from .splits import dirichlet_split, holdout_split, outcome_labels, write_site_table

GENERATORS = ("tvae", "ctgan", "ddpm", "marginal")
# Generators whose central mode runs at every epsilon of the sweep, as their own upper
# reference for the federated figures at the same per-site budget.
CENTRAL_SWEEP = ("marginal",)
QUICK_AREAS = ("fidelity", "utility", "survival", "detection", "privacy")

#: figures kept per setting (headline keys of the validation suite, plus anonymeter's)
METRICS = (
    "fidelity",
    "correlation_similarity",
    "contingency_similarity",
    "tstr_auroc",
    "cox_c_index",
    "detection_auroc",
    "membership_inference_auroc",
    "dcr_share_closer_to_train",
    "anonymeter_singling_out_risk",
    "anonymeter_linkability_risk",
    "anonymeter_inference_risk",
)
REFERENCE_METRICS = ("trtr_auroc",)
# Figures of the code-set and survival areas that issue 13 judges (AMLSG, MIMIC), each
# with its real-vs-real reference (train against holdout) as ``<name>_ref``.
DETAIL_METRICS = ("code_frequency_correlation", "codeset_sign_agreement",
                  "cox_hr_sign_agreement")


@dataclass(frozen=True)
class Setting:
    """One way of producing a synthetic table."""

    kind: str  # central | local | federated | baseline
    generator: str  # a fedsynth generator, or a baseline's name
    dp: bool = False
    epsilon: float | None = None
    secure: bool = False
    site: str = ""
    # > 0: a marginal study under masked sums, each site adding 1/h of its noise
    # (SiteConfig.honest_sites; docs/privacy.md, "Distributed noise")
    honest_sites: int = 0

    @property
    def key(self) -> str:
        if self.kind == "baseline":
            return f"baseline/{self.generator}"
        parts = [self.generator, self.kind]
        if self.site:
            parts.append(self.site)
        parts.append(f"eps{self.epsilon:g}" if self.dp else "nodp")
        if self.secure:
            parts.append("ckks")
        if self.honest_sites:
            parts.append(f"masks-h{self.honest_sites}")
        return "/".join(parts)

    @property
    def engine(self) -> str:
        """Which code path trained it (see the module docstring)."""
        return {"central": "Generator.fit", "baseline": "package"}.get(
            self.kind, "in-process Flower (real ServerApp + ClientApp)"
        )


@dataclass
class BenchmarkOptions:
    dataset: str = "heart_disease"
    quick: bool = False
    seeds: int = 3
    seed: int = 0
    generators: tuple[str, ...] = GENERATORS
    epsilons: tuple[float, ...] = (1.0, 3.0, 10.0)
    central_epsilon: float = DEFAULT_EPSILON  # budget of the central and site-alone runs
    delta: float = DEFAULT_DELTA
    rounds: int = 10
    local_epochs: int = 20
    sample_rate: float = 1.0
    holdout: float = 0.2
    dirichlet_alpha: float | None = None
    dirichlet_sites: int = 0  # 0: as many sites as the dataset has
    baselines: tuple[str, ...] = BASELINES
    baseline_epochs: int | None = None  # None: the packages' defaults
    # "rows": the ctgan package's CTGAN draws batches of at most the training rows
    # (--quick; see benchmark_baselines.quick_batch); "package": its default 500
    baseline_batch: str = "package"
    # site-alone settings: 0 runs every site alone; k > 0 only k sites spread over the
    # sizes (the smallest, the largest, ... see alone_sites): --quick's 4 on AMLSG's 18
    # centres is 14 fewer settings per generator
    alone_sites: int = 0
    areas: tuple[str, ...] | None = None  # None: every area of the suite
    anonymeter_python: str = ""
    ray_check: bool = False
    out: Path = Path("benchmark-output")
    keep_work: bool = False
    command: str = ""
    only: tuple[str, ...] = ()  # run only these setting keys (e.g. "tvae/federated/eps3")
    generator_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    # False (default): every site draws its DP noise, batches and training draws from
    # secret randomness, as a real site does, so two runs of the same seeds differ.
    # True: all of them derive from the seed (DPRandomness.reproducible), the run repeats
    # byte for byte, and nothing it produces is a DP release (results.md says so).
    reproducible_noise: bool = False
    # Studies under masked sums (a marginal study's counts, a deep one's quantile grid),
    # one federated DP setting per generator, epsilon and h in this list (0: as many as
    # the study's sites); empty: none
    honest_sites: tuple[int, ...] = ()

    @classmethod
    def quick_defaults(cls, **kw: Any) -> BenchmarkOptions:
        """Every setting, one seed, shorter training and fewer validation areas."""
        base = {
            "quick": True,
            "seeds": 1,
            "rounds": 5,
            "local_epochs": 10,
            "baseline_epochs": 50,
            "baseline_batch": "rows",
            "alone_sites": 4,
            "areas": QUICK_AREAS,
            "ray_check": True,
        }
        base.update(kw)
        return cls(**base)


def alone_sites(rows: dict[str, int], k: int) -> list[str]:
    """The sites that also train alone: all of them (``k`` 0 or no fewer sites than
    ``k``), else ``k`` spread over the sizes, the smallest and the largest first (a
    site-alone setting shows what a hospital gets without the others, and that is
    told by the range of sizes more than by every hospital)."""
    names = list(rows)
    if k <= 0 or len(names) <= k:
        return names
    by_size = sorted(names, key=lambda n: (rows[n], n))
    picks = {int(round(i * (len(by_size) - 1) / (k - 1))) for i in range(k)} if k > 1 \
        else {len(by_size) - 1}
    return [by_size[i] for i in sorted(picks)]


def plan_settings(opts: BenchmarkOptions, site_names: list[str],
                  site_rows: dict[str, int] | None = None) -> list[Setting]:
    """Every setting of one seed, in the order they run."""
    settings: list[Setting] = []
    rows = {n: (site_rows or {}).get(n, 0) for n in site_names}
    alone = alone_sites(rows, opts.alone_sites)
    for g in opts.generators:
        settings.append(Setting("central", g))
        central = opts.epsilons if g in CENTRAL_SWEEP else (opts.central_epsilon,)
        for eps in dict.fromkeys(central):
            settings.append(Setting("central", g, dp=True, epsilon=eps))
        for name in alone:
            settings.append(
                Setting("local", g, dp=True, epsilon=opts.central_epsilon, site=name)
            )
        for secure in (False, True):
            settings.append(Setting("federated", g, secure=secure))
            for eps in opts.epsilons:
                settings.append(Setting("federated", g, dp=True, epsilon=eps, secure=secure))
        # masks sum the marginal generator's counts, a deep generator's quantile grid
        for h in dict.fromkeys(h or len(site_names) for h in opts.honest_sites):
            for eps in opts.epsilons:
                settings.append(Setting("federated", g, dp=True, epsilon=eps,
                                        honest_sites=min(h, len(site_names))))
    settings += [Setting("baseline", b) for b in opts.baselines]
    if opts.only:
        unknown = sorted(set(opts.only) - {s.key for s in settings})
        if unknown:
            raise ConfigError(
                f"--only names no setting of this plan: {unknown}; keys look like "
                f"{settings[0].key!r} or {settings[-1].key!r}"
            )
        settings = [s for s in settings if s.key in opts.only]
    return settings


# ----------------------------------------------------------------------------- data


@dataclass
class SeedData:
    """One seed's split: site files on disk, pooled train and pooled holdout."""

    schema: Schema
    schema_path: Path
    sites: list[SiteConfig]
    train: pd.DataFrame  # with a "site" column
    holdout: pd.DataFrame

    def site_train(self, name: str) -> pd.DataFrame:
        return self.train[self.train["site"] == name].drop(columns="site")


#: A Dirichlet split's site needs rows to train on and to hold out; smaller ones are left
#: out of the study (prepare_seed). More sites than rows / MIN_SPLIT_ROWS left none at
#: all (a pandas error), so such a split is refused with the largest that fits.
MIN_SPLIT_ROWS = 2


def site_frames(opts: BenchmarkOptions, seed: int) -> tuple[Schema, dict[str, pd.DataFrame]]:
    """The dataset's sites, or a Dirichlet split of its pooled rows."""
    schema, frames = load_site_frames(opts.dataset)
    if opts.dirichlet_alpha is None:
        return schema, frames
    pooled = pd.concat(frames.values(), ignore_index=True)
    labels = outcome_labels(pooled, schema)
    if labels is None:  # no outcome: split by the original site, so sites still differ
        labels = np.concatenate([np.full(len(f), i) for i, f in enumerate(frames.values())])
    n_sites = opts.dirichlet_sites or len(frames)
    if n_sites > len(pooled) // MIN_SPLIT_ROWS:
        # prepare_seed skips sites of fewer than 2 rows; past this, it skipped them all
        raise ConfigError(
            f"--dirichlet-sites {n_sites}: {opts.dataset} has {len(pooled)} rows, enough "
            f"for at most {len(pooled) // MIN_SPLIT_ROWS} sites of {MIN_SPLIT_ROWS} rows on "
            f"average; pass --dirichlet-sites {len(pooled) // MIN_SPLIT_ROWS} or fewer")
    return schema, dirichlet_split(pooled, labels, n_sites, opts.dirichlet_alpha, seed)


def prepare_seed(opts: BenchmarkOptions, seed: int, folder: Path) -> SeedData:
    """Hold back a share of every site; write each site's training rows as its file."""
    schema_path = bundled_schema_path(opts.dataset)
    if opts.dirichlet_alpha is None:
        # exactly the split `fedsynth simulate` makes, so --ray-check compares like with like
        sim = SimulationOptions(
            dataset=opts.dataset, holdout=opts.holdout, delta=opts.delta,
            study=StudyConfig(seed=seed), reproducible_noise=opts.reproducible_noise,
        )
        sites, train, hold = prepare_sites(sim, folder)
        return SeedData(Schema.load(schema_path), schema_path, sites, train, hold)
    schema, frames = site_frames(opts, seed)
    real = folder / "real"
    real.mkdir(parents=True, exist_ok=True)
    sites, trains, holds = [], [], []
    for i, (name, frame) in enumerate(frames.items()):
        if len(frame) < MIN_SPLIT_ROWS:
            continue
        train, hold = holdout_split(frame, schema, opts.holdout, seed=seed + i)
        path = real / f"site-{name}.csv"
        write_site_table(train, schema, str(path))
        sites.append(SiteConfig(
            name=name, data_path=str(path), schema_path=str(schema_path), delta=opts.delta,
            reproducible_noise_seed=seed * 1000 + i if opts.reproducible_noise else None))
        trains.append(train.assign(site=name))
        holds.append(hold.assign(site=name))
    return SeedData(schema, schema_path, sites, pd.concat(trains, ignore_index=True),
                    pd.concat(holds, ignore_index=True))


# ----------------------------------------------------------------------------- settings


@dataclass
class Produced:
    synthetic: pd.DataFrame
    real_train: pd.DataFrame
    epsilon_sites: dict[str, float | None] = field(default_factory=dict)
    # distributed noise: each site's epsilon were every other site to collude
    epsilon_alone: dict[str, float | None] = field(default_factory=dict)
    bytes_per_round: float = float("nan")
    bytes_up_per_site: float = float("nan")
    rounds: int = 0
    seconds_per_round: float = float("nan")
    epochs: float = float("nan")
    folder: str = ""
    # the privacy label of what ran (a study's summary.json, a fit's file label): a
    # seeded or no-DP row must be told from a DP one in results.csv
    privacy: str = ""


def _study(opts: BenchmarkOptions, setting: Setting, seed: int, folder: Path,
           schema_path: Path, n_sites: int, n_rows: int) -> StudyConfig:
    return StudyConfig(
        study_id=f"bench-{setting.key.replace('/', '-')}-s{seed}",
        schema=str(schema_path),
        min_sites=min(2, n_sites),
        num_server_rounds=opts.rounds,
        local_epochs=opts.local_epochs,
        sample_rate=opts.sample_rate,
        generator=setting.generator,
        generator_params=opts.generator_params.get(setting.generator, {}),
        seed=seed,
        output_dir=str(folder),
        n_synthetic=n_rows,
        secure_aggregation=("ckks" if setting.secure else
                            "masks" if setting.honest_sites else "none"),
        honest_sites=max(1, setting.honest_sites),
    )


def run_federated(opts: BenchmarkOptions, setting: Setting, data: SeedData, seed: int,
                  folder: Path) -> Produced:
    """A federated (or one-site) study with the real coordinator and site code."""
    chosen = [s for s in data.sites if not setting.site or s.name == setting.site]
    sites = [
        replace(s, dp=setting.dp, epsilon=setting.epsilon or s.epsilon,
                state_dir=str(folder / "site-state" / s.name))
        for s in chosen
    ]
    real = data.site_train(setting.site) if setting.site else data.train.drop(columns="site")
    study = _study(opts, setting, seed, folder, data.schema_path, len(sites), len(real))
    if setting.secure:
        study, sites = setup_simulation_keys(folder, study, sites)
    if setting.honest_sites:
        sites = setup_mask_keys(folder, sites, setting.honest_sites)
    result = run_inprocess(study, sites)
    summary = json.loads((folder / "summary.json").read_text())
    synthetic = read_table(folder / SYNTHETIC, replace(data.schema, header=True))
    train_rounds = result.train_traffic
    return Produced(
        synthetic=synthetic,
        real_train=real,
        epsilon_sites={k: v["epsilon"] for k, v in summary["sites"].items()},
        epsilon_alone=(summary.get("secure_aggregation", {}).get("epsilon_alone", {})
                       if setting.honest_sites else {}),
        bytes_per_round=float(np.mean([t.total for t in train_rounds])),
        bytes_up_per_site=float(np.mean([t.to_coordinator / len(sites) for t in train_rounds])),
        rounds=len(result.outcome.history),
        seconds_per_round=float(np.mean([t.seconds for t in train_rounds])),
        epochs=float(opts.rounds * opts.local_epochs),
        folder=str(folder),
        privacy=str(summary.get("privacy", "")),
    )


#: The label of a central DP fit with secret noise (its file carries none: ``fit_label``).
CENTRAL_RELEASE = "DP release: one central DP fit"


def run_central(opts: BenchmarkOptions, setting: Setting, data: SeedData, seed: int
                ) -> Produced:
    """The pooled training rows at one place: as many epochs as a site's whole study."""
    train = data.train.drop(columns="site")
    model = get_generator(setting.generator)(
        data.schema, seed=seed, **opts.generator_params.get(setting.generator, {})
    )
    epochs = opts.rounds * opts.local_epochs
    randomness = (DPRandomness.reproducible(seed, "central") if opts.reproducible_noise
                  else DPRandomness.secret())
    model.fit(train, epochs=epochs, sample_rate=opts.sample_rate,
              epsilon=setting.epsilon if setting.dp else None, delta=opts.delta,
              randomness=randomness)
    eps = model.fit_info["epsilon"]
    return Produced(
        synthetic=model.sample(len(train), seed=seed + 1),
        real_train=train,
        epsilon_sites={"pooled": eps},
        epochs=float(epochs),
        privacy=fit_label(model.fit_info).get("privacy", CENTRAL_RELEASE),
    )


def run_external(opts: BenchmarkOptions, setting: Setting, data: SeedData, seed: int
                 ) -> Produced:
    train = data.train.drop(columns="site")
    run = run_baseline(setting.generator, train, data.schema, len(train), seed,
                       opts.baseline_epochs, batch_rows=opts.baseline_batch == "rows")
    return Produced(synthetic=run.synthetic, real_train=train,
                    epochs=float(run.epochs) if run.epochs else float("nan"),
                    privacy=NO_DP_RELEASE)  # the packages train without DP


def score(opts: BenchmarkOptions, data: SeedData, produced: Produced, seed: int
          ) -> tuple[dict[str, float], float]:
    """The validation suite's headline figures (and anonymeter's risks when enabled)."""
    from ..common.validation import validate

    pairs = data.schema.survival_pairs
    covariates = None
    if opts.quick and pairs and data.schema.codesets:
        # --quick on a wide table (the MIMIC-III demo: 1,236 diagnosis codes, 100
        # patients): a Cox model on every code took 150 s per setting, most of the
        # quick run, for hazard ratios of codes that a handful of patients carry. The
        # quick run fits it on the columns outside code sets; the full run on all.
        grouped = {m for members in data.schema.codesets.values() for m in members}
        covariates = [c for c in data.schema.names
                      if c not in grouped and c not in pairs[0]]
    start = time.perf_counter()
    result = validate(
        produced.real_train,
        data.holdout.drop(columns="site"),
        produced.synthetic,
        data.schema,
        seed=seed,
        areas=opts.areas,
        survival=pairs[0] if pairs else None,
        survival_covariates=covariates,
        anonymeter_python=opts.anonymeter_python or None,
    )
    figures = {k: float(v) for k, v in result.headline().items() if isinstance(v, int | float)}
    for m in result.metrics:
        if m.name.startswith("anonymeter_") and m.name.endswith("_risk"):
            figures[m.name] = float(m.value)
        if m.name in DETAIL_METRICS and m.name not in figures:  # the first: the code set
            figures[m.name] = float(m.value)
            figures[f"{m.name}_ref"] = float(m.reference) if m.reference is not None else None
    return figures, time.perf_counter() - start


def run_setting(opts: BenchmarkOptions, setting: Setting, data: SeedData, seed: int,
                work: Path) -> dict[str, Any]:
    """Train, sample and score one setting; one row of results.csv."""
    folder = work / setting.key.replace("/", "_")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    mem: Measure
    with measured() as mem:
        if setting.kind in ("federated", "local"):
            produced = run_federated(opts, setting, data, seed, folder)
        elif setting.kind == "central":
            produced = run_central(opts, setting, data, seed)
        else:
            produced = run_external(opts, setting, data, seed)
    figures, validation_s = score(opts, data, produced, seed)
    eps = [e for e in produced.epsilon_sites.values() if e is not None]
    row: dict[str, Any] = {
        "dataset": opts.dataset,
        "seed": seed,
        "setting": setting.key,
        "kind": setting.kind,
        "generator": setting.generator,
        "dp": setting.dp,
        "epsilon_target": setting.epsilon if setting.dp else None,
        "privacy": produced.privacy,
        "secure": setting.secure,
        "honest_sites": setting.honest_sites,
        "site": setting.site,
        "engine": setting.engine,
        "epsilon_max_site": max(eps) if eps else None,
        "epsilon_sites": json.dumps(produced.epsilon_sites),
        "epsilon_alone_max_site": max((e for e in produced.epsilon_alone.values()
                                       if e is not None), default=None),
        "train_rows": len(produced.real_train),
        "epochs": produced.epochs,
        "rounds": produced.rounds,
        "wall_s": mem.seconds,
        "validation_s": validation_s,
        "peak_rss_mb": mem.peak_mb,
        "memory_method": mem.method,
        "bytes_per_round": produced.bytes_per_round,
        "bytes_up_per_site": produced.bytes_up_per_site,
    }
    for key in (*METRICS, *REFERENCE_METRICS):
        row[key] = figures.get(key)
    for key in DETAIL_METRICS:
        if key in figures:
            row[key], row[f"{key}_ref"] = figures[key], figures[f"{key}_ref"]
    return row


# ----------------------------------------------------------------------------- ray check


def ray_check(opts: BenchmarkOptions, seed: int, inprocess_folder: Path, work: Path,
              console: Console) -> dict[str, Any]:
    """Rerun one federated DP setting through ``fedsynth simulate`` (Ray) and compare."""
    from ..common.generators import Generator
    from .simulate import simulate

    setting = Setting("federated", opts.generators[0], dp=True,
                      epsilon=opts.central_epsilon)
    folder = work / "ray-check"
    shutil.rmtree(folder, ignore_errors=True)
    study = replace(
        _study(opts, setting, seed, folder, bundled_schema_path(opts.dataset), 2, 0),
        n_synthetic=0,
    )
    sim = SimulationOptions(dataset=opts.dataset, epsilon=opts.central_epsilon,
                            delta=opts.delta, holdout=opts.holdout, study=study,
                            engine="ray")  # the check is of Flower's Ray engine
    start = time.perf_counter()
    summary = simulate(sim, Console(file=open(os.devnull, "w")))  # noqa: SIM115
    seconds = time.perf_counter() - start
    ray_model = Generator.load(folder / "model.fsg").state_dict()
    ours = Generator.load(inprocess_folder / "model.fsg").state_dict()
    diff = max(float(np.max(np.abs(ray_model[k] - ours[k]))) for k in ours)
    scale = max(float(np.max(np.abs(ours[k]))) for k in ours)
    ours_summary = json.loads((inprocess_folder / "summary.json").read_text())
    eps_ray = {k: v["epsilon"] for k, v in summary["sites"].items()}
    eps_ours = {k: v["epsilon"] for k, v in ours_summary["sites"].items()}
    check = {
        "setting": setting.key,
        "seed": seed,
        "ray_seconds_total": seconds,
        "ray_seconds_federated": summary.get("seconds_federated"),
        "max_abs_weight_difference": diff,
        "max_relative_weight_difference": diff / scale if scale else float("nan"),
        "epsilon_sites_ray": eps_ray,
        "epsilon_sites_inprocess": eps_ours,
        "headline_ray": summary.get("validation", {}).get("headline", {}),
    }
    console.print(
        f"ray check ({setting.key}, seed {seed}): final weights differ by at most "
        f"{diff:.2e} (relative {check['max_relative_weight_difference']:.2e}); "
        f"epsilon per site equal: {eps_ray == eps_ours}; Ray study took {seconds:.0f} s"
    )
    return check


# ----------------------------------------------------------------------------- driver


def check_options(opts: BenchmarkOptions) -> None:
    """Refuse bad input before anything runs or is written."""
    problems = []
    if opts.dataset not in DATASETS:
        problems.append(f"unknown dataset {opts.dataset!r}; choose from "
                        f"{', '.join(sorted(DATASETS))}")
    if opts.seeds < 1:
        problems.append("--seeds must be at least 1")
    # inf passed "> 0": the Dirichlet shares became NaN and the split cast them to ints
    if opts.dirichlet_alpha is not None and not 0 < opts.dirichlet_alpha < math.inf:
        problems.append("--dirichlet-alpha must be a finite number > 0")
    if opts.dirichlet_sites < 0:
        problems.append("--dirichlet-sites must be >= 0")
    if opts.dirichlet_sites and opts.dirichlet_alpha is None:
        problems.append("--dirichlet-sites sets the sites of a Dirichlet split: pass "
                        "--dirichlet-alpha too (without it the dataset's own sites are used)")
    unknown = [g for g in opts.generators if g not in GENERATORS]
    if unknown:
        problems.append(f"unknown generator(s) {unknown}; choose from {', '.join(GENERATORS)}")
    # an infinite budget is no privacy at all, and the noise calibration refuses it
    # only once a DP setting starts, after the non-private ones have run
    if any(not 0 < e < math.inf for e in (*opts.epsilons, opts.central_epsilon)):
        problems.append("every epsilon must be a finite number > 0")
    if opts.rounds < 1 or opts.local_epochs < 1:
        problems.append("--rounds and --local-epochs must be at least 1")
    if Path(opts.out).exists() and not Path(opts.out).is_dir():
        # else found only at the folder's mkdir, after the data was split: "[Errno 17]"
        problems.append(f"--out {opts.out} is a file; choose a folder for the results")
    if problems:
        raise ConfigError("; ".join(problems))


def run_benchmark(opts: BenchmarkOptions, console: Console | None = None) -> dict[str, Any]:
    """Run every setting for every seed; write results.csv, results.md, plots."""

    check_options(opts)
    console = console or Console()
    # Flower warns once per study that federated evaluation is off (it is, on purpose)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # tiny networks: one thread is fastest and keeps timings stable
    missing = sdv_missing()
    baselines = opts.baselines
    if missing and any(b in SDV_BASELINES for b in baselines):
        console.print(f"[yellow]{missing}[/yellow]")
        baselines = tuple(b for b in baselines if b not in SDV_BASELINES)
    opts = replace(opts, baselines=baselines)
    out = Path(opts.out)
    # Real rows (site files, holdouts) and models live under work/: a temporary folder
    # removed at the end unless --keep-work, so results folders hold figures only.
    work = out / "work" if opts.keep_work else Path(tempfile.mkdtemp(prefix="fedsynth-bench-"))
    try:
        return _run_all(opts, console, out, work, missing)
    finally:
        if not opts.keep_work:
            shutil.rmtree(work, ignore_errors=True)


def _run_all(opts: BenchmarkOptions, console: Console, out: Path, work: Path, missing: str
             ) -> dict[str, Any]:
    env_before = machine()
    commit = _commit(out)  # at the start: the code that runs is the code imported now
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    seeds = [opts.seed + i for i in range(opts.seeds)]
    first = prepare_seed(opts, seeds[0], work / f"seed-{seeds[0]}")
    plan = plan_settings(opts, [s.name for s in first.sites],
                         first.train["site"].value_counts().to_dict())
    out.mkdir(parents=True, exist_ok=True)  # only once the plan is known to be valid
    console.print(
        f"[bold]fedsynth benchmark[/bold] on {opts.dataset}: {len(first.sites)} sites"
        + (f" (Dirichlet alpha {opts.dirichlet_alpha:g})" if opts.dirichlet_alpha else "")
        + f", {len(plan)} settings x {len(seeds)} seed(s)"
        + (" (quick)" if opts.quick else "")
    )
    if "sdv_ctgan" in opts.baselines and opts.baseline_batch == "rows":
        from .benchmark_baselines import quick_batch

        console.print(f"baseline sdv_ctgan: {opts.baseline_epochs or 'default'} epochs, "
                      f"batch {quick_batch(len(first.train))} (the training rows, at most "
                      "the package's 500)")
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console,
    ) as progress:
        task = progress.add_task("benchmark", total=len(plan) * len(seeds))
        for seed in seeds:
            seed_dir = work / f"seed-{seed}"
            data = first if seed == seeds[0] else prepare_seed(opts, seed, seed_dir)
            for setting in plan:
                progress.update(task, description=f"seed {seed} {setting.key}")
                row = run_setting(opts, setting, data, seed, seed_dir)
                rows.append(row)
                _write_csv(rows, out / "results.csv")  # partial results survive a stop
                progress.advance(task)
            if opts.ray_check and seed == seeds[0]:
                key = Setting("federated", opts.generators[0], dp=True,
                              epsilon=opts.central_epsilon).key
                checks.append(ray_check(opts, seed, seed_dir / key.replace("/", "_"),
                                        seed_dir, console))
    info = {
        "command": opts.command,
        "commit": commit,
        "seconds_total": time.perf_counter() - start,
        "machine_start": env_before,
        "machine_end": machine(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "sdv": missing or "installed",
        "ray_check": checks,
        "sites": {s.name: len(first.site_train(s.name)) for s in first.sites},
        "holdout_rows": len(first.holdout),
    }
    (out / "run.json").write_text(json.dumps(info, indent=1, default=str))
    written = write_outputs(rows, info, out)
    console.print(f"wrote {', '.join(str(p) for p in written)} in {info['seconds_total']:.0f} s")
    return {"rows": rows, "info": info}


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        fields = list(dict.fromkeys(k for r in rows for k in r))  # detail figures vary
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _commit(out: Path) -> str:
    """The commit the code runs from, and whether the work tree had changes other than
    this run's own output folder."""
    try:
        here = Path(__file__).resolve().parent
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, check=True).stdout.strip()
        top = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here,
                                  capture_output=True, text=True, check=True).stdout.strip())
        status = subprocess.run(["git", "status", "--porcelain"], cwd=here,
                                capture_output=True, text=True).stdout.splitlines()
        try:
            own = Path(out).resolve().relative_to(top.resolve()).as_posix().rstrip("/") + "/"
        except ValueError:
            own = None
        dirty = [line for line in status if not (own and line[3:].startswith(own))]
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
