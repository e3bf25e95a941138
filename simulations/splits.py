"""How a simulated study holds real patients back for validation.

The holdout is a share of *each* site's rows (stratified by site, and by the outcome
within a site when the schema has one), so every hospital's case mix is represented in
the data that no generator sees.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..common.schema import Schema


def outcome_labels(frame: pd.DataFrame, schema: Schema) -> np.ndarray | None:
    """The binary outcome (1 = positive) as the schema defines it, if it defines one."""
    if schema.outcome is None:
        return None
    positive = {str(v) for v in schema.outcome.positive}
    return np.array([str(v) in positive for v in frame[schema.outcome.column]], dtype=int)


def holdout_split(
    frame: pd.DataFrame, schema: Schema, fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split one site's rows into (train, holdout), stratified by the outcome."""
    if not 0 < fraction < 1:
        raise ValueError("holdout fraction must be in (0, 1)")
    rng = np.random.default_rng(seed)
    labels = outcome_labels(frame, schema)
    groups = np.zeros(len(frame), dtype=int) if labels is None else labels
    hold: list[int] = []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        rng.shuffle(idx)
        hold.extend(idx[: int(round(fraction * len(idx)))].tolist())
    mask = np.zeros(len(frame), dtype=bool)
    mask[hold] = True
    return frame[~mask].reset_index(drop=True), frame[mask].reset_index(drop=True)


def write_site_table(frame: pd.DataFrame, schema: Schema, path: str) -> None:
    """Write rows in the schema's own file format (header or not; empty = missing)."""
    frame.to_csv(path, index=False, header=schema.header, na_rep="")
