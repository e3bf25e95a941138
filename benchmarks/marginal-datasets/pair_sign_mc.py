"""Expected co-occurrence sign agreement of AMLSG's significant gene pairs under the pair
release, by Monte Carlo of the noise alone (issue 13, fourth pass).

The metric (`codeset_sign_agreement`) asks, for each pair significant in the real
holdout, whether the synthetic table's log odds ratio has the same sign. A pair the model
reads gets the sign of its noisy distance from independence (z: weighted pair count less
the noisy genes' counts' product over n, over the pair noise std); a pair it does not read
is independent in the model, its sign in a sample a coin flip. This draws 18 sites' summed
noise (epsilon 3 per site, delta 1e-5, rdp: 2 rho = 0.449 a site) 2,000 times for each
pair bound, pair share and reading threshold (`code_pairs.MIN_Z`), on the training rows
of `fedsynth benchmark`'s split, seeds 0-2. It ignores the junction-tree cap and the
model's fit, so it ranks settings rather than predicting the benchmark.

Usage: python pair_sign_mc.py
"""

import math
import warnings
from pathlib import Path

import numpy as np

from fedsynth.common.generators.marginal.code_pairs import pair_weights
from fedsynth.common.validation.codesets import PairStats, code_matrix, select_codes
from fedsynth.common.validation.data import Table
from fedsynth.simulations.benchmark import BenchmarkOptions, prepare_seed

warnings.simplefilter("ignore")
RHO2 = 0.449  # 2 rho of one site at epsilon 3, delta 1e-5 (rdp)
SITES, CODE_BOUND, CODES_SHARE, TOP, DRAWS = 18, 3, 0.35, 24, 2000


def significant(seed: int) -> tuple[np.ndarray, list[tuple[tuple[int, int], float]]]:
    """The training code matrix and the holdout's significant pairs with their sign."""
    d = prepare_seed(BenchmarkOptions(dataset="amlsg"), seed, Path(f"/tmp/m13/amlsg{seed}"))
    s = d.schema
    cols = list(s.codesets.values())[0]
    train, hold = d.train.drop(columns="site"), d.holdout.drop(columns="site")
    h = code_matrix(Table.from_frame(hold, s), s, cols)
    t = code_matrix(Table.from_frame(train, s), s, cols)
    chosen = select_codes(h)
    pairs = [(a, b) for i, a in enumerate(chosen) for b in chosen[i + 1:]]
    st = PairStats.of(h, pairs)
    return t, [(pairs[k], float(np.sign(st.lor[k]))) for k in np.flatnonzero(st.significant)]


def expected(t: np.ndarray, sig: list, bound: int, share: float, min_z: float,
             rng: np.random.Generator) -> list[float]:
    n, ones = len(t), t.sum(axis=0).astype(float)
    top = set(np.argsort(-ones)[:TOP].tolist())
    w = pair_weights(t[:, sorted(top)].sum(axis=1), bound)
    sd_p = math.sqrt(SITES * math.comb(bound, 2) / (RHO2 * share))
    sd_c = math.sqrt(SITES * CODE_BOUND / (RHO2 * CODES_SHARE))
    out = []
    for _ in range(DRAWS):
        good = 0.0
        for (a, b), sign in sig:
            if a not in top or b not in top:
                good += 0.5
                continue
            both = float(np.sum(w * t[:, a] * t[:, b])) + rng.normal(0, sd_p)
            na, nb = ones[a] + rng.normal(0, sd_c), ones[b] + rng.normal(0, sd_c)
            z = (both - max(na, 0) * max(nb, 0) / n) / sd_p
            good += 0.5 if abs(z) < min_z else float(np.sign(z) == sign)
        out.append(good / len(sig))
    return out


for seed in (0, 1, 2):
    t, sig = significant(seed)
    rng = np.random.default_rng(0)
    for bound in (2, 3, 4):
        for share in (0.25, 0.35):
            for min_z in (0.0, 1.0):
                acc = expected(t, sig, bound, share, min_z, rng)
                print(seed, f"pair_bound {bound} pairs_share {share} MIN_Z {min_z}: "
                      f"mean {np.mean(acc):.3f} median {np.median(acc):.3f}", flush=True)
