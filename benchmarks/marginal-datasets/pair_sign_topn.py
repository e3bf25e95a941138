"""Expected co-occurrence sign agreement when the model reads only the N pairs furthest
from independence (issue 13, fourth pass): why every released pair is read.

Reading fewer pairs would make a study faster (a model holding ~200 gene pairs takes
about 40 s more to fit and sample than one without), but the significant pairs with a
modest excess often rank below many noise-only pairs. Same noise model and split as
`pair_sign_mc.py` (18 sites at epsilon 3, pair bound 3, pair share 0.25, code
histogram bound 3 share 0.35, the 24 most frequent genes' 276 pairs), 1,000 draws.

Usage: python pair_sign_topn.py
"""

import math
import warnings
from pathlib import Path

import numpy as np

warnings.simplefilter("ignore")
HERE = Path(__file__).resolve().parent
SOURCE = (HERE / "pair_sign_mc.py").read_text().split("\nfor seed in (0, 1, 2):")[0]
shared: dict = {}
exec(compile(SOURCE, "pair_sign_mc.py", "exec"), shared)  # its significant() and weights

for seed in (0, 1, 2):
    t, sig = shared["significant"](seed)
    n, ones = len(t), t.sum(axis=0).astype(float)
    top = np.argsort(-ones)[:24]
    pairs = [(a, b) for i, a in enumerate(top) for b in top[i + 1:]]
    w = shared["pair_weights"](t[:, top].sum(axis=1), 3)
    both = np.array([np.sum(w * t[:, a] * t[:, b]) for a, b in pairs])
    sd_p = math.sqrt(18 * 3 / (0.449 * 0.25))
    sd_c = math.sqrt(18 * 3 / (0.449 * 0.35))
    where = {frozenset(p): k for k, p in enumerate(pairs)}
    rng = np.random.default_rng(0)
    found: dict[int, list[float]] = {k: [] for k in (32, 64, 96, 128, len(pairs))}
    for _ in range(1000):
        counts = np.maximum(ones + rng.normal(0, sd_c, len(ones)), 0)
        expected = np.array([counts[a] * counts[b] for a, b in pairs]) / n
        z = (both + rng.normal(0, sd_p, len(pairs)) - expected) / sd_p
        rank = np.argsort(np.argsort(-np.abs(z)))
        for cap, out in found.items():
            good = 0.0
            for (a, b), sign in sig:
                k = where.get(frozenset((a, b)))
                good += 0.5 if k is None or rank[k] >= cap else float(np.sign(z[k]) == sign)
            out.append(good / len(sig))
    print(seed, {cap: round(float(np.mean(v)), 3) for cap, v in found.items()}, flush=True)
