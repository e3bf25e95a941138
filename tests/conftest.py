"""Shared fixtures: the real data in ../shared/data and the bundled schema."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fedsynth.common.schema import Schema

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
BUNDLED = REPO / "simulations" / "data"
HEART_FILES = {
    "cleveland": "processed.cleveland.data",
    "hungarian": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}


def data_dir(name: str) -> Path:
    """The real dataset from ../shared/data (the bundled copy is byte-identical)."""
    shared = SHARED / name
    return shared if shared.is_dir() else BUNDLED / name


@pytest.fixture(scope="session")
def heart_schema_path() -> Path:
    return BUNDLED / "heart_disease" / "schema.yaml"


@pytest.fixture(scope="session")
def heart_schema(heart_schema_path: Path) -> Schema:
    return Schema.load(heart_schema_path)


@pytest.fixture(scope="session")
def heart_files() -> dict[str, Path]:
    return {site: data_dir("heart_disease") / f for site, f in HEART_FILES.items()}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
