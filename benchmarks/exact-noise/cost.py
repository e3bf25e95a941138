"""What OpenDP's exact release sampler costs a study, against numpy's draw, in one run.

Runs the heart-disease marginal study at epsilon 3 with the generator's defaults
(three sites, in clear, the real ServerApp and ClientApp in this process, secret
noise) and the default study (``fedsynth simulate``), alternating the release
sampler between OpenDP (what a site now runs) and numpy's ``normal`` (the draw of
earlier versions, patched in for this measurement only), ``--repeats`` times each.
Records the study's wall time, the time spent drawing release noise (inside
``ReleaseNoise.add``) and the number of noisy values. Also times a DP-SGD-sized
draw: 10^5 values by Opacus-style ``secure_gaussian`` and by OpenDP's float sampler.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/exact-noise/cost.py --repeats 3
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from fedsynth.common.privacy import release_noise
from fedsynth.common.privacy.release_noise import ReleaseNoise

HERE = Path(__file__).resolve().parent
SITES = ("cleveland", "hungarian", "switzerland")
_ADD = ReleaseNoise.add


def _study(tmp: Path) -> None:
    from fedsynth.client.app import make_client_app
    from fedsynth.common.study import StudyConfig
    from fedsynth.server.app import resolve_schema, run_study
    from fedsynth.simulations.benchmark_inprocess import InProcessGrid, coordinator_identity
    from fedsynth.simulations.simulate import SimulationOptions, prepare_sites

    study = StudyConfig(generator="marginal", min_sites=3, output_dir=str(tmp / "study"),
                        n_synthetic=300, study_id="exact-noise-cost")
    opts = SimulationOptions(sites=SITES, epsilon=3.0, study=study)
    sites, _, _ = prepare_sites(opts, tmp)
    grid = InProcessGrid(make_client_app(sites), len(sites), study.to_flat())
    with coordinator_identity(grid.run.run_id):
        run_study(grid, study, resolve_schema("heart_disease"))


def _deep(tmp: Path) -> None:
    """The default study (`fedsynth simulate`: heart disease, its default generator,
    four sites, DP): count, grid and loss-report releases."""
    from fedsynth.cli import main

    try:
        main(["simulate", "--out", str(tmp / "deep"), "--force"])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise


def _one(sampler: str, study: str) -> dict[str, float]:
    spent = {"seconds": 0.0, "values": 0}

    def timed(self, values, std, *, integral):
        if sampler == "numpy":  # the earlier draw, for comparison only
            self = ReleaseNoise(self.rng, exact=False)
        start = time.perf_counter()
        out = _ADD(self, values, std, integral=integral)
        spent["seconds"] += time.perf_counter() - start
        spent["values"] += int(np.size(values))
        return out

    release_noise.ReleaseNoise.add = timed
    try:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            (_study if study == "marginal" else _deep)(Path(tmp))
            wall = time.perf_counter() - start
    finally:
        release_noise.ReleaseNoise.add = _ADD
    return {"study": study, "sampler": sampler, "study_seconds": wall,
            "noise_seconds": spent["seconds"], "noisy_values": spent["values"]}


def _dpsgd_sized(n: int = 100_000) -> dict[str, float]:
    import torch

    from fedsynth.common.privacy.secure_noise import secure_gaussian

    gen = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    secure_gaussian(1.0, n, gen)
    opacus = time.perf_counter() - start
    start = time.perf_counter()
    release_noise.exact_gaussian(1.0, False)(np.zeros(n).tolist())
    opendp = time.perf_counter() - start
    return {"values": n, "secure_gaussian_seconds": opacus, "opendp_float_seconds": opendp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for _ in range(args.repeats):
        for study in ("marginal", "deep"):
            for sampler in ("numpy", "opendp"):
                rows.append(_one(sampler, study))
                print(rows[-1], flush=True)
    with open(HERE / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    sgd = _dpsgd_sized()
    lines = [
        "# Cost of the exact release sampler (OpenDP) against numpy's draw",
        "",
        "Secret noise, the real ServerApp and ClientApp in this process; the two samplers "
        f"alternated in one run, {args.repeats} studies each; medians. *marginal*: heart "
        "disease, the marginal generator's defaults, epsilon 3, three sites in clear. "
        "*deep*: the default study (`fedsynth simulate`: heart disease, four sites; its "
        "count, quantile-grid and loss-report releases).",
        "",
        "| study | sampler | study wall s (median, min-max) | release-noise s | noisy values "
        "| noise share of wall |",
        "|---|---|---|---|---|---|",
    ]
    ratios = []
    for study in ("marginal", "deep"):
        med = {}
        for s in ("numpy", "opendp"):
            mine = [r for r in rows if r["study"] == study and r["sampler"] == s]
            med[s] = {k: statistics.median(r[k] for r in mine)
                      for k in ("study_seconds", "noise_seconds", "noisy_values")}
            lo, hi = (f(r["study_seconds"] for r in mine) for f in (min, max))
            lines.append(f"| {study} | {s} | {med[s]['study_seconds']:.1f} ({lo:.1f}-{hi:.1f}) "
                         f"| {med[s]['noise_seconds']:.3f} | {int(med[s]['noisy_values'])} "
                         f"| {100 * med[s]['noise_seconds'] / med[s]['study_seconds']:.2f}% |")
        ratio = med["opendp"]["study_seconds"] / med["numpy"]["study_seconds"]
        ratios.append(f"{study}: {ratio:.3f}")
    print(lines, sgd)
    lines += [
        "",
        f"Study wall-time ratio OpenDP / numpy (medians): {'; '.join(ratios)}. The noise "
        "share of the wall time is the cost; the ratios are within the studies' "
        "run-to-run spread on this shared machine (the noise also changes which "
        "marginals a study selects).",
        "",
        f"DP-SGD-sized draw ({sgd['values']} values, one step of a ~1e5-parameter network): "
        f"secure_gaussian (Opacus' hardening) {sgd['secure_gaussian_seconds'] * 1e3:.1f} ms, "
        f"OpenDP float sampler {sgd['opendp_float_seconds']:.2f} s "
        f"({sgd['opendp_float_seconds'] / sgd['secure_gaussian_seconds']:.0f}x).",
        "",
        "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/exact-noise/cost.py "
        f"--repeats {args.repeats}` (2 shared cores; compare ratios, not absolute times).",
        "",
    ]
    (HERE / "results.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
