"""SIMULATED data: a nonlinear structural causal model whose truth is known.

Not patient data. Z (a severity score, 0 to 9) confounds a treatment T and an outcome Y:
sicker patients are treated more often and do worse, and the treatment helps more the
sicker the patient, through a non-linear mechanism::

    Z ~ Uniform{0, 1, ..., 9}
    T ~ Bernoulli(sigmoid(0.6 (Z - 4.5)))
    Y = 10 + T (1 + 0.3 Z) - 4 tanh((Z - 4.5) / 2) + N(0, 1)

The average treatment effect E[Y | do(T=1)] - E[Y | do(T=0)] = 1 + 0.3 E[Z] = 2.35;
the naive difference E[Y | T=1] - E[Y | T=0] is far below it (the treated are sicker).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedsynth.common.schema import Schema

TRUE_ATE = 2.35

SCHEMA = {
    "name": "simulated_scm",
    "description": "SIMULATED nonlinear SCM (test fixture, not patient data)",
    "columns": [
        {"name": "Z", "kind": "integer", "min": 0, "max": 9, "nullable": False},
        {"name": "T", "kind": "binary", "nullable": False},
        {"name": "Y", "kind": "continuous", "min": 0.0, "max": 20.0, "nullable": False},
    ],
    "graph": {"T": ["Z"], "Y": ["Z", "T"]},
}


def scm_schema(graph: bool = True) -> Schema:
    raw = dict(SCHEMA)
    if not graph:
        raw.pop("graph")
    return Schema.from_dict(raw, source="simulated SCM")


def simulate(n: int, seed: int, do_t: int | None = None) -> pd.DataFrame:
    """``n`` rows of the SCM, observational or under do(T = do_t)."""
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 10, n)
    t = (rng.random(n) < 1 / (1 + np.exp(-0.6 * (z - 4.5)))).astype(int)
    if do_t is not None:
        t = np.full(n, do_t)
    y = 10 + t * (1 + 0.3 * z) - 4 * np.tanh((z - 4.5) / 2) + rng.normal(0, 1, n)
    return pd.DataFrame({"Z": z, "T": t, "Y": np.clip(y, 0.0, 20.0)})
