"""A researcher's own multi-site data: one table per site, or one table and a site column.

``fedsynth simulate --schema S.yaml --data DIR`` (each CSV/Parquet file in DIR is a
site, named by its file name) and ``--data TABLE --site-column C`` (one table split by
the values of C, which is then dropped), and the Python API's mapping of site name to
DataFrame or path, all end here. Every site's table is checked as ``fedsynth check``
checks a file, and every problem of every site is reported in one error before
anything is written or trained: a researcher fixing their export should not learn of
the problems one site at a time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from ..common.errors import FedsynthError
from ..common.schema import Schema
from ..common.table import Problem, TableCheckError, conform, read_table

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
# A site's name becomes a file and folder name (site-NAME.csv, site-state/NAME) and a
# key file's name in an encrypted study; anything else is replaced by "_".
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class SiteDataError(FedsynthError, ValueError):
    """One or more sites' tables do not fit the schema; lists every problem of every site."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            f"{len(problems)} problem(s) in the sites' data; nothing was written or trained:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


def site_name(value: object) -> str:
    """A safe site name from a file stem or a site-column value."""
    text = str(value).strip()
    if text.endswith(".0") and text[:-2].isdigit():  # 12.0 read as float: site 12
        text = text[:-2]
    return _UNSAFE.sub("_", text) or "site"


def _problems(exc: TableCheckError, where: str) -> list[str]:
    return [f"{where}: {p}" for p in exc.problems]


def sites_from_folder(folder: str | Path, schema: Schema) -> dict[str, pd.DataFrame]:
    """Every CSV or Parquet file of ``folder`` as one site, checked against ``schema``."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in TABLE_SUFFIXES)
    if not files:
        raise SiteDataError(
            [f"{folder} holds no .csv or .parquet file; put one table per site there "
             "(the file name is the site's name)"]
        )
    return check_sites({site_name(p.stem): p for p in files}, schema)


def sites_from_column(table: str | Path, column: str, schema: Schema) -> dict[str, pd.DataFrame]:
    """One table split into sites by the values of ``column`` (dropped afterwards)."""
    from ..common.table import _read_raw  # the checker's own reader: cells as written

    path = Path(table)
    if not path.is_file():
        raise SiteDataError([f"{path}: the file does not exist; check the --data path"])
    if not schema.header:
        raise SiteDataError(
            [f"schema {schema.name!r} says the files have no header row, so no column can be "
             "named by --site-column; pass one file per site with --data DIR instead"]
        )
    try:
        raw = _read_raw(path, schema)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError,
            OSError) as exc:
        raise SiteDataError([f"{path}: not a readable CSV or Parquet table ({exc})"]) from None
    if column not in raw.columns:
        raise SiteDataError(
            [f"{path}: no column {column!r} to split the sites by; its columns are "
             f"{', '.join(map(str, raw.columns))}"]
        )
    if column in schema.names:
        raise SiteDataError(
            [f"--site-column {column!r} is a column of the schema; the site column is "
             "dropped before training, so it cannot also be modelled"]
        )
    labels = raw[column].map(lambda v: "" if v is None else str(v).strip())
    problems = []
    if (labels == "").any():
        problems.append(
            f"{path}: {int((labels == '').sum())} row(s) have no value in the site column "
            f"{column!r}; every row must belong to a site"
        )
    frames: dict[str, pd.DataFrame] = {}
    for label in sorted(set(labels) - {""}, key=_natural):
        part = raw[labels == label].drop(columns=column)
        name = site_name(label)
        try:
            frames[name] = conform(part, schema)
        except TableCheckError as exc:
            problems += _problems(exc, f"{path}, site {name} (row numbers count this site's rows)")
    if problems:
        raise SiteDataError(problems)
    return frames


def _natural(label: str) -> tuple[int, float | str]:
    """Numeric site labels in numeric order (2 before 10), then the others."""
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


def check_sites(
    sites: Mapping[str, pd.DataFrame | str | Path], schema: Schema
) -> dict[str, pd.DataFrame]:
    """Read and check every site's table; raise one SiteDataError with all problems."""
    if not sites:
        raise SiteDataError(["no sites given; a study needs at least one site's table"])
    names = [site_name(n) for n in sites]
    if len(set(names)) != len(names):
        raise SiteDataError([f"site names repeat once made safe for file names: {names}"])
    frames: dict[str, pd.DataFrame] = {}
    problems: list[str] = []
    for (raw_name, table), name in zip(sites.items(), names, strict=True):
        try:
            if isinstance(table, pd.DataFrame):
                frames[name] = conform(table, schema)
            else:
                frames[name] = read_table(table, schema)
        except TableCheckError as exc:
            where = f"site {raw_name}" + ("" if isinstance(table, pd.DataFrame) else f" ({table})")
            problems += _problems(exc, where)
    if problems:
        raise SiteDataError(problems)
    return frames


__all__ = ["Problem", "SiteDataError", "check_sites", "sites_from_column", "sites_from_folder"]
