"""Medians and paired differences of fed_vs_emulation.py / score_split.py output.

Usage: python table.py FILE.jsonl A B METRIC [METRIC ...]   (A, B: arm prefixes)
Prints n, each arm's median, the median of per-seed differences A-B, the mean
difference with its standard error, and the Wilcoxon signed-rank p-value.
"""

import json
import sys

import numpy as np
from scipy.stats import wilcoxon

path, a, b, *metrics = sys.argv[1:]
with open(path) as f:
    rows = [json.loads(line) for line in f if line.startswith("{")]
for m in metrics:
    pairs = [(r[f"{a}_{m}"], r[f"{b}_{m}"]) for r in rows
             if f"{a}_{m}" in r and f"{b}_{m}" in r]
    x, y = np.array(pairs).T
    d = x - y
    p = wilcoxon(d).pvalue if np.any(d != 0) else 1.0
    print(f"{path.split('/')[-1]} {m}: n={len(d)} {a} {np.median(x):.3f} {b} {np.median(y):.3f}"
          f" | median diff {np.median(d):+.3f}, mean diff {d.mean():+.3f}"
          f" +- {d.std(ddof=1) / np.sqrt(len(d)):.3f} (SE), Wilcoxon p {p:.2f}")
