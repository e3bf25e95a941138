"""Every per-seed figure of this folder's .jsonl files as one long table: results.csv
(file, dataset, epsilon per site, emulation epsilon, seed, arm, metric, value).

Usage: python to_csv.py   (run in this folder)
"""

import csv
import json
from pathlib import Path

here = Path(__file__).parent
ARMS = ("fed", "emu", "emufiles", "pooled", "per-site")
with open(here / "results.csv", "w", newline="") as out:
    w = csv.writer(out)
    w.writerow(["file", "dataset", "epsilon_site", "epsilon_emulation", "seed", "arm",
                "metric", "value"])
    for path in sorted(here.glob("*.jsonl")):
        with open(path) as f:
            for line in f:
                if not line.startswith("{"):
                    continue
                r = json.loads(line)
                for k, v in r.items():
                    arm = next((a for a in ARMS if k.startswith(a + "_")), None)
                    if arm is not None and isinstance(v, (int, float)):
                        w.writerow([path.name, r["dataset"], r["epsilon_site"],
                                    r["epsilon_emulation"], r["seed"], arm,
                                    k[len(arm) + 1:], v])
