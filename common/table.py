"""Reading a site's table and checking it against the published schema.

A site learns about *every* problem in its file at once, in words a data manager
understands, because a fix-one-rerun loop across hospital IT is slow. The file is only
ever opened for reading. Each problem has a ``summary`` that is safe to send to the
coordinator (column names, counts, kinds of problems) and a ``detail`` with row numbers
and example values, which stays at the site: examples are patients' values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import FedsynthError
from .schema import Column, Schema

MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a table."""

    summary: str
    detail: str = ""
    # What may reach the coordinator: the column and the kind of problem, no count (a
    # count of out-of-domain values is a statistic of the rows). Empty: the summary is
    # already free of counts.
    shared: str = ""

    def __str__(self) -> str:
        return f"{self.summary}: {self.detail}" if self.detail else self.summary


class TableCheckError(FedsynthError, ValueError):
    """A site's table does not match the schema; carries every problem found."""

    def __init__(self, path: str | Path, schema_name: str, problems: list[Problem]) -> None:
        self.path = str(path)
        self.schema_name = schema_name
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"{self.path} does not match schema {schema_name!r} "
            f"({len(problems)} problem(s)); the file was not changed:\n{lines}"
        )

    def shareable(self) -> list[str]:
        """The problems without counts, row numbers or values, for the coordinator."""
        return [p.shared or p.summary for p in self.problems]


def _read_raw(path: Path, schema: Schema) -> pd.DataFrame:
    """Read every cell as it is written, so the checker can name unparseable values."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        frame = pd.read_parquet(path)
        return frame.astype(object).where(frame.notna(), None)
    frame = pd.read_csv(
        path,
        header=0 if schema.header else None,
        dtype=str,
        keep_default_na=False,
        skipinitialspace=True,
        on_bad_lines="error",
        encoding="utf-8",
    )
    if not schema.header:
        frame.columns = list(range(frame.shape[1]))
    return frame


def _rows(idx: list[int], first_row: int) -> str:
    shown = ", ".join(str(i + first_row) for i in idx[:MAX_EXAMPLES])
    more = f" (and {len(idx) - MAX_EXAMPLES} more)" if len(idx) > MAX_EXAMPLES else ""
    return f"{shown}{more}"


def _examples(values: list[Any], idx: list[int], first_row: int) -> str:
    shown = ", ".join(f"row {i + first_row}: {v!r}" for i, v in zip(idx, values, strict=False))
    more = f" (and {len(idx) - MAX_EXAMPLES} more)" if len(idx) > MAX_EXAMPLES else ""
    return shown + more


def _is_missing(value: Any, column: Column, tokens: tuple[str, ...]) -> bool:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return True
    text = str(value).strip()
    if text in tokens:
        return True
    for code in column.missing:
        if text == str(code):
            return True
        num = _to_float(text)
        if num is not None and isinstance(code, int | float) and num == float(code):
            return True
    return False


def _to_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float | np.integer | np.floating):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def _match_category(value: Any, column: Column) -> Any:
    """Return the declared category a cell means, or raise KeyError."""
    if column.numeric_categories:
        num = _to_float(value)
        if num is not None:
            for cat in column.categories:
                if num == float(cat):
                    return cat
        raise KeyError(value)
    text = str(value).strip()
    for cat in column.categories:
        if text == str(cat):
            return cat
    raise KeyError(value)


def _classify(raw: Any, column: Column, tokens: tuple[str, ...]) -> tuple[str, Any]:
    """What one cell is: ("missing" | "unparseable" | "fractional" | "outside" |
    "unknown", raw) or ("ok", the parsed value)."""
    if _is_missing(raw, column, tokens):
        return "missing", None
    if column.is_numeric:
        num = _to_float(raw)
        if num is None or not math.isfinite(num):
            return "unparseable", raw
        if column.kind == "integer" and num != round(num):
            return "fractional", num
        if not (column.min <= num <= column.max):  # type: ignore[operator]
            return "outside", num
        return "ok", num
    try:
        return "ok", _match_category(raw, column)
    except KeyError:
        return "unknown", raw


def _check_column(
    values: list[Any], column: Column, schema: Schema, first_row: int
) -> tuple[list[Any], list[Problem]]:
    """The column's parsed values (NaN where missing or bad) and its problems.

    Each distinct cell value is classified once: a code column of a wide table (the
    MIMIC-III demo has 1,236 of them) holds two or three distinct values however many
    rows it has, so the check costs distinct values, not cells.
    """
    problems: list[Problem] = []
    out: list[Any] = []
    missing_bad: list[int] = []
    unparseable: tuple[list[int], list[Any]] = ([], [])
    outside: tuple[list[int], list[Any]] = ([], [])
    fractional: tuple[list[int], list[Any]] = ([], [])
    unknown: tuple[list[int], list[Any]] = ([], [])
    bad = {"unparseable": unparseable, "outside": outside, "fractional": fractional,
           "unknown": unknown}
    seen: dict[tuple[type, Any], tuple[str, Any]] = {}
    for i, raw in enumerate(values):
        try:
            key = (type(raw), raw)
            verdict = seen.get(key)
        except TypeError:  # an unhashable cell (a list from Parquet): classify it alone
            key, verdict = None, None
        if verdict is None:
            verdict = _classify(raw, column, schema.missing_tokens)
            if key is not None and _cacheable(raw):
                seen[key] = verdict
        what, value = verdict
        if what == "ok":
            out.append(value)
            continue
        out.append(np.nan)
        if what == "missing":
            if not column.nullable:
                missing_bad.append(i)
            continue
        bad[what][0].append(i)
        bad[what][1].append(raw)
        if what in ("outside", "fractional"):  # a number, kept as the old check kept it
            out[-1] = value
    name = column.name
    if missing_bad:
        problems.append(
            Problem(
                f"column {name!r}: {len(missing_bad)} missing value(s) but the schema says it "
                "is never missing",
                f"rows {_rows(missing_bad, first_row)}",
                f"column {name!r}: missing values but the schema says it is never missing",
            )
        )
    if unparseable[0]:
        problems.append(
            Problem(
                f"column {name!r}: {len(unparseable[0])} value(s) are not numbers",
                _examples(unparseable[1][:MAX_EXAMPLES], unparseable[0], first_row),
                f"column {name!r}: values that are not numbers",
            )
        )
    if fractional[0]:
        problems.append(
            Problem(
                f"column {name!r}: {len(fractional[0])} value(s) are not whole numbers "
                "(the schema says integer)",
                _examples(fractional[1][:MAX_EXAMPLES], fractional[0], first_row),
                f"column {name!r}: values that are not whole numbers (the schema says integer)",
            )
        )
    if outside[0]:
        unit = f" {column.unit}" if column.unit else ""
        problems.append(
            Problem(
                f"column {name!r}: {len(outside[0])} value(s) outside the schema's domain "
                f"[{column.min:g}, {column.max:g}]{unit}",
                _examples(outside[1][:MAX_EXAMPLES], outside[0], first_row),
                f"column {name!r}: values outside the schema's domain "
                f"[{column.min:g}, {column.max:g}]{unit}",
            )
        )
    if unknown[0]:
        problems.append(
            Problem(
                f"column {name!r}: {len(unknown[0])} value(s) are not among its categories "
                f"{list(column.categories)}",
                _examples(unknown[1][:MAX_EXAMPLES], unknown[0], first_row),
                f"column {name!r}: values that are not among its categories",
            )
        )
    return out, problems


def _cacheable(raw: Any) -> bool:
    """Whether a cell's verdict may be cached by value: not a missing marker (NaN != NaN
    and ``pd.NA == pd.NA`` is NA, so they are never a hit) and comparable to itself."""
    if raw is None or raw is pd.NA or raw is pd.NaT:
        return False
    try:
        return bool(raw == raw)
    except (TypeError, ValueError):
        return False


def _typed(checked: dict[str, list[Any]], schema: Schema, n: int) -> pd.DataFrame:
    """Give each column the dtype its kind implies: float, nullable Int64 or object.

    Built from plain arrays in one DataFrame call: per-column pandas operations cost
    about a millisecond each, which a table of 1,241 columns multiplies into seconds.
    """
    out: dict[str, Any] = {}
    for column in schema.columns:
        values = checked[column.name]
        if column.is_numeric:
            num = np.asarray(values, dtype=float)
        if column.kind == "continuous" or (
            column.kind == "survival_time" and column.decimals != 0
        ):
            out[column.name] = num
        elif column.kind in ("integer", "survival_time"):
            missing = np.isnan(num)
            whole = np.round(np.where(missing, 0.0, num)).astype(np.int64)
            out[column.name] = pd.arrays.IntegerArray(whole, missing)
        else:
            cells = np.empty(n, dtype=object)
            cells[:] = values
            out[column.name] = cells
    return pd.DataFrame(out, index=pd.RangeIndex(n))


def conform(frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Check an in-memory frame against the schema and return it typed.

    Used where a frame rather than a file comes in (validation inputs, tests); raises
    TableCheckError with every problem.
    """
    return _check_frame(frame.reset_index(drop=True), schema, "<frame>", first_row=1)


def _check_frame(raw: pd.DataFrame, schema: Schema, where: str, first_row: int) -> pd.DataFrame:
    problems: list[Problem] = []
    if len(raw) == 0:
        raise TableCheckError(where, schema.name, [Problem("the table has no rows")])
    expected = schema.names
    present = [str(c) for c in raw.columns]
    missing = [c for c in expected if c not in present]
    extra = [c for c in present if c not in expected]
    if missing:
        problems.append(Problem(f"missing column(s): {', '.join(missing)}"))
    if extra:
        problems.append(
            Problem(f"column(s) not in the schema: {', '.join(extra)} (remove or rename them)")
        )
    position = {str(c): i for i, c in enumerate(raw.columns)}
    cells = raw.to_numpy(dtype=object)  # one block: no pandas object per column
    checked: dict[str, list[Any]] = {}
    for column in schema.columns:
        if column.name not in position:
            continue
        values = cells[:, position[column.name]].tolist()
        series, col_problems = _check_column(values, column, schema, first_row)
        checked[column.name] = series
        problems.extend(col_problems)
    if problems:
        raise TableCheckError(where, schema.name, problems)
    return _typed(checked, schema, len(raw))


def read_table(path: str | Path, schema: Schema) -> pd.DataFrame:
    """Read a site's CSV or Parquet file and return it typed, or raise with every problem.

    Row numbers in messages count data rows from 1, as a spreadsheet shows them below
    the header.
    """
    path = Path(path)
    if not path.exists():
        raise TableCheckError(
            path, schema.name, [Problem("the file does not exist; check the data path")]
        )
    if not path.is_file():
        raise TableCheckError(path, schema.name, [Problem("the path is not a file")])
    if path.stat().st_size == 0:
        raise TableCheckError(path, schema.name, [Problem("the file is empty (0 bytes)")])
    try:
        raw = _read_raw(path, schema)
    except pd.errors.EmptyDataError:
        raise TableCheckError(path, schema.name, [Problem("the file has no rows")]) from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        kind = "Parquet" if path.suffix.lower() in (".parquet", ".pq") else "CSV"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TableCheckError(
            path,
            schema.name,
            [
                Problem(
                    f"the file is not a readable {kind} table",
                    f"{reason}; export it as {kind} with one row per patient",
                )
            ],
        ) from None
    if not schema.header:
        if raw.shape[1] != len(schema.columns):
            raise TableCheckError(
                path,
                schema.name,
                [
                    Problem(
                        f"the file has {raw.shape[1]} field(s) per row, the schema has "
                        f"{len(schema.columns)} columns (it says the file has no header row)"
                    )
                ],
            )
        raw.columns = schema.names
    return _check_frame(raw, schema, str(path), first_row=1)
