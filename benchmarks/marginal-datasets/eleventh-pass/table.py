"""Median Cox C-index per (epsilon, hyperparameters), and the mean paired difference
(seed by seed) against the default at the same epsilon, +- its standard error.

    python benchmarks/marginal-datasets/eleventh-pass/table.py
"""

import collections
import json
import statistics as st
from pathlib import Path

here = Path(__file__).parent
runs: dict[tuple[float, str], dict[int, float]] = collections.defaultdict(dict)
for name in ("rounds.jsonl", "rounds-eps.jsonl"):
    for line in (here / name).read_text().splitlines():
        r = json.loads(line)
        runs[(r["epsilon"], json.dumps(r["params"]))][r["seed"]] = r["cox_c_index"]
print("| central epsilon | hyperparameters | seeds | median C-index | paired difference |")
print("|---|---|---|---|---|")
for (eps, params), by_seed in sorted(runs.items()):
    base = runs[(eps, "{}")]
    diffs = [c - base[s] for s, c in by_seed.items() if s in base]
    se = st.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 and any(diffs) else 0.0
    print(f"| {eps:g} | `{params}` | {len(by_seed)} | {st.median(by_seed.values()):.3f} | "
          f"{st.mean(diffs):+.3f} +- {se:.3f} |")
