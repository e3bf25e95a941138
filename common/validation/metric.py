"""The result types every validation metric returns.

A number alone says little about synthetic data: 0.93 is excellent for one metric and
poor for another, and even "perfect" depends on the data (two real samples of 184
patients never have identical marginals). So every value carries its direction, a
one-line meaning and a *reference*: the same metric computed for real held-out patients
against the real training patients, i.e. what a perfect generator (one that draws new
patients from the same population) would score on this data. A report can be built from
any list of these without knowing the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd

Direction = Literal["higher", "lower"]

#: The areas of the suite, in report order.
AREAS: tuple[str, ...] = (
    "fidelity",
    "diversity",
    "utility",
    "survival",
    "causal",
    "clustering",
    "detection",
    "privacy",
)


def _finite(value: float | None) -> float | None:
    """A JSON-safe float: NaN and infinities become None (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class MetricValue:
    """One computed figure with everything a reader needs to judge it.

    ``value`` is the synthetic data's score, ``reference`` the score of the real
    holdout against the real training data (what "perfect" looks like here). When a
    ``threshold`` is set, ``passed`` says whether ``value`` is on the good side of it
    (``>=`` for direction "higher", ``<=`` for "lower").
    """

    name: str
    area: str
    columns: tuple[str, ...] | None
    value: float
    direction: Direction
    meaning: str
    reference: float | None = None
    threshold: float | None = None
    passed: bool | None = None
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Name plus columns, unique within a result (e.g. ``ks[age]``)."""
        if not self.columns:
            return self.name
        return f"{self.name}[{', '.join(self.columns)}]"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "area": self.area,
            "columns": list(self.columns) if self.columns else None,
            "value": _finite(self.value),
            "reference": _finite(self.reference),
            "direction": self.direction,
            "meaning": self.meaning,
            "threshold": _finite(self.threshold),
            "passed": self.passed,
            "note": self.note,
            "details": _jsonable(self.details),
        }


def _jsonable(obj: Any) -> Any:
    """Turn numpy scalars, tuples and NaN in details into plain JSON values."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    try:
        return _finite(float(obj))
    except (TypeError, ValueError):
        return str(obj)


def judge(value: float, direction: Direction, threshold: float | None) -> bool | None:
    """Whether a value passes its threshold; None when there is no threshold or no value."""
    if threshold is None or value is None or not math.isfinite(value):
        return None
    return bool(value >= threshold) if direction == "higher" else bool(value <= threshold)


def metric(
    name: str,
    area: str,
    value: float,
    direction: Direction,
    meaning: str,
    *,
    columns: Sequence[str] | None = None,
    reference: float | None = None,
    threshold: float | None = None,
    note: str = "",
    details: dict[str, Any] | None = None,
) -> MetricValue:
    """Build a MetricValue and judge it against its threshold in one place."""
    value = float(value) if value is not None else math.nan
    return MetricValue(
        name=name,
        area=area,
        columns=tuple(columns) if columns else None,
        value=value,
        direction=direction,
        meaning=meaning,
        reference=None if reference is None else float(reference),
        threshold=threshold,
        passed=judge(value, direction, threshold),
        note=note,
        details=dict(details or {}),
    )


@dataclass
class ValidationResult:
    """All metrics of one validation run, plus the headline numbers a summary shows."""

    metrics: list[MetricValue]
    headline_values: dict[str, float | None] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def extend(self, values: Iterable[MetricValue]) -> None:
        self.metrics.extend(values)

    def by_area(self, area: str) -> list[MetricValue]:
        return [m for m in self.metrics if m.area == area]

    @property
    def areas(self) -> list[str]:
        present = {m.area for m in self.metrics}
        return [a for a in AREAS if a in present] + sorted(present - set(AREAS))

    def get(self, name: str, columns: Sequence[str] | None = None) -> MetricValue:
        """The metric with this name (and columns, when several have the name)."""
        wanted = tuple(columns) if columns else None
        hits = [
            m for m in self.metrics if m.name == name and (wanted is None or m.columns == wanted)
        ]
        if not hits:
            raise KeyError(f"no metric {name!r} with columns {wanted}")
        if len(hits) > 1:
            raise KeyError(f"{len(hits)} metrics are named {name!r}; pass their columns")
        return hits[0]

    def area_status(self, area: str) -> bool | None:
        """True when every judged metric of the area passes, None when none is judged."""
        judged = [m.passed for m in self.by_area(area) if m.passed is not None]
        if not judged:
            return None
        return all(judged)

    def failures(self, area: str | None = None) -> list[MetricValue]:
        return [m for m in self.metrics if m.passed is False and (area is None or m.area == area)]

    def headline(self) -> dict[str, float | None]:
        """The few numbers a summary line shows (see ``suite.HEADLINE``)."""
        return {k: _finite(v) for k, v in self.headline_values.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "headline": self.headline(),
            "areas": {a: self.area_status(a) for a in self.areas},
            "metrics": [m.to_dict() for m in self.metrics],
            "info": _jsonable(self.info),
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
        }

    def to_frame(self) -> pd.DataFrame:
        """One row per metric; columns joined with ', ' so the frame stays flat."""
        rows = []
        for m in self.metrics:
            rows.append(
                {
                    "area": m.area,
                    "name": m.name,
                    "columns": ", ".join(m.columns) if m.columns else None,
                    "value": m.value,
                    "reference": m.reference,
                    "direction": m.direction,
                    "threshold": m.threshold,
                    "passed": m.passed,
                    "meaning": m.meaning,
                    "note": m.note,
                }
            )
        return pd.DataFrame(
            rows,
            columns=[
                "area",
                "name",
                "columns",
                "value",
                "reference",
                "direction",
                "threshold",
                "passed",
                "meaning",
                "note",
            ],
        )
