"""What OpenDP's exact release sampler costs a study, against numpy's draw, in one run.

Runs the heart-disease marginal study at epsilon 3 with the generator's defaults
(three sites, in clear, the real ServerApp and ClientApp in this process, secret
noise), alternating the release sampler between OpenDP (what a site now runs) and
numpy's ``normal`` (the draw of earlier versions, patched in for this measurement
only), ``--repeats`` times each. Records the study's wall time, the time spent drawing
release noise (inside ``ReleaseNoise.add``) and the number of noisy values.
Also times DP-SGD-sized draws: 10^5 values by Opacus-style ``secure_gaussian`` and by
OpenDP's float sampler.

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


def _one(sampler: str) -> dict[str, float]:
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
            _study(Path(tmp))
            wall = time.perf_counter() - start
    finally:
        release_noise.ReleaseNoise.add = _ADD
    return {"sampler": sampler, "study_seconds": wall, "noise_seconds": spent["seconds"],
            "noisy_values": spent["values"]}


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
        for sampler in ("numpy", "opendp"):
            rows.append(_one(sampler))
            print(rows[-1], flush=True)
    with open(HERE / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    med = {s: {k: statistics.median(r[k] for r in rows if r["sampler"] == s)
               for k in ("study_seconds", "noise_seconds", "noisy_values")}
           for s in ("numpy", "opendp")}
    sgd = _dpsgd_sized()
    spread = {s: (min(r["study_seconds"] for r in rows if r["sampler"] == s),
                  max(r["study_seconds"] for r in rows if r["sampler"] == s))
              for s in ("numpy", "opendp")}
    share = 100 * med["opendp"]["noise_seconds"] / med["opendp"]["study_seconds"]
    per_value = {s: 1e6 * m["noise_seconds"] / max(m["noisy_values"], 1) for s, m in med.items()}
    print(med, sgd)
    lines = [
        "# Cost of the exact release sampler (OpenDP) against numpy's draw",
        "",
        "Heart disease, marginal generator with its defaults, epsilon 3, three sites in "
        "clear, in-process (real ServerApp and ClientApp), secret noise; the two samplers "
        f"alternated in one run, {args.repeats} studies each; medians.",
        "",
        "| sampler | study wall s (median, min-max) | release-noise s | noisy values |",
        "|---|---|---|---|",
        *(f"| {s} | {m['study_seconds']:.1f} ({spread[s][0]:.1f}-{spread[s][1]:.1f}) | "
          f"{m['noise_seconds']:.3f} | {int(m['noisy_values'])} |" for s, m in med.items()),
        "",
        f"The release noise is {share:.2f}% "
        "of an OpenDP study's wall time: the wall-time ratio below is within the studies' "
        "run-to-run spread on this shared machine.",
        "",
        f"Study wall-time ratio OpenDP / numpy: "
        f"{med['opendp']['study_seconds'] / med['numpy']['study_seconds']:.3f}; "
        f"release-noise time per value: OpenDP {per_value['opendp']:.1f} us, "
        f"numpy {per_value['numpy']:.2f} us.",
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
