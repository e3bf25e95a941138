"""Where users wait, measured as ratios within one run (issue 16; docs/benchmark.md).

Run it as a script so that ``PYTHONPATH`` decides which fedsynth it measures (the
checkout's or an older copy's), and the two can be compared in one session::

    OMP_NUM_THREADS=1 python simulations/benchmark_speed.py modes
    OMP_NUM_THREADS=1 python simulations/benchmark_speed.py noise
    python simulations/benchmark_speed.py threads
    python simulations/benchmark_speed.py validation --study-dir OUT
    python simulations/benchmark_speed.py drill --study-dir OUT

- ``modes``: seconds per DP-SGD step in each clipping mode (``trainer.MODES``: hooks,
  ghost, and book-keeping where the tree has it) and per no-DP step, through the
  trainer, for tvae, ctgan and ddpm (default sizes) on the pooled rows of heart and
  the MIMIC-III demo, at q = 1 (5 steps a round) and 0.1 (20 steps); wall time
  (``*_over_plain``) and the thread's CPU time (``*_cpu_over_plain``, which a shared
  machine's preemption does not inflate); the mode ``trainer.pick_mode`` takes, and
  the CPU seconds of the step's secure-mode noise alone (``noise_cpu_s``).
- ``noise``: CPU nanoseconds per value of the secure-mode noise and of the other ways
  to draw Gaussians on this machine (where the noise's time goes).
- ``threads``: one site's round of the default study (``client.site.train_site``)
  with 2 torch threads and with 1.
- ``validation``: ``validate_and_report`` of a finished ``fedsynth simulate`` study.
- ``drill``: the deployment drill of docs/deployment.md (heart's cleveland, hungarian
  and va, 2 rounds, TVAE ``{"hidden":16,"latent":4}``) deployed on loopback
  (``python -m fedsynth.simulations.deploy``: TLS, SuperLink, a SuperNode per site
  with its ClientApp runtime, ``flwr run``) and the same study simulated (``fedsynth
  simulate``, its default in-process engine), alternating, each as a fresh command;
  federated seconds from each ``summary.json`` and the wall time of each command.

Each figure is the median of ``--repeats`` (3) runs, interleaved so that a change in
the machine's load hits every variant alike; the machine this was written on was
shared, so only ratios within one run are comparable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _median_times(variants: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds of each variant's callable (which returns its own seconds)."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            times[name].append(float(run()))
    return {k: statistics.median(v) for k, v in times.items()}


def modes(repeats: int, datasets: list[str], generators: list[str], rates: list[float],
          params: dict[str, dict[str, Any]] | None = None, site: str | None = None
          ) -> list[dict[str, Any]]:
    from fedsynth.common.encoding import TabularEncoder
    from fedsynth.common.generators import get_generator
    from fedsynth.common.privacy import DPSettings, PrivacyLedger, train_round
    from fedsynth.common.privacy.randomness import DPRandomness
    from fedsynth.common.privacy.trainer import (
        MODES,
        pick_mode,
        private_parameters,
        samples_per_step,
    )
    from fedsynth.simulations.datasets import load_site_frames

    rows = []
    for dataset in datasets:
        schema, frames = load_site_frames(dataset)
        rows_of = [frames[site]] if site else list(frames.values())
        data = TabularEncoder(schema).encode(
            __import__("pandas").concat(rows_of, ignore_index=True))
        for name in generators:
            for q in rates:
                epochs = 5 if q == 1.0 else 2  # 5 or 20 steps per timed round
                cpu: dict[str, list[float]] = {}

                def run(mode: str | None, q: float = q, epochs: int = epochs,
                        name: str = name, schema: Any = schema, data: Any = data,
                        cpu: dict[str, list[float]] = cpu) -> float:
                    model = get_generator(name)(schema, seed=0, **(params or {}).get(name, {}))
                    dp = DPSettings(1.0, 1.0) if mode else None
                    t0 = time.thread_time()
                    stats = train_round(
                        model, data, epochs=epochs, sample_rate=q, dp=dp,
                        ledger=PrivacyLedger() if mode else None,
                        randomness=DPRandomness.reproducible(0, "speed"),
                        **({"mode": mode} if mode else {}))
                    cpu.setdefault(mode or "plain", []).append(
                        (time.thread_time() - t0) / stats.steps)
                    return stats.seconds / stats.steps

                t = _median_times({"plain": lambda: run(None),
                                   **{m: (lambda m=m: run(m)) for m in MODES}}, repeats)
                c = {k: statistics.median(v) for k, v in cpu.items()}
                model = get_generator(name)(schema, seed=0, **(params or {}).get(name, {}))
                module = model.private_module()
                batch = samples_per_step(model, data.shape[1], max(1.0, q * len(data)))
                row = {"dataset": dataset, "site": site or "pooled", "generator": name, "q": q,
                       "params": (params or {}).get(name, {}), "rows": len(data),
                       "width": data.shape[1], "private_params": private_parameters(module),
                       "samples_per_step": batch,
                       "samples_x_params": batch * private_parameters(module),
                       "picked": pick_mode(module, batch),
                       "plain_s": t["plain"],
                       **{f"{m}_s": t[m] for m in MODES},
                       **{f"{m}_over_plain": t[m] / t["plain"] for m in MODES},
                       "plain_cpu_s": c["plain"],
                       **{f"{m}_cpu_over_plain": c[m] / c["plain"] for m in MODES}}
                row["picked_over_plain"] = row[f"{row['picked']}_over_plain"]
                row["picked_cpu_over_plain"] = row[f"{row['picked']}_cpu_over_plain"]
                row["noise_cpu_s"] = _noise_seconds(row["private_params"])
                row["noise_over_plain"] = row["noise_cpu_s"] / c["plain"]
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def _noise_seconds(params: int, calls: int = 20) -> float:
    """CPU seconds of one step's secure-mode noise alone (four Gaussians per
    parameter, drawn as the trainer draws them): the floor under a DP step that no
    clipping mode removes."""
    from fedsynth.common.privacy import secure_noise

    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(calls):
        t0 = time.thread_time()
        secure_noise.secure_gaussian(1.0, params, gen)
        times.append(time.thread_time() - t0)
    return statistics.median(times)


def noise(repeats: int, params: int = 333_931) -> dict[str, float]:
    """Where the secure-mode noise's time goes: CPU nanoseconds per value of each way to
    draw ``DRAWS x params`` Gaussians (MIMIC ddpm's 334k parameters by default).

    ``secure_gaussian`` (the four draws, summed and halved); torch's ``normal_``
    (Box-Muller on Mersenne Twister uniforms) and its uniform draw alone; numpy's
    PCG64 uniforms and its ziggurat normals; and Box-Muller written with torch
    operations on PCG64 uniforms (a faster generator, same transform).
    """
    import math

    from fedsynth.common.privacy.secure_noise import DRAWS, secure_gaussian

    n = DRAWS * params
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    buf = torch.empty(n)

    def box_muller() -> torch.Tensor:
        u = torch.from_numpy(rng.random((2, n // 2), dtype=np.float32))
        radius = u[0].neg_().log1p_().mul_(-2.0).sqrt_()
        theta = u[1].mul_(2.0 * math.pi)
        cos = torch.cos(theta)
        return torch.cat([radius * cos, theta.sin_().mul_(radius)])

    ways = {
        "secure_gaussian": lambda: secure_gaussian(1.0, params, gen),
        "torch normal_": lambda: buf.normal_(0.0, 1.0, generator=gen),
        "torch uniform_ (its uniforms alone)": lambda: buf.uniform_(0.0, 1.0, generator=gen),
        "numpy PCG64 uniforms (float32)": lambda: rng.random(n, dtype=np.float32),
        "numpy PCG64 ziggurat normals (float32)": lambda: rng.standard_normal(n, dtype=np.float32),
        "Box-Muller in torch ops on PCG64 uniforms": box_muller,
    }
    out = {}
    for name, draw in ways.items():
        draw()
        times = []
        for _ in range(max(repeats, 5)):
            t0 = time.thread_time()
            draw()
            times.append(time.thread_time() - t0)
        out[name] = 1e9 * statistics.median(times) / n
        print(json.dumps({"way": name, "ns_per_value": out[name]}), flush=True)
    return out


def threads(repeats: int, dataset: str) -> dict[str, float]:
    """One site's round of the default study with 2 and with 1 torch threads."""
    import tempfile

    from fedsynth.client.site import SiteState, train_site
    from fedsynth.common.generators import get_generator
    from fedsynth.common.schema import Schema
    from fedsynth.common.study import StudyConfig, schema_fingerprint
    from fedsynth.simulations.simulate import SimulationOptions, prepare_sites

    tmp = Path(tempfile.mkdtemp(prefix="speed-threads-"))
    study = StudyConfig()
    sites, _, _ = prepare_sites(SimulationOptions(dataset=dataset, study=study), tmp)
    site = sites[0]
    schema = Schema.load(site.schema_path)
    start = get_generator(study.generator)(schema, seed=study.seed).state_dict()

    def round_with(n: int) -> float:
        torch.set_num_threads(n)
        t0 = time.perf_counter()
        reply = train_site(site, study, schema_fingerprint(schema), start, SiteState(), 1)
        assert reply.status == "trained", reply.problems
        return time.perf_counter() - t0

    round_with(1)  # the table is read and encoded once per process: not timed
    t = _median_times({"2 threads": lambda: round_with(2), "1 thread": lambda: round_with(1)},
                      repeats)
    t["ratio"] = t["2 threads"] / t["1 thread"]
    return t


def validation(repeats: int, study_dir: Path, dataset: str) -> dict[str, float]:
    """``validate_and_report`` of the study in ``study_dir`` (as ``simulate`` calls it)."""
    from dataclasses import replace

    from fedsynth.common.schema import Schema
    from fedsynth.common.study import StudyConfig
    from fedsynth.common.table import read_table
    from fedsynth.simulations.datasets import bundled_schema_path
    from fedsynth.simulations.simulate import (
        SimulationOptions,
        prepare_sites,
        validate_and_report,
    )

    summary = json.loads((study_dir / "summary.json").read_text())
    seed = int(summary["study"]["seed"])
    out = study_dir / "speed-validation"
    _, train, hold = prepare_sites(
        SimulationOptions(dataset=dataset, study=StudyConfig(seed=seed)), out)
    schema = Schema.load(bundled_schema_path(dataset))
    synthetic = read_table(study_dir / "synthetic.csv", replace(schema, header=True))

    def once() -> float:
        t0 = time.perf_counter()
        validate_and_report(train.drop(columns="site"), hold.drop(columns="site"), synthetic,
                            schema, out, summary)
        return time.perf_counter() - t0

    return _median_times({"validation+report": once}, repeats)


DRILL = ["--sites", "cleveland,hungarian,va", "--rounds", "2",
         "--generator-params", '{"hidden":16,"latent":4}']


def drill(repeats: int, out: Path) -> dict[str, Any]:
    """The deployment drill, deployed and simulated, ``repeats`` times each, alternating."""
    import os
    import shutil
    import subprocess
    import sys

    from fedsynth.server.app import SECONDS_FEDERATED, read_timings

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = {
        "simulated": [str(bin_dir / "fedsynth"), "simulate", *DRILL, "--force", "--out"],
        "deployed": [sys.executable, "-m", "fedsynth.simulations.deploy", *DRILL, "--out"],
    }
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in commands}
    for i in range(repeats):
        for kind, cmd in commands.items():
            folder = out / f"{kind}-{i}"
            shutil.rmtree(folder, ignore_errors=True)
            t0 = time.perf_counter()
            done = subprocess.run([*cmd, str(folder)], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            (out / f"{kind}-{i}.log").write_text(done.stdout + done.stderr)
            if done.returncode != 0:
                raise SystemExit(f"{kind} run {i} failed; see {out / f'{kind}-{i}.log'}")
            found = next(folder.rglob("summary.json"))
            summary = json.loads(found.read_text())
            eps = [s["epsilon"] for s in summary["sites"].values()]
            # the timing is not in the publishable summary: beside it (server/app.py)
            federated = read_timings(found.parent)[SECONDS_FEDERATED]
            row = {"federated_s": federated, "command_s": wall,
                   "epsilon_max": max(eps)}
            print(json.dumps({"run": kind, "i": i, **row}), flush=True)
            runs[kind].append(row)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    return {"runs": runs, "median": med,
            "deployed_over_simulated_federated":
                med["deployed"]["federated_s"] / med["simulated"]["federated_s"],
            "deployed_over_simulated_command":
                med["deployed"]["command_s"] / med["simulated"]["command_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("modes", "noise", "threads", "validation", "drill"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--datasets", default="heart_disease,mimic3_demo")
    ap.add_argument("--generators", default="tvae,ctgan,ddpm")
    ap.add_argument("--rates", default="1.0,0.1")
    ap.add_argument("--generator-params", type=json.loads, default=None,
                    help='modes: JSON of hyperparameters per generator, e.g. '
                         '\'{"tvae": {"hidden": 16, "latent": 4}}\' (default sizes otherwise)')
    ap.add_argument("--site", help="modes: one site's rows instead of the pooled table")
    ap.add_argument("--study-dir", type=Path)
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    if args.what != "threads":
        torch.set_num_threads(1)
    np.set_printoptions(precision=3)
    if args.what == "modes":
        result: Any = modes(args.repeats, args.datasets.split(","), args.generators.split(","),
                            [float(r) for r in args.rates.split(",")], args.generator_params,
                            args.site)
    elif args.what == "noise":
        result = noise(args.repeats)
    elif args.what == "drill":
        if args.study_dir is None:
            ap.error("drill needs --study-dir (a folder for the runs' outputs)")
        args.study_dir.mkdir(parents=True, exist_ok=True)
        result = drill(args.repeats, args.study_dir)
    elif args.what == "threads":
        result = threads(args.repeats, args.datasets.split(",")[0])
    else:
        if args.study_dir is None:
            ap.error("validation needs --study-dir (a finished fedsynth simulate output)")
        result = validation(args.repeats, args.study_dir, args.datasets.split(",")[0])
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
