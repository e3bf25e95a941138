"""``fedsynth benchmark``'s arguments turned into the runs of its parts.

Kept apart from ``fedsynth/cli.py`` so the command module only declares options. Every
option is checked before anything runs or is written: a bad value ends with one
message (a ``ConfigError``, exit 2) and no output folder.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from rich.console import Console

from ..common.study import ConfigError
from .benchmark import GENERATORS, BenchmarkOptions, check_options, run_benchmark
from .benchmark_baselines import BASELINES

PARTS = ("settings", "throughput", "scale")


def _list(text: str, what: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items:
        raise ConfigError(f"--{what} is empty; give a comma-separated list")
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise ConfigError(f"--{what}: unknown {bad}; choose from {', '.join(allowed)}")
    return items


def _numbers(text: str, what: str, kind: type = float) -> tuple:
    try:
        values = tuple(kind(x) for x in _list(text, what))
    except ValueError:
        raise ConfigError(f"--{what} takes comma-separated numbers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise ConfigError(f"--{what}: every value must be > 0")
    return values


def _honest(text: str) -> tuple[int, ...]:
    """``--honest-sites``: counts of trusted sites, ``all`` for every site ('' none)."""
    if not text.strip():
        return ()
    out = []
    for item in _list(text, "honest-sites"):
        if item == "all":
            out.append(0)
        elif item.isdigit() and int(item) >= 1:
            out.append(int(item))
        else:
            raise ConfigError(f"--honest-sites takes whole numbers >= 1 or 'all', got {item!r}")
    return tuple(out)


def _command() -> str:
    if len(sys.argv) > 1 and sys.argv[1] == "benchmark":
        return "fedsynth " + shlex.join(sys.argv[1:])
    return "fedsynth benchmark (called from Python)"


def options_from_args(args: argparse.Namespace) -> BenchmarkOptions:
    anonymeter = os.environ.get("FEDSYNTH_ANONYMETER_PYTHON", "")
    use_anon = (not args.quick and bool(anonymeter)) if args.anonymeter is None else args.anonymeter
    if use_anon and not anonymeter:
        raise ConfigError(
            "--anonymeter needs FEDSYNTH_ANONYMETER_PYTHON: the interpreter of the separate "
            "environment that has anonymeter (see docs/validation.md)"
        )
    chosen = {
        "dataset": args.dataset,
        "seed": args.seed,
        "generators": _list(args.generators, "generators", GENERATORS),
        "epsilons": _numbers(args.epsilons, "epsilons"),
        "baselines": _list(args.baselines, "baselines", BASELINES),
        "dirichlet_alpha": args.dirichlet_alpha,
        "dirichlet_sites": args.dirichlet_sites,
        "anonymeter_python": anonymeter if use_anon else "",
        "out": Path(args.out),
        "keep_work": args.keep_work,
        "reproducible_noise": args.reproducible_noise,
        "command": _command(),
        "only": tuple(x for x in args.only.split(",") if x.strip()),
        "honest_sites": _honest(args.honest_sites),
    }
    for key in ("seeds", "rounds", "local_epochs", "baseline_epochs", "ray_check",
                "alone_sites"):
        value = getattr(args, key)
        if value is not None:
            chosen[key] = value
    if args.alone_sites is not None and args.alone_sites < 0:
        raise ConfigError("--alone-sites must be 0 (every site) or more")
    if args.baseline_epochs is not None and args.baseline_epochs < 1:
        raise ConfigError("--baseline-epochs must be at least 1")
    opts = BenchmarkOptions.quick_defaults(**chosen) if args.quick else BenchmarkOptions(
        **{"ray_check": True, **chosen}
    )
    check_options(opts)
    return opts


def benchmark_from_args(args: argparse.Namespace, console: Console) -> int:
    parts = _list(args.part, "part", PARTS)
    opts = options_from_args(args)
    sites = _numbers(args.scale_sites, "scale-sites", int) if "scale" in parts else ()
    if "scale" in parts and args.scale_dataset not in ("amlsg", "tcga_brca", "heart_disease",
                                                        "mimic3_demo"):
        raise ConfigError(f"--scale-dataset {args.scale_dataset!r} is not a bundled dataset")
    if "settings" in parts:
        run_benchmark(opts, console)
    if "throughput" in parts or "scale" in parts:
        from .benchmark_cost import run_scale, run_throughput

        if "throughput" in parts:
            run_throughput(opts, console)
        if "scale" in parts:
            run_scale(opts, args.scale_dataset, sites, console)
    return 0
