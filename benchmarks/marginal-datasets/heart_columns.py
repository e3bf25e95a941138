"""Per-column 1-KS / 1-TVD against the holdout of each seed's synthetic table and of the
training rows, from a `fedsynth benchmark --keep-work --out DIR` run (delete DIR/work
after: it holds real rows). Usage: python heart_columns.py DIR [SETTING_FOLDER]"""

import sys
import warnings
from pathlib import Path

import pandas as pd

from fedsynth.common.schema import Schema
from fedsynth.common.table import conform, read_table
from fedsynth.common.validation import validate
from fedsynth.simulations.benchmark import bundled_schema_path

warnings.simplefilter("ignore")
root = Path(sys.argv[1])
setting = sys.argv[2] if len(sys.argv) > 2 else "marginal_federated_eps3"
schema = Schema.load(bundled_schema_path("heart_disease"))
rows = []
for folder in sorted(root.glob("work/seed-*")):
    train = read_table(folder / "real/train.csv", schema)
    hold = read_table(folder / "real/holdout.csv", schema)
    synthetic = conform(pd.read_csv(folder / setting / "synthetic.csv"), schema)
    res = validate(train, hold, synthetic, schema, seed=0, areas=["fidelity"])
    for m in res.metrics:
        if m.name in ("ks", "tvd", "fidelity"):
            rows.append({"seed": folder.name, "column": m.columns[0] if m.name != "fidelity"
                         else "(fidelity)", "synthetic": 1 - m.value if m.name != "fidelity"
                         else m.value, "train": 1 - m.reference if m.name != "fidelity"
                         else m.reference})
table = pd.DataFrame(rows).pivot_table(index="column", columns="seed",
                                       values=["synthetic", "train"])
print(table.round(3).to_string())
