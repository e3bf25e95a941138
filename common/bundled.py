"""The datasets bundled with fedsynth: where their schema and per-site files are.

Both the coordinator (a run config may name a bundled schema) and a simulated site (the
run config's ``simulation-sites`` may name a bundled dataset) look data up here, so
neither imports ``simulations/``. The files live in ``simulations/data`` (installed as
``fedsynth/simulations/data``); splitting, holdouts and the non-bundled datasets are
``simulations/datasets.py``'s.
"""

from __future__ import annotations

from pathlib import Path

from .schema import Schema
from .study import DEFAULT_DELTA, DEFAULT_EPSILON, ConfigError, SiteConfig

DATA_DIR = Path(__file__).resolve().parent.parent / "simulations" / "data"

HEART_SITES = {
    "cleveland": "processed.cleveland.data",
    "hungarian": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}
# FLamby's Fed-TCGA-BRCA centres (column fold2 of train_test_split.csv) and the region
# their tissue source sites belong to (centers.csv).
TCGA_REGIONS = {0: "northeast", 1: "south", 2: "west", 3: "midwest", 4: "europe", 5: "canada"}
DATASETS: dict[str, object] = {
    "heart_disease": HEART_SITES,
    "tcga_brca": TCGA_REGIONS,
    "amlsg": "centres",
    "mimic3_demo": "dirichlet",
}


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
    """Datasets shipped as one file per site (the heart-disease hospitals)."""
    if name != "heart_disease":
        raise ConfigError(
            f"{name!r} has no per-site files; run it with `fedsynth simulate --dataset {name}`"
        )
    return {site: DATA_DIR / name / fname for site, fname in HEART_SITES.items()}


def bundled_sites(
    name: str, epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA
) -> list[SiteConfig]:
    """Each hospital's whole file as one site (what ``flwr run`` uses by default)."""
    schema_path = str(bundled_schema_path(name))
    return [
        SiteConfig(name=site, data_path=str(path), schema_path=schema_path, epsilon=epsilon,
                   delta=delta)
        for site, path in bundled_site_files(name).items()
    ]
