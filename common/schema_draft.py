"""A first schema from a researcher's tables, to review: ``fedsynth schema draft``.

Nobody should write 40 columns by hand, but a schema fitted on the rows is not a
published schema: a minimum or maximum seen in the data is an actual patient's value
(the oldest, the one with the highest LDH), exactly what differential privacy is
there to hide. So the draft proposes what is safe to read from the rows (each
column's kind, its categories, the tokens that mark a missing value) and, for every
numeric column, copies the rows' bounds *with a mark* (``to_review``, see
``schema.DRAFT_MARK``): ``fedsynth check``, ``simulate`` and every site refuse the
schema until each marked bound is replaced by a public, domain-knowledge bound (a
clinical range, a unit's limits) and its mark deleted. The file explains itself in
comments.

The guesses, and why:
- a column whose cells all parse as numbers is numeric; integer if every value is
  whole, else continuous with the decimals written in the file;
- two values {0, 1} (or two labels) make a binary column; a whole-number column with
  at most ``MAX_CODED`` distinct small values (0-20), or a text column, is categorical
  (a coded variable such as chest-pain type 1-4);
- tokens that appear in otherwise numeric columns and look like missing markers
  (``?``, ``NA``, ``.``, ...) become the file's missing tokens;
- a numeric column named like a survival time (``os``, ``time``, ``t``, ``days``...)
  beside a binary column named like an event (``status``, ``death``, ``e``...) is
  proposed as a ``survival_time`` with that event (a guess from the names: check it);
- ``MIN_CODESET`` or more 0/1 columns with a common prefix (``mut_``, ``dx_``) become
  one ``codeset``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import FedsynthError
from .schema import DRAFT_MARK

MISSING_TOKENS = ("?", "NA", "N/A", "n/a", "na", "NaN", "nan", "null", "NULL", "None", ".", "-",
                  "")
MAX_CODED = 10  # distinct small whole numbers that make a coded (categorical) column
MAX_CATEGORIES = 50  # a text column with more distinct values is probably an identifier
MIN_CODESET = 5
TIME_NAMES = re.compile(r"^(os|t|time|days|survival|survival_?(time|days)|futime|"
                        r"time_?to_?event|efs|pfs|rfs)$", re.IGNORECASE)
EVENT_NAMES = re.compile(r"^(e|event|status|death|dead|died|vital_?status|fustat|"
                         r"os_?status|efsstat|rfsstat)$", re.IGNORECASE)
BOUND_MARK = ("bounds copied from the rows: to replace with a public, domain-knowledge bound")


class DraftError(FedsynthError, ValueError):
    """The tables cannot be drafted from (unreadable, empty, no header)."""


@dataclass
class Draft:
    """What was written: the YAML text, the columns, the marked ones, hints."""

    text: str
    columns: int
    marked: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)


def _files(tables: list[str | Path]) -> list[Path]:
    out: list[Path] = []
    for t in map(Path, tables):
        if t.is_dir():
            out += sorted(p for p in t.iterdir() if p.suffix.lower() in (".csv", ".parquet", ".pq",
                                                                         ".data", ".tsv"))
        elif t.is_file():
            out.append(t)
        else:
            raise DraftError(f"{t} does not exist; pass a CSV/Parquet file or a folder of them")
    if not out:
        raise DraftError("no table found; pass a CSV/Parquet file or a folder of them")
    return out


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _looks_like_header(first: list[str]) -> bool:
    return all(c.strip() and _number(c) is None for c in first)


def _read(path: Path) -> tuple[pd.DataFrame, bool]:
    """Cells as text; (frame, has_header). A file whose first row is all numbers has none."""
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise DraftError(f"{path}: not a readable Parquet table ({exc}); export the "
                             "table again as CSV or Parquet") from None
        if frame.empty:
            raise DraftError(f"{path}: the table has no rows; draft from the real table")
        return frame.astype(object).where(frame.notna(), "").astype(str), True
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False, sep=sep,
                          skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DraftError(f"{path}: not a readable table ({exc})") from None
    if raw.empty:
        raise DraftError(f"{path}: the file has no rows")
    first = [str(c) for c in raw.iloc[0]]
    if _looks_like_header(first):
        body = raw.iloc[1:].reset_index(drop=True)
        if body.empty:  # kinds and categories proposed from no rows are all wrong
            raise DraftError(f"{path}: the file has a header row and no data rows; "
                             "draft from the real table")
        body.columns = [c.strip() for c in first]
        return body, True
    raw.columns = [f"column_{i + 1}" for i in range(raw.shape[1])]
    return raw, False


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _decimals(texts: list[str]) -> int:
    return max((len(t.split(".", 1)[1]) for t in texts if "." in t), default=0)


def _column(name: str, cells: pd.Series, tokens: set[str]) -> dict:
    """One column's proposal: a dict of schema keys, plus '_note' comments."""
    texts = [c.strip() for c in cells.astype(str)]
    present = [t for t in texts if t not in tokens]
    numbers = [_number(t) for t in present]
    spec: dict = {"name": name}
    notes: list[str] = []
    if present and all(v is not None for v in numbers):
        zeros = _numeric_column(spec, present, numbers, notes)  # type: ignore[arg-type]
    else:
        zeros = 0
        _text_column(spec, present, notes)
    missing = len(texts) - len(present) + zeros
    spec["nullable"] = missing > 0
    if "missing" in spec:  # the schema's order: nullable before missing
        spec["missing"] = spec.pop("missing")
    if missing:
        share = missing / len(texts)
        notes.append(f"missing in {'under 1%' if share < 0.01 else format(share, '.0%')} of "
                     "the rows")
    spec["_note"] = notes
    return spec


def _numeric_column(spec: dict, present: list[str], numbers: list[float],
                    notes: list[str]) -> int:
    """Kind and marked bounds of an all-numeric column; returns the zeros taken as a
    'not measured' code (they count as missing)."""
    values = sorted(set(numbers))
    whole = all(float(v).is_integer() for v in values)
    if len(values) == 2 and set(values) <= {0.0, 1.0}:
        spec["kind"] = "binary"
        return 0
    if len(values) <= 2 and whole:
        spec.update(kind="categorical", categories=[int(v) for v in values])
        notes.append("two codes seen: if these are the only two values the domain has, "
                     "kind: binary with these categories also works")
        return 0
    if whole and len(values) <= MAX_CODED and min(values) >= 0 and max(values) <= 20:
        spec.update(kind="categorical", categories=[int(v) for v in values])
        notes.append(f"{len(values)} small whole numbers: taken as codes; if they are "
                     "measurements, make it kind: integer with public min and max")
        return 0
    spec["kind"] = "integer" if whole else "continuous"
    zeros = 0
    positive = [v for v in values if v > 0]
    median = sorted(v for v in numbers if v)[len(positive) // 2] if positive else 0
    if (values[0] == 0 and positive and len(positive) == len(values) - 1
            and positive[0] > 0.2 * median):
        # 0 far below every other value: a "not measured" code (cholesterol 0)
        spec["missing"] = [0]
        zeros = sum(1 for v in numbers if v == 0)
        values = positive
        notes.append(f"0 sits far below every other value (they start at "
                     f"{_fmt(positive[0])}): proposed as a 'not measured' code "
                     "(missing: [0]); delete it if 0 is a real measurement")
    spec["min"], spec["max"] = min(values), max(values)
    if not whole:
        spec["decimals"] = _decimals(present)
    spec[DRAFT_MARK] = BOUND_MARK
    return zeros


def _text_column(spec: dict, present: list[str], notes: list[str]) -> None:
    """Kind and categories of a column with text values, with warnings on identifiers
    and rare categories."""
    labels = sorted(set(present), key=lambda t: (_number(t) is None, _number(t) or 0, t))
    kind = "binary" if len(labels) == 2 else "categorical"
    spec.update(kind=kind, categories=[_cat(v) for v in labels])
    if len(labels) > MAX_CATEGORIES:
        notes.append(f"{len(labels)} distinct values: an identifier or free text? Drop "
                     "the column from the tables (identifiers must not be modelled)")
    rare = [lab for lab, n in Counter(present).items() if n < 5]
    if rare:
        notes.append(f"{len(rare)} categor(y/ies) seen in fewer than 5 rows: list the "
                     "domain's public categories instead of the rows' (a rare category "
                     "points at its patients)")


def _cat(text: str) -> int | float | str:
    value = _number(text)
    if value is None:
        return text
    return int(value) if value.is_integer() else value


def draft_schema(frames: list[pd.DataFrame], name: str, header: bool,
                 site_column: str | None = None) -> Draft:
    """The draft of the rows of ``frames`` (all sites' tables, same columns)."""
    columns = list(frames[0].columns)
    for f in frames[1:]:
        if list(f.columns) != columns:
            raise DraftError("the tables do not have the same columns; draft them one by one")
    if site_column:
        if site_column not in columns:
            raise DraftError(f"no column {site_column!r}; the columns are {', '.join(columns)}")
        columns.remove(site_column)
    rows = pd.concat(frames, ignore_index=True)
    # tokens that sit in otherwise numeric columns are the file's missing markers
    tokens = {""}
    for c in columns:
        texts = rows[c].astype(str).str.strip()
        bad = set(texts[texts.map(lambda t: _number(t) is None)])
        if bad and bad <= set(MISSING_TOKENS) and len(bad) < len(set(texts)):
            tokens |= bad
    specs = [_column(c, rows[c], tokens) for c in columns]
    hints: list[str] = []
    _survival(specs, hints)
    specs = _codesets(specs, hints)
    text = _yaml(name, header, sorted(tokens - {""}), specs, site_column)
    marked = [s["name"] for s in specs if DRAFT_MARK in s]
    return Draft(text, len(columns), marked, hints)


def _survival(specs: list[dict], hints: list[str]) -> None:
    # an event column seen with one value only (every patient died) is still 0/1
    events = [s for s in specs if EVENT_NAMES.match(s["name"]) and (
        (s["kind"] == "binary" and "categories" not in s)
        or (s["kind"] == "categorical" and set(s["categories"]) <= {0, 1}))]
    for s in specs:
        if s["kind"] in ("integer", "continuous") and TIME_NAMES.match(s["name"]) and events:
            events[0].update(kind="binary")
            events[0].pop("categories", None)
            s["kind"] = "survival_time"
            s["event"] = events[0]["name"]
            s["min"] = max(0.0, s["min"])
            s["_note"].append(f"guessed from the names: a survival time whose event is "
                              f"{events[0]['name']!r} (1 = event, 0 = censored); check it")
            hints.append(f"{s['name']} proposed as a survival time with event "
                         f"{events[0]['name']}: survival metrics will score it")
            events = events[1:]


def _codesets(specs: list[dict], hints: list[str]) -> list[dict]:
    prefixes = Counter(s["name"].split("_", 1)[0] + "_" for s in specs
                       if s["kind"] == "binary" and "_" in s["name"] and not s["nullable"]
                       and "categories" not in s)
    out: list[dict] = []
    done: set[str] = set()
    for s in specs:
        prefix = s["name"].split("_", 1)[0] + "_" if "_" in s["name"] else ""
        member = (prefix and prefixes[prefix] >= MIN_CODESET and s["kind"] == "binary"
                  and not s["nullable"] and "categories" not in s)
        if not member:
            out.append(s)
            continue
        if prefix in done:
            continue
        done.add(prefix)
        codes = [m["name"][len(prefix):] for m in specs
                 if m["name"].startswith(prefix) and m["kind"] == "binary"
                 and not m["nullable"] and "categories" not in m]
        out.append({"name": prefix.rstrip("_"), "kind": "codeset", "prefix": prefix,
                    "codes": codes, "_note": [
                        f"{len(codes)} 0/1 columns {prefix}...: one code set; list every code "
                        "of the public code list, also those no row has"]})
        hints.append(f"{len(codes)} columns {prefix}* proposed as one code set")
    return out


KIND_HELP = {
    "integer": "whole numbers between public bounds min and max",
    "continuous": "real numbers between public bounds min and max (decimals: recorded "
    "precision)",
    "survival_time": "time to an event; 'event' names the binary column saying whether it "
    "happened",
    "categorical": "one of a public list of categories",
    "binary": "one of two categories (default 0 and 1)",
    "codeset": "a set of 0/1 columns, one per code of a public code list (prefix + code)",
}


def _yaml(name: str, header: bool, tokens: list[str], specs: list[dict],
          site_column: str | None) -> str:
    q = json.dumps  # a JSON string or number is valid YAML
    lines = [
        f"# Draft schema of study {name!r}, proposed by `fedsynth schema draft` from the rows.",
        "# A schema is public: every site and the coordinator read it. Review it all:",
        f"# - every column marked '{DRAFT_MARK}' has min/max copied from the rows (a real "
        "patient's value).",
        "#   Replace them with public, domain-knowledge bounds (clinical ranges, units) and "
        f"delete the '{DRAFT_MARK}'",
        "#   line: `fedsynth check`, `fedsynth simulate` and every site refuse the schema "
        "until then.",
        "# - categories are those seen in the rows: use the domain's public list instead.",
        "# - nullable: may the value be missing; missing: column-specific codes that mean "
        "'not measured'",
        "#   (e.g. cholesterol 0); format.missing: tokens that mean missing in every column.",
        "# - outcome (optional): the label that utility (train on synthetic, test on real) "
        "predicts.",
        "# Kinds: " + "; ".join(f"{k}: {v}" for k, v in KIND_HELP.items()),
        f"name: {q(name)}",
        "format:",
        f"  header: {'true' if header else 'false'}  # does the file start with a header row?",
        f"  missing: {q(tokens)}  # tokens that mean 'missing' in every column",
    ]
    if site_column:
        lines.append(f"# the site column {site_column!r} is not part of the schema: simulate "
                     "--site-column drops it")
    lines += ["# target: NAME  # uncomment: the binary label utility (TSTR) predicts; for "
              "another label: outcome: {column: NAME, positive: [VALUES]}", "columns:"]
    for s in specs:
        for note in s.get("_note", []):
            lines.append(f"  # {s['name']}: {note}")
        keys = [k for k in ("name", "kind", "min", "max", "decimals", "event", "categories",
                            "prefix", "codes", "nullable", "missing", DRAFT_MARK) if k in s]
        parts = []
        for k in keys:
            v = s[k]
            parts.append(f"{k}: {_fmt(v) if k in ('min', 'max') else q(v)}")
        lines.append("  - {" + ", ".join(parts) + "}")
    return "\n".join(lines) + "\n"


def draft_inputs(tables: list[str | Path], out: str | Path) -> list[Path]:
    """The table files to draft from, refusing an ``out`` that is one of them.

    ``--force`` replaces ``--out``: were it one of the inputs, that would be the
    hospital's own table. The command calls this before its "exists; pass --force"
    check, so that advice is never given for a data file.
    """
    files = _files(tables)
    target = Path(out).resolve()
    if any(f.resolve() == target for f in files):
        raise DraftError(f"--out {out} is one of the tables to draft from; write the "
                         "schema to another file (e.g. schema.yaml)")
    return files


def draft_schema_file(tables: list[str | Path], out: str | Path, site_column: str | None = None,
                      name: str | None = None) -> Draft:
    """Draft from files (or a folder of one file per site) and write the YAML to ``out``."""
    files = draft_inputs(tables, out)
    read = [_read(p) for p in files]
    headers = {h for _, h in read}
    if len(headers) > 1:
        raise DraftError("some tables have a header row and some do not; make them alike")
    header = headers.pop()
    if site_column and not header:
        raise DraftError("--site-column needs a header row to name the column")
    stem = files[0].parent.name if len(files) > 1 else files[0].stem
    draft = draft_schema([f for f, _ in read], name or re.sub(r"\W+", "_", stem), header,
                         site_column)
    Path(out).write_text(draft.text, encoding="utf-8")
    return draft
