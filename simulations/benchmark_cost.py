"""What fedsynth costs: training throughput, DP overhead, Opacus' modes, and scale.

``run_throughput`` (``fedsynth benchmark --part throughput``), on the pooled training
rows of the dataset:

- rows per second of each generator through the project's trainer
  (``privacy.trainer.train_round``), without DP and with DP-SGD, and their ratio;
- the per-sample clipping modes (Opacus' ``hooks``; ``functorch``; ``ew``, expanded
  weights; ``ghost``, ghost clipping; and ``bookkeeping``, book-keeping clipping, the
  trainer's choice for every bundled generator) timed on one clipped step of each
  generator's private module, each checked against ``hooks`` for exactness (the
  clipped gradient sum, noise off, must agree to 1e-4 relative); a mode that cannot
  run a model is reported with the reason;
- seconds per epoch of fedsynth's CTGAN and TVAE next to the ``ctgan`` package's, on
  the same rows, at the same batch size (the package's default, 500), no DP.

``run_scale`` (``--part scale``): one federated DP study per site count, on a
Dirichlet split of a larger table (AMLSG by default), in process; wall time per round,
peak RSS and bytes per round against the number of sites.

Both write Markdown and CSV next to the settings results.
"""

from __future__ import annotations

import copy
import csv
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleExpandedWeights
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleModuleFastGradientClipping,
)
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from rich.console import Console

from ..common.generators import Generator, get_generator
from ..common.privacy import DPSettings, PrivacyLedger, train_round
from ..common.privacy.bookkeeping import BookKeeping
from ..common.privacy.randomness import DPRandomness
from ..server.app import SECONDS_FEDERATED, read_timings
from .benchmark import BenchmarkOptions, Setting, prepare_seed, run_federated
from .benchmark_measure import machine, measured

MODES = ("hooks", "functorch", "ew", "ghost", "bookkeeping")
EXACT_TOLERANCE = 1e-4
PACKAGE_BATCH = 500  # the ctgan package's default batch size


# ----------------------------------------------------------------------------- throughput


def rows_per_second(model: Generator, data: np.ndarray, dp: bool, epochs: int,
                    sample_rate: float, seed: int) -> float:
    """Rows through the trainer per second (DP-SGD at noise 1.0 when ``dp``)."""
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0) if dp else None
    stats = train_round(model, data, epochs=epochs, sample_rate=sample_rate, dp=settings,
                        ledger=PrivacyLedger() if dp else None,
                        randomness=DPRandomness.reproducible(seed, "throughput"))
    return stats.rows_seen / stats.seconds


def _clipped_step(model: Generator, batch: torch.Tensor, mode: str) -> tuple[list, float]:
    """One clipped, noise-free DP-SGD step in ``mode``: the summed gradient and seconds."""
    module = model.private_module()
    params = [p for p in module.parameters() if p.requires_grad]
    start = time.perf_counter()
    if mode == "bookkeeping":
        keeper = BookKeeping(module, 1.0)
        with keeper.recording():
            losses = model.per_sample_loss(module, batch)
        keeper.clip_into_grad(losses)
        seconds = time.perf_counter() - start
        keeper.remove_hooks()
        return [p.grad.detach().clone() for p in params], seconds
    if mode == "ghost":
        gsm = GradSampleModuleFastGradientClipping(module, loss_reduction="sum",
                                                   max_grad_norm=1.0, use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(
            torch.optim.SGD(gsm.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=1.0,
            expected_batch_size=len(batch), loss_reduction="sum",
        )
        losses = model.per_sample_loss(gsm, batch)
        DPTensorFastGradientClipping(gsm, opt, losses, "sum").backward()
    else:
        if mode == "ew":
            gsm = GradSampleModuleExpandedWeights(module, loss_reduction="sum")
        else:
            gsm = GradSampleModule(module, loss_reduction="sum", strict=False,
                                   force_functorch=mode == "functorch")
        opt = DPOptimizer(
            torch.optim.SGD(gsm.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=1.0,
            expected_batch_size=len(batch), loss_reduction="sum",
        )
        losses = model.per_sample_loss(gsm, batch)
        losses.sum().backward()
    opt.pre_step()
    seconds = time.perf_counter() - start
    grads = [p.grad.detach().clone() for p in params]
    if hasattr(gsm, "_close"):
        gsm._close()
    elif hasattr(gsm, "remove_hooks"):
        gsm.remove_hooks()
    return grads, seconds


def _plain_step(model: Generator, batch: torch.Tensor) -> float:
    module = model.private_module()
    start = time.perf_counter()
    model.per_sample_loss(module, batch).sum().backward()
    return time.perf_counter() - start


def grad_sample_modes(base: Generator, data: np.ndarray, repeats: int, seed: int
                      ) -> list[dict[str, Any]]:
    """Each Opacus mode on the generator's private module: time per step, exact or not."""
    rng = np.random.default_rng(seed)
    batch = torch.as_tensor(data[rng.permutation(len(data))], dtype=torch.float32)
    rows: list[dict[str, Any]] = []
    reference: list[torch.Tensor] | None = None
    plain = statistics.median(
        _plain_step(copy.deepcopy(base), batch) for _ in range(repeats)
    )
    for mode in MODES:
        times, grads = [], None
        try:
            for _ in range(repeats):
                torch.manual_seed(seed)
                grads, seconds = _clipped_step(copy.deepcopy(base), batch, mode)
                times.append(seconds)
        except Exception as exc:  # noqa: BLE001 (a mode that does not apply: say why)
            rows.append({"generator": base.name, "mode": mode, "ok": False,
                         "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})
            continue
        assert grads is not None
        if mode == "hooks":
            reference = grads
        error = float("nan")
        if reference is not None:
            scale = max(float(r.abs().max()) for r in reference) or 1.0
            error = max(float((g - r).abs().max()) for g, r in
                        zip(grads, reference, strict=True)) / scale
        step = statistics.median(times)
        rows.append({
            "generator": base.name, "mode": mode, "ok": True, "batch": len(batch),
            "seconds_per_step": step, "plain_seconds_per_step": plain,
            "slowdown_vs_no_dp": step / plain, "max_relative_error_vs_hooks": error,
            "exact": bool(error <= EXACT_TOLERANCE), "note": "",
        })
    return rows


class _EpochClock:
    """Stands in for ``tqdm`` in the package's module: times its epoch loop alone."""

    def __init__(self) -> None:
        self.start = self.end = float("nan")

    def __call__(self, iterable: Any, *args: Any, **kwargs: Any) -> Any:
        def loop() -> Any:
            self.start = time.perf_counter()
            yield from iterable
            self.end = time.perf_counter()

        return loop()


def package_epoch_seconds(family: str, train: Any, schema: Any, epochs: int, seed: int
                          ) -> tuple[float, float] | None:
    """The ``ctgan`` package's CTGAN or TVAE: (whole fit seconds, seconds per epoch).

    The package fits a data transformer (a Gaussian mixture per numeric column) before
    its first epoch, and that step's time swings by seconds on a loaded machine. The
    per-epoch figure times the package's epoch loop alone: the loop iterates over
    ``tqdm(range(epochs))`` in the package's module, which is swapped, for this fit
    only, for a clock that notes when the loop starts and ends. None when absent.
    """
    from .benchmark_baselines import run_baseline, sdv_missing

    if sdv_missing():
        return None
    import importlib

    module = importlib.import_module(f"ctgan.synthesizers.{family}")
    clock = _EpochClock()
    original = module.tqdm
    module.tqdm = clock
    try:
        fit = run_baseline(f"sdv_{family}", train, schema, len(train), seed, epochs).seconds
    finally:
        module.tqdm = original
    return fit, (clock.end - clock.start) / epochs


def run_throughput(opts: BenchmarkOptions, console: Console) -> Path:
    """Throughput, DP overhead, grad-sample modes and the package comparison."""
    torch.set_num_threads(1)
    seed = opts.seed
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work-throughput"
    data = prepare_seed(replace(opts, keep_work=False), seed, work)
    train = data.train.drop(columns="site")
    encoded = None
    epochs = 10 if opts.quick else 30
    repeats = 3 if opts.quick else 7
    through: list[dict[str, Any]] = []
    modes: list[dict[str, Any]] = []
    start = time.perf_counter()
    for g in opts.generators:
        model = get_generator(g)(data.schema, seed=seed, **opts.generator_params.get(g, {}))
        encoded = model.encoder.encode(train)
        rows_per_second(copy.deepcopy(model), encoded, True, 1, 1.0, seed)  # warm-up
        rows_per_second(copy.deepcopy(model), encoded, False, 1, 1.0, seed)
        for q in (1.0, 0.1):
            plain = rows_per_second(copy.deepcopy(model), encoded, False, epochs, q, seed)
            private = rows_per_second(copy.deepcopy(model), encoded, True, epochs, q, seed)
            through.append({"generator": g, "sample_rate": q, "rows": len(encoded),
                            "rows_per_s_no_dp": plain, "rows_per_s_dp": private,
                            "dp_slowdown": plain / private})
            console.print(f"{g} q={q}: {plain:,.0f} rows/s without DP, {private:,.0f} with "
                          f"DP ({plain / private:.1f}x)")
        modes += grad_sample_modes(model, encoded, repeats, seed)
    compare: list[dict[str, Any]] = []
    q = min(1.0, PACKAGE_BATCH / len(train))
    pkg_epochs = 100 if opts.quick else 300
    for family in ("ctgan", "tvae"):
        if family not in opts.generators:
            continue
        model = get_generator(family)(data.schema, seed=seed)
        with measured() as m:
            model.fit(train, epochs=pkg_epochs, sample_rate=q)
        ours = m.seconds / pkg_epochs
        measured_pkg = package_epoch_seconds(family, train, data.schema, pkg_epochs, seed)
        fit_s, theirs = measured_pkg if measured_pkg else (None, None)
        compare.append({"family": family, "rows": len(train), "batch": PACKAGE_BATCH,
                        "epochs": pkg_epochs, "fedsynth_s_per_epoch": ours,
                        "package_s_per_epoch": theirs,
                        "package_fit_s_incl_transformer": fit_s})
        console.print(f"{family}: fedsynth {ours:.3f} s/epoch, ctgan package "
                      f"{'absent' if theirs is None else f'{theirs:.3f} s/epoch'}")
    info = {"command": opts.command, "seconds_total": time.perf_counter() - start,
            "machine": machine(), "epochs": epochs, "dataset": opts.dataset}
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return _write_throughput(out, through, modes, compare, info)


def _table(rows: list[dict[str, Any]], keys: list[str]) -> list[str]:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "-" if v is None else str(v)

    return ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|",
            *("| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows)]


def _write_throughput(out: Path, through: list, modes: list, compare: list, info: dict
                      ) -> Path:
    for name, rows in (("throughput", through), ("grad_sample_modes", modes),
                       ("package_comparison", compare)):
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            with (out / f"{name}.csv").open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)
    exact = [m for m in modes if m.get("ok") and m.get("exact")]
    fastest = {}
    for m in exact:
        best = fastest.get(m["generator"])
        if best is None or m["seconds_per_step"] < best["seconds_per_step"]:
            fastest[m["generator"]] = m
    lines = [
        "# fedsynth benchmark: throughput and DP overhead", "",
        f"Command: `{info['command']}`; {info['seconds_total']:.0f} s; machine "
        f"{json.dumps(info['machine'])} (shared with other jobs: timings are pessimistic).",
        "", f"## Rows per second through the trainer ({info['dataset']}, pooled training "
        f"rows, {info['epochs']} epochs, DP-SGD noise 1.0, clip 1.0)", "",
        *_table(through, ["generator", "sample_rate", "rows", "rows_per_s_no_dp",
                          "rows_per_s_dp", "dp_slowdown"]),
        "", "## Opacus per-sample-gradient modes (one clipped step, whole table as the batch)",
        "", "`exact`: the clipped gradient sum equals `hooks` (the trainer's mode) within "
        f"{EXACT_TOLERANCE:g} relative.", "",
        *_table(modes, ["generator", "mode", "ok", "seconds_per_step", "slowdown_vs_no_dp",
                        "max_relative_error_vs_hooks", "exact", "note"]),
        "", "Fastest exact mode per generator: " + (", ".join(
            f"{g} {m['mode']} ({m['seconds_per_step']:.4f} s/step)" for g, m in fastest.items())
            or "none measured") + ".",
        "", "## Seconds per epoch, fedsynth vs the ctgan package (no DP, batch 500)", "",
        "The package's per-epoch time is its epoch loop alone (its data transformer, fitted "
        "once before the first epoch, is in the whole fit, last column). fedsynth's encoder "
        "comes from the schema and needs no fitting. An epoch is one pass over the rows: "
        "the package takes len // 500 = 1 step of 500 rows, fedsynth Poisson batches at "
        "q = 500 / rows.", "",
        *_table(compare, ["family", "rows", "batch", "epochs", "fedsynth_s_per_epoch",
                          "package_s_per_epoch", "package_fit_s_incl_transformer"]), "",
    ]
    path = out / "throughput.md"
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------- scale


def run_scale(opts: BenchmarkOptions, dataset: str, counts: tuple[int, ...], console: Console
              ) -> Path:
    """A federated DP study per site count: time per round, peak RSS, bytes per round."""
    torch.set_num_threads(1)
    import logging
    import shutil

    logging.getLogger("flwr").setLevel(logging.ERROR)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    alpha = opts.dirichlet_alpha or 1.0
    rounds = 2
    epochs = 2 if opts.quick else 5
    generator = opts.generators[0]
    for n in counts:
        scale_opts = replace(opts, dataset=dataset, dirichlet_alpha=alpha, dirichlet_sites=n,
                             rounds=rounds, local_epochs=epochs)
        work = out / f"work-scale-{n}"
        shutil.rmtree(work, ignore_errors=True)
        data = prepare_seed(scale_opts, opts.seed, work)
        setting = Setting("federated", generator, dp=True, epsilon=3.0)
        with measured() as m:
            produced = run_federated(scale_opts, setting, data, opts.seed, work / "study")
        sizes = [len(data.site_train(s.name)) for s in data.sites]
        rows.append({
            "sites": len(data.sites), "requested_sites": n, "rows": sum(sizes),
            "min_site_rows": min(sizes), "max_site_rows": max(sizes), "rounds": rounds,
            "local_epochs": epochs, "wall_s": m.seconds,
            "seconds_per_round": produced.seconds_per_round,
            "seconds_federated": read_timings(work / "study")[SECONDS_FEDERATED],
            "peak_rss_mb": m.peak_mb, "bytes_per_round": produced.bytes_per_round,
            "max_epsilon": max(e for e in produced.epsilon_sites.values() if e is not None),
        })
        console.print(f"{n} sites: {rows[-1]['seconds_per_round']:.1f} s/round, peak RSS "
                      f"{m.peak_mb:.0f} MB, {produced.bytes_per_round / 2**20:.1f} MiB/round")
        shutil.rmtree(work, ignore_errors=True)
    keys = list(rows[0])
    with (out / "scale.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# fedsynth benchmark: scale", "",
        f"Command: `{opts.command}`; machine {json.dumps(machine())} (shared: timings are "
        "pessimistic).", "",
        f"{dataset} pooled and re-split by Dirichlet(alpha {alpha:g}) label shares into the "
        f"site counts below (sites left with fewer than 2 rows are dropped); generator "
        f"{generator}, DP epsilon 3 per site, {rounds} rounds x {epochs} local epochs, in "
        "process (sites train one after another).", "",
        *_table(rows, keys), "",
    ]
    lines.append(f"![scale]({_scale_plot(rows, out)})")
    path = out / "scale.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _scale_plot(rows: list[dict[str, Any]], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = [r["sites"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key, title in zip(
        axes, ("seconds_per_round", "peak_rss_mb", "bytes_per_round"),
        ("wall s per round", "peak RSS (MB)", "bytes per round"), strict=True,
    ):
        ax.plot(sites, [r[key] for r in rows], marker="o")
        ax.set_xlabel("sites")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=110)
    plt.close(fig)
    return "scale.png"
