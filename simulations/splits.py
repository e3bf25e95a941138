"""How a simulated study holds real patients back for validation.

The holdout is a share of *each* site's rows (stratified by site, and by the outcome
within a site when the schema has one), so every hospital's case mix is represented in
the data that no generator sees.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..common.schema import Schema
from ..common.table import read_table


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


#: Real patients' rows are the owner's only, like a site's encoded copy in its state-dir.
PRIVATE_MODE = 0o600


def write_site_table(frame: pd.DataFrame, schema: Schema, path: str) -> None:
    """Write rows in the schema's own file format (header or not; empty = missing),
    owner-only: they are real patients. A new file is created with its mode, never at
    the umask's 0644 for a moment; an earlier one is removed first (whoever had it open
    keeps the old rows, not these); ``fchmod`` sets the mode whatever the umask."""
    Path(path).unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    with os.fdopen(fd, "w", newline="") as handle:
        os.fchmod(handle.fileno(), PRIVATE_MODE)
        frame.to_csv(handle, index=False, header=schema.header, na_rep="")


def dirichlet_split(
    frame: pd.DataFrame, labels: np.ndarray, n_sites: int, alpha: float, seed: int
) -> dict[str, pd.DataFrame]:
    """Sites whose label mix follows Dirichlet(alpha) shares: small alpha, different sites.

    The usual way to make a federation out of one table: for each label, its rows are
    dealt to the sites in proportions drawn from a symmetric Dirichlet. Every site is
    given at least one row.
    """
    if n_sites < 1 or alpha <= 0:
        raise ValueError("need n_sites >= 1 and alpha > 0")
    rng = np.random.default_rng(seed)
    owner = np.empty(len(frame), dtype=int)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        shares = rng.dirichlet(np.full(n_sites, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int)
        for site, part in enumerate(np.split(idx, cuts)):
            owner[part] = site
    for site in range(n_sites):  # no empty site: borrow a row from the largest
        if not (owner == site).any():
            biggest = np.bincount(owner, minlength=n_sites).argmax()
            owner[np.flatnonzero(owner == biggest)[0]] = site
    return {
        f"site_{k}": frame[owner == k].reset_index(drop=True) for k in range(n_sites)
    }


def pooled_split(schema: Schema, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The four heart-disease hospitals' rows pooled, 80/20 split stratified by hospital
    (the central baselines' split)."""
    from sklearn.model_selection import train_test_split

    from ..common.bundled import bundled_site_files

    frames = []
    sites = []
    for site, path in bundled_site_files("heart_disease").items():
        frame = read_table(path, schema)
        frames.append(frame)
        sites += [site] * len(frame)
    pooled = pd.concat(frames, ignore_index=True)
    train, test = train_test_split(
        pooled, test_size=0.2, stratify=np.array(sites), random_state=seed
    )
    return train.reset_index(drop=True), test.reset_index(drop=True)
