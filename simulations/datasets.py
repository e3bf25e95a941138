"""Datasets a simulated study can run on, split into sites as they really are.

The bundled demo is the UCI Heart Disease data of four hospitals (CC BY 4.0, see
``data/heart_disease/ATTRIBUTION.md``): a natural federation whose sites differ in case
mix, disease rate and which measurements they took.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..common.schema import Schema
from ..common.study import ConfigError, SiteConfig
from ..common.table import read_table

DATA_DIR = Path(__file__).parent / "data"

HEART_SITES = {
    "cleveland": "processed.cleveland.data",
    "hungarian": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}
DATASETS = {"heart_disease": HEART_SITES}


def bundled_schema_path(name: str) -> Path:
    path = DATA_DIR / name / "schema.yaml"
    if name not in DATASETS or not path.is_file():
        raise ConfigError(
            f"{name!r} is neither a schema file nor a bundled dataset "
            f"({', '.join(sorted(DATASETS))})"
        )
    return path


def bundled_schema(name: str) -> Schema:
    return Schema.load(bundled_schema_path(name))


def bundled_site_files(name: str) -> dict[str, Path]:
    if name not in DATASETS:
        raise ConfigError(f"unknown bundled dataset {name!r}; have {', '.join(DATASETS)}")
    return {site: DATA_DIR / name / fname for site, fname in DATASETS[name].items()}


def bundled_sites(name: str, epsilon: float = 3.0, delta: float = 1e-5) -> list[SiteConfig]:
    """Each hospital's whole file as one site (what ``flwr run`` uses by default)."""
    schema_path = str(bundled_schema_path(name))
    return [
        SiteConfig(name=site, data_path=str(path), schema_path=schema_path, epsilon=epsilon,
                   delta=delta)
        for site, path in bundled_site_files(name).items()
    ]


def load_site_frames(name: str) -> tuple[Schema, dict[str, pd.DataFrame]]:
    schema = bundled_schema(name)
    return schema, {site: read_table(p, schema) for site, p in bundled_site_files(name).items()}
