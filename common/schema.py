"""The published schema of a study: every column, its kind and its public domain.

The schema is the only thing the encoder, the generators and the validators may know
about a column before they see data. Bounds and category lists come from domain
knowledge (units, clinical ranges, code lists), never from the private rows: a minimum
or a category list fitted on the data would publish the very outliers DP protects.

File format (YAML or JSON, same structure)::

    name: heart_disease
    format:              # how a site's file is read
      header: false      # the UCI files have no header row
      missing: ["?"]     # tokens that mean "missing" in every column
    outcome:             # optional: the label utility metrics predict
      column: num
      positive: [1, 2, 3, 4]
    # target: relapse    # short form for a binary label (positive: its second category)
    columns:
      - name: age
        kind: integer    # continuous | integer | categorical | binary
        min: 18
        max: 100
        nullable: false  # may the value be missing? (default true)
      - name: oldpeak
        kind: continuous
        min: -3.0
        max: 7.0
        decimals: 1      # recorded to 0.1 mm: synthetic values are rounded alike
      - name: chol
        kind: integer
        min: 80
        max: 700
        missing: [0]     # column-specific missing codes (0 = "not measured")
      - name: cp
        kind: categorical
        categories: [1, 2, 3, 4]

Survival outcomes and code sets::

      - {name: T, kind: survival_time, min: 0, max: 8000, unit: days, event: E}
      - {name: E, kind: binary}
      - name: dx               # a set of binary codes (ICD-9, mutated genes)
        kind: codeset
        prefix: "dx_"          # the table has one 0/1 column per code: dx_4019, ...
        codes: ["4019", "4280", "42731"]   # the public code list
        groups: {prefix: 3}    # optional: codes sharing their first 3 characters form a
                               # group (the marginal generator models a group's count)

``groups`` may instead name each group with its codes or inclusive ranges of codes
(``{circulatory: ["390..459"], infections: ["001..139"]}``); every code then belongs to
exactly one group. Groups are public (a code hierarchy), never fitted on rows.

A schema with a survival outcome may name, from domain knowledge, the covariates that
carry its prognosis (the marginal generator links only these to the time and event)::

    prognostic: [age, stage_iii, nodes_positive]

Every kind declares its domain here so the encoder never has to look at private
values.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .causal import CausalGraph, GraphError, parse_graph
from .errors import FedsynthError

NUMERIC_KINDS = ("continuous", "integer", "survival_time")
CATEGORICAL_KINDS = ("categorical", "binary")
# "codeset" is declared once in a schema file and expands into one binary column per
# code (named prefix + code), grouped so the encoder makes them one multi-hot block.
KINDS = NUMERIC_KINDS + CATEGORICAL_KINDS + ("codeset",)
# The key ``fedsynth schema draft`` puts on every column whose bounds it copied from the
# rows (common/schema_draft.py): such bounds publish the outliers DP protects, so a
# schema that still carries the mark is refused everywhere (check, simulate, a site).
DRAFT_MARK = "to_review"


class SchemaError(FedsynthError, ValueError):
    """The schema file itself is wrong; raised with every problem found in it."""


Category = int | float | str


@dataclass(frozen=True)
class Column:
    """One column of the published schema."""

    name: str
    kind: str
    min: float | None = None
    max: float | None = None
    categories: tuple[Category, ...] = ()
    nullable: bool = True
    missing: tuple[Category, ...] = ()
    description: str = ""
    unit: str = ""
    decimals: int | None = None  # recording precision of a continuous column (public)
    event: str = ""  # survival_time: the binary column saying whether the event happened
    group: str = ""  # the code set a binary column belongs to (see "codeset")
    # optional readable names of categories, (category, label) pairs: reports show them
    labels: tuple[tuple[Category, str], ...] = ()

    @property
    def is_numeric(self) -> bool:
        return self.kind in NUMERIC_KINDS

    @property
    def is_categorical(self) -> bool:
        return self.kind in CATEGORICAL_KINDS

    @property
    def numeric_categories(self) -> bool:
        """Categories written as numbers match '1', '1.0' and 1 alike in a file."""
        return bool(self.categories) and all(
            isinstance(c, int | float) and not isinstance(c, bool) for c in self.categories
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.is_numeric:
            out["min"], out["max"] = self.min, self.max
        if self.kind == "categorical":
            out["categories"] = list(self.categories)
        if self.kind == "binary" and tuple(self.categories) != (0, 1):
            out["categories"] = list(self.categories)
        out["nullable"] = self.nullable
        if self.missing:
            out["missing"] = list(self.missing)
        if self.description:
            out["description"] = self.description
        if self.unit:
            out["unit"] = self.unit
        if self.decimals is not None:
            out["decimals"] = self.decimals
        if self.event:
            out["event"] = self.event
        if self.labels:
            out["labels"] = {k: v for k, v in self.labels}
        return out

    def label(self, category: object) -> str:
        """The category's readable name when the schema gives one, else the category."""
        for cat, text in self.labels:
            if str(cat) == str(category):
                return text
        return str(category)


@dataclass(frozen=True)
class Outcome:
    """The label that utility metrics (train on synthetic, test on real) predict."""

    column: str
    positive: tuple[Category, ...]


@dataclass(frozen=True)
class Schema:
    """A dataset's published schema; see the module docstring for the file format."""

    name: str
    columns: tuple[Column, ...]
    header: bool = True
    missing_tokens: tuple[str, ...] = ("",)
    outcome: Outcome | None = None
    description: str = ""
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    graph: CausalGraph | None = None  # optional causal DAG from domain knowledge (causal.py)
    # optional: the covariates domain knowledge names as prognostic for the survival
    # outcome (staging guidelines, not the rows); the marginal generator links only
    # these to (time, event) (docs/generators.md "Prognostic covariates")
    prognostic: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def codesets(self) -> dict[str, list[str]]:
        """Each code set's binary columns, in code-list order."""
        groups: dict[str, list[str]] = {}
        for c in self.columns:
            if c.group:
                groups.setdefault(c.group, []).append(c.name)
        return groups

    def code_groups(self, codeset: str) -> dict[str, list[str]]:
        """The public groups of a code set as member column names ({} when it has none)."""
        spec = self.extra.get("_codesets", {}).get(codeset, {})
        if "groups" not in spec:
            return {}
        prefix = spec.get("prefix", f"{codeset}_")
        codes = [m[len(prefix):] for m in self.codesets[codeset]]
        groups, _ = resolve_code_groups(codes, spec["groups"])
        return {g: [prefix + c for c in members] for g, members in groups.items()}

    @property
    def survival_pairs(self) -> list[tuple[str, str]]:
        """(time column, event column) of every survival outcome."""
        return [(c.name, c.event) for c in self.columns if c.kind == "survival_time"]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"column {name!r} is not in schema {self.name!r}; it has {self.names}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        if self.source:
            out["source"] = self.source
        out["format"] = {"header": self.header, "missing": list(self.missing_tokens)}
        if self.outcome is not None:
            out["outcome"] = {
                "column": self.outcome.column,
                "positive": list(self.outcome.positive),
            }
        cols: list[dict[str, Any]] = []
        done: set[str] = set()
        for c in self.columns:
            if not c.group:
                cols.append(c.to_dict())
            elif c.group not in done:
                done.add(c.group)
                members = [m for m in self.columns if m.group == c.group]
                spec = self.extra.get("_codesets", {}).get(c.group, {})
                prefix = spec.get("prefix", f"{c.group}_")
                cols.append(
                    {
                        "name": c.group,
                        "kind": "codeset",
                        "prefix": prefix,
                        "codes": [m.name[len(prefix):] for m in members],
                        **({"groups": spec["groups"]} if "groups" in spec else {}),
                    }
                )
        out["columns"] = cols
        if self.graph is not None:
            out["graph"] = self.graph.to_dict()
        if self.prognostic:
            out["prognostic"] = list(self.prognostic)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<schema>") -> Schema:
        return _parse_schema(raw, source)

    @classmethod
    def load(cls, path: str | Path) -> Schema:
        path = Path(path)
        hint = "pass the study's published schema (YAML or JSON) with --schema"
        if path.is_dir():
            raise SchemaError(f"schema file {path} is a folder; {hint}")
        if not path.is_file():
            raise SchemaError(f"schema file {path} does not exist; {hint}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # a table, a model, a spreadsheet given by mistake
            raise SchemaError(f"schema file {path} is not a text file (YAML or JSON); "
                              f"{hint}") from None
        except OSError as exc:
            raise SchemaError(f"schema file {path} cannot be read: {exc.strerror or exc}"
                              ) from None
        try:
            raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise SchemaError(f"schema file {path} is not valid YAML/JSON: {exc}") from exc
        return _parse_schema(raw, str(path))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _parse_schema(raw: Any, source: str) -> Schema:
    """A Schema from a parsed file, or one SchemaError listing every problem found.

    Each part (format, columns, outcome) adds its problems to one list, so a data
    manager sees all of them at once, as ``fedsynth check`` does for a table.
    """
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise SchemaError(f"{source}: a schema is a mapping with 'name' and 'columns'")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        problems.append("'name' must be a non-empty string")
        name = "?"
    header, missing_tokens = _parse_format(raw.get("format", {}) or {}, problems)
    columns, codesets = _parse_columns(raw.get("columns"), problems)
    by_name = {c.name: c for c in columns}
    for c in columns:
        if c.event and (c.event not in by_name or by_name[c.event].kind != "binary"):
            problems.append(f"column {c.name!r}: event column {c.event!r} must be a declared "
                            "binary column")
    members = {c.name for c in columns} | set(codesets)
    outcome = _parse_outcome(raw, by_name, members, problems)
    prognostic = _parse_prognostic(raw.get("prognostic"), by_name, problems)
    graph = None
    if raw.get("graph") is not None and not problems:
        try:
            graph = parse_graph(raw["graph"], [c.name for c in columns])
        except GraphError as exc:
            problems.append(str(exc))
    if problems:
        raise SchemaError(
            f"schema {source} has {len(problems)} problem(s):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    known = {"name", "format", "columns", "outcome", "target", "description", "source",
             "_codesets", "graph", "prognostic"}
    return Schema(
        name=name,
        columns=tuple(columns),
        header=header,
        missing_tokens=missing_tokens,
        outcome=outcome,
        description=str(raw.get("description", "")),
        source=str(raw.get("source", "")),
        extra={**{k: v for k, v in raw.items() if k not in known}, "_codesets": codesets},
        graph=graph,
        prognostic=prognostic,
    )


def _parse_prognostic(raw: Any, by_name: dict[str, Column], problems: list[str]
                      ) -> tuple[str, ...]:
    """``prognostic``: a list of declared columns, none of them a survival time or event,
    for a schema with a survival outcome."""
    if raw is None:
        return ()
    survival = {c.name for c in by_name.values() if c.kind == "survival_time"}
    survival |= {c.event for c in by_name.values() if c.kind == "survival_time"}
    if not survival:
        problems.append("'prognostic' names covariates of a survival outcome, but no column "
                        "is a survival_time: remove it or declare the outcome")
        return ()
    if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
        problems.append("'prognostic' must be a list of column names")
        return ()
    bad = [n for n in raw if n not in by_name or n in survival]
    if bad:
        problems.append(f"'prognostic' names {bad}: each must be a declared column other "
                        "than the survival time and event")
    return tuple(dict.fromkeys(raw))


def _parse_format(fmt: Any, problems: list[str]) -> tuple[bool, tuple[str, ...]]:
    """``format``: whether the file has a header row, and the tokens that mean missing."""
    if not isinstance(fmt, dict):
        problems.append("'format' must be a mapping (header, missing)")
        fmt = {}
    header = fmt.get("header", True)
    if not isinstance(header, bool):
        problems.append("'format.header' must be true or false")
        header = True
    tokens = fmt.get("missing", [])
    if not isinstance(tokens, list):
        problems.append("'format.missing' must be a list of tokens")
        tokens = []
    return header, tuple(dict.fromkeys(["", *[str(t) for t in tokens]]))


def _parse_columns(
    raw_cols: Any, problems: list[str]
) -> tuple[list[Column], dict[str, dict[str, Any]]]:
    """``columns``: every column (a code set expands to one binary column per code)."""
    columns: list[Column] = []
    codesets: dict[str, dict[str, Any]] = {}
    if not isinstance(raw_cols, list) or not raw_cols:
        problems.append("'columns' must be a non-empty list")
        raw_cols = []
    seen: set[str] = set()
    for i, rc in enumerate(raw_cols):
        where = f"columns[{i}]"
        if not isinstance(rc, dict):
            problems.append(f"{where} must be a mapping")
            continue
        cname = rc.get("name")
        if not isinstance(cname, str) or not cname:
            problems.append(f"{where}: 'name' must be a non-empty string")
            continue
        where = f"column {cname!r}"
        if rc.get(DRAFT_MARK):
            problems.append(
                f"{where}: unreviewed draft ({rc[DRAFT_MARK]}); write public bounds and "
                f"delete its '{DRAFT_MARK}' entry"
            )
        if cname in seen:
            problems.append(f"{where} is declared twice")
        seen.add(cname)
        kind = rc.get("kind")
        if kind not in KINDS:
            problems.append(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
        elif kind == "codeset":
            members = _parse_codeset(rc, cname, where, seen, problems)
            if members is not None:
                codesets[cname] = {"prefix": str(rc.get("prefix", f"{cname}_"))}
                if rc.get("groups") is not None:
                    codes = [str(c) for c in rc["codes"]]
                    _, group_problems = resolve_code_groups(codes, rc["groups"])
                    problems += [f"{where}: {p}" for p in group_problems]
                    codesets[cname]["groups"] = rc["groups"]
                columns += members
        else:
            columns.append(_parse_column(rc, cname, kind, where, problems))
    return columns, codesets


def _parse_codeset(
    rc: dict[str, Any], cname: str, where: str, seen: set[str], problems: list[str]
) -> list[Column] | None:
    """A code set's member columns (binary, one per public code), or None if unusable."""
    codes = rc.get("codes")
    prefix = str(rc.get("prefix", f"{cname}_"))
    if not isinstance(codes, list) or not codes:
        problems.append(f"{where}: a codeset needs a non-empty public 'codes' list")
        return None
    if len(set(map(str, codes))) != len(codes):
        problems.append(f"{where}: codes repeat")
    members = []
    for code in codes:
        member = f"{prefix}{code}"
        if member in seen:
            problems.append(f"column {member!r} (code {code} of {cname}) is declared twice")
        seen.add(member)
        members.append(Column(name=member, kind="binary", categories=(0, 1), nullable=False,
                              group=cname))
    return members


def resolve_code_groups(codes: list[str], spec: Any) -> tuple[dict[str, list[str]], list[str]]:
    """A code set's groups (name -> codes, in code-list order) and the problems found.

    ``{prefix: N}``: codes sharing their first N characters form one group, named by
    them. Otherwise a mapping of group name to codes and inclusive ranges ``"lo..hi"``
    (compared as strings of the same length as ``lo``), covering every code once.
    """
    if not isinstance(spec, dict) or not spec:
        return {}, ["'groups' must be {prefix: N} or a mapping of group name to a list of "
                    "codes and 'lo..hi' ranges"]
    if set(spec) == {"prefix"}:
        n = spec["prefix"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            return {}, [f"'groups.prefix' must be a positive whole number of characters, "
                        f"got {n!r}"]
        out: dict[str, list[str]] = {}
        for c in codes:
            out.setdefault(c[:n], []).append(c)
        return out, []
    problems: list[str] = []
    owner: dict[str, str] = {}
    for name, items in spec.items():
        if not isinstance(items, list) or not items:
            problems.append(f"group {name!r} needs a non-empty list of codes or 'lo..hi' ranges")
            continue
        for item in map(str, items):
            lo, sep, hi = item.partition("..")
            hits = ([c for c in codes if len(c) == len(lo) and lo <= c <= hi] if sep
                    else [c for c in codes if c == item])
            if not hits:
                problems.append(f"group {name!r}: {item!r} matches no code of the list")
            for c in hits:
                if c in owner and owner[c] != str(name):
                    problems.append(f"code {c!r} is in groups {owner[c]!r} and {name!r}")
                owner[c] = str(name)
    missing = [c for c in codes if c not in owner]
    if missing and not problems:
        problems.append(f"{len(missing)} code(s) belong to no group (first: {missing[:5]}); "
                        "add them to a group or use {prefix: N}")
    out = {}
    for c in codes:
        if c in owner:
            out.setdefault(owner[c], []).append(c)
    return out, problems


def _parse_domain(
    rc: dict[str, Any], kind: str, where: str, problems: list[str]
) -> tuple[float | None, float | None, tuple[Category, ...]]:
    """A column's public domain: (min, max) for numbers, categories otherwise."""
    if kind in NUMERIC_KINDS:
        lo, hi = _number(rc.get("min")), _number(rc.get("max"))
        if lo is None or hi is None:
            problems.append(
                f"{where}: a {kind} column needs numeric 'min' and 'max' from domain "
                "knowledge (never fitted on the private rows)"
            )
        elif not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
            problems.append(f"{where}: needs finite min < max, got {lo} and {hi}")
        elif kind == "survival_time" and lo < 0:
            problems.append(f"{where}: a survival time cannot be negative (min {lo})")
        return lo, hi, ()
    default = [0, 1] if kind == "binary" else None
    raw_cats = rc.get("categories", default)
    if not isinstance(raw_cats, list) or not raw_cats:
        problems.append(f"{where}: a {kind} column needs a non-empty 'categories' list")
        return None, None, ()
    cats = tuple(raw_cats)
    if len(set(map(str, cats))) != len(cats):
        problems.append(f"{where}: categories repeat: {list(cats)}")
    if kind == "binary" and len(cats) != 2:
        problems.append(f"{where}: a binary column has exactly two categories")
    return None, None, cats


def _parse_column(
    rc: dict[str, Any], cname: str, kind: str, where: str, problems: list[str]
) -> Column:
    """One (non-code-set) column: its domain, missing values, labels and display."""
    event = ""
    if kind == "survival_time":
        event = str(rc.get("event", ""))
        if not event:
            problems.append(f"{where}: a survival_time names its binary 'event' column")
    lo, hi, cats = _parse_domain(rc, kind, where, problems)
    nullable = rc.get("nullable", True)
    if not isinstance(nullable, bool):
        problems.append(f"{where}: 'nullable' must be true or false")
        nullable = True
    miss = rc.get("missing", [])
    if not isinstance(miss, list):
        problems.append(f"{where}: 'missing' must be a list of codes")
        miss = []
    if miss and not nullable:
        problems.append(f"{where}: has missing codes but nullable is false")
    raw_labels = rc.get("labels", {}) or {}
    labels: tuple[tuple[Category, str], ...] = ()
    if not isinstance(raw_labels, dict):
        problems.append(f"{where}: 'labels' maps categories to names, e.g. {{1: typical}}")
    else:
        unknown = [k for k in raw_labels if str(k) not in {str(c) for c in cats}]
        if unknown:
            problems.append(f"{where}: labels for categories it does not have: {unknown}")
        labels = tuple((k, str(v)) for k, v in raw_labels.items())
    decimals = rc.get("decimals")
    if decimals is not None and (not isinstance(decimals, int) or decimals < 0):
        problems.append(f"{where}: 'decimals' must be a whole number >= 0")
        decimals = None
    return Column(
        name=cname,
        kind=kind,
        min=lo,
        max=hi,
        categories=cats,
        nullable=nullable,
        missing=tuple(miss),
        description=str(rc.get("description", "")),
        unit=str(rc.get("unit", "")),
        decimals=decimals,
        event=event,
        labels=labels,
    )


def _parse_outcome(
    raw: dict[str, Any], by_name: dict[str, Column], declared: set[str], problems: list[str]
) -> Outcome | None:
    """The TSTR label: ``target`` (a binary column) or ``outcome`` (column, positives)."""
    outcome = None
    if raw.get("target") is not None:  # short form of outcome for a binary label
        target = raw["target"]
        col = by_name.get(target) if isinstance(target, str) else None
        if raw.get("outcome") is not None:
            problems.append("give either 'target' or 'outcome', not both")
        elif col is None or col.kind != "binary":
            problems.append("'target' names a declared binary column (its second category is "
                            "the positive class); for another label use 'outcome'")
        else:
            outcome = Outcome(column=col.name, positive=(col.categories[-1],))
    if raw.get("outcome") is not None:
        ro = raw["outcome"]
        if not isinstance(ro, dict) or ro.get("column") not in declared:
            problems.append("'outcome.column' must name a declared column")
        else:
            pos = ro.get("positive")
            if not isinstance(pos, list) or not pos:
                problems.append("'outcome.positive' must list the values that count as positive")
            else:
                outcome = Outcome(column=ro["column"], positive=tuple(pos))
    return outcome
