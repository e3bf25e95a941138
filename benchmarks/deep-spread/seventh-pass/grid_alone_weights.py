"""Grid alone (no training): what weighting a column's coarse counts in the grid release
would do to each heart column's std ratio (seventh pass; not adopted, see results.md).

A column without a heap histogram (cholesterol) released its coarse counts times ``w``;
the release's sensitivity is then sqrt(8 + w^2) on heart disease (4 heap columns
moving 2 cells each, cholesterol w), the heap columns' noise grows by that factor over
3 and cholesterol's shrinks to it over w. Simulated noise on the benchmark's real
training rows (seeds 0-2), a perfect generator decoded through the grid
(``tail_limits.py``'s rule "now"); 600 draws per weight. Prints, per column, the noise
std per summed cell, the 5th / 50th / 95th percentile of the std ratio and the share
of 3-draw medians outside [0.8, 1.25].

    python benchmarks/deep-spread/seventh-pass/grid_alone_weights.py
"""
import sys
from pathlib import Path

sys.argv = [sys.argv[0], "1", "0.5", "now"]  # tail_limits: 1 draw of its own, share 0.5
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tail_limits as T  # noqa: E402

from fedsynth.common import dp_histogram as dh  # noqa: E402

per_unit = T.NOISE / 3.0  # multiplier x sqrt(4 sites): today's noise is per_unit x 3
rng, u = np.random.default_rng(7), np.random.default_rng(1).uniform(0, 1, 20000)
DRAWS = 600
for w in (1.0, 1.414, 2.0, 2.5):
    sens = np.sqrt(8 + w * w)
    out = []
    for col in T.COLUMNS:
        noise = per_unit * sens / (w if col == "chol" else 1.0)
        T.NOISE = noise
        r = []
        for d in range(DRAWS):
            train = T.trains[d % 3]
            v = pd.to_numeric(train[col], errors="coerce").to_numpy(float)
            v = v[np.isfinite(v)]
            c = T.schema.column(col)
            lo, hi = float(c.min), float(c.max)
            noisy = dh.histogram(v, lo, hi) + rng.normal(0, noise, 32)
            mass, *_ = T.support(noisy, 1.0)
            dd, _ = T.decoded(mass, lo, hi, False, u)
            r.append(dd.std() / v.std())
        r = np.array(r)
        m3 = np.median(r.reshape(-1, 3), axis=1)
        out.append(f"{col} {noise:.1f} {np.percentile(r, 5):.2f}/{np.median(r):.2f}/"
                   f"{np.percentile(r, 95):.2f} P={np.mean((m3 < 0.8) | (m3 > 1.25)):.3f}")
    print(f"w={w}: " + " | ".join(out), flush=True)
