"""The cost of taking book-keeping clipping's norms and clipped sums in float64 (third
audit): one DP-SGD round (5 epochs at q 0.25, book-keeping mode) of tvae, ddpm and ctgan
at their defaults on cleveland's 303 rows, ``NORM_DTYPE`` float32 (the old numerics)
against float64, alternating in one process, median of 5.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/audit3/norm_dtype_speed.py``
"""

import statistics
import time
from pathlib import Path

import torch

import fedsynth.common.privacy.bookkeeping as bk
from fedsynth.client.site import load_encoded
from fedsynth.common.encoding import TabularEncoder
from fedsynth.common.generators import get_generator
from fedsynth.common.privacy import DPSettings, PrivacyLedger, train_round
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.schema import Schema
from fedsynth.common.study import SiteConfig

BUNDLED = Path(__file__).resolve().parents[2] / "simulations" / "data" / "heart_disease"
schema = Schema.load(BUNDLED / "schema.yaml")
site = SiteConfig("c", str(BUNDLED / "processed.cleveland.data"), str(BUNDLED / "schema.yaml"))
raw = load_encoded(site, schema)
for name in ("tvae", "ddpm", "ctgan"):
    seconds: dict[torch.dtype, list[float]] = {torch.float32: [], torch.float64: []}
    for _ in range(5):
        for dtype in (torch.float32, torch.float64):
            bk.NORM_DTYPE = dtype
            model = get_generator(name)(schema, seed=0)
            data = model.encoder.reencode(raw, TabularEncoder(schema))
            start = time.perf_counter()
            train_round(model, data, epochs=5, sample_rate=0.25, dp=DPSettings(1.0, 1.0),
                        ledger=PrivacyLedger(), randomness=DPRandomness.secret(),
                        mode="bookkeeping")
            seconds[dtype].append(time.perf_counter() - start)
    old = statistics.median(seconds[torch.float32])
    new = statistics.median(seconds[torch.float64])
    print(f"{name}: float32 norms {old:.3f}s, float64 {new:.3f}s, ratio {new / old:.2f}")
