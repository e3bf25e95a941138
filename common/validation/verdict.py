"""A study's verdict: per validation area, pass or fail, and what to do about a failure.

A table of metrics does not tell a researcher what to do next. The verdict reads the
judged metrics of a :class:`ValidationResult` (those with a threshold), calls an area
failed when one of its checks fails, and attaches advice that follows from what the
failing checks measure: a generator that is told apart from real patients or misses
part of the population has not learnt enough (more rounds, a larger budget, another
generator); one whose rows sit too close to training patients has learnt too much
(a smaller budget, fewer epochs). The console (``fedsynth simulate``/``validate``), the
report's top section and ``summary.json`` all show this one verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .metric import ValidationResult

# Why an area can fail and the usual remedies, in the order worth trying; ``{another}``
# is the generator to try next (``another_generator``), ``{longer}`` more training for
# the generators that train (``train_longer``; the marginal one measures once).
ADVICE: dict[str, str] = {
    "fidelity": "the synthetic columns or column pairs differ from the real ones: "
    "{longer}give the sites a larger budget (--epsilon), or {another}; the report's "
    "marginal and association plots show which columns are off",
    "diversity": "part of the real population is missing from the synthetic rows: "
    "{longer}give the sites a larger budget (--epsilon), or {another}",
    "utility": "a model trained on the synthetic rows predicts the target worse on real "
    "patients than one trained on real rows: {longer}give the sites a larger budget "
    "(--epsilon); check that --target is the label you care about",
    "survival": "survival curves or the Cox model differ from the real ones: {longer}give "
    "the sites a larger budget (--epsilon), or check the survival columns' bounds in the "
    "schema",
    "causal": "effects along the causal graph's edges point the other way in the synthetic "
    "rows: fit the marginal generator with causal=true (it measures each column with its "
    "causes, docs/causal.md), or give the sites a larger budget; the section lists each "
    "edge's effect on real and synthetic rows",
    "clustering": "the synthetic rows do not form the same patient groups: {longer}give the "
    "sites a larger budget (--epsilon), or {another}",
    "detection": "a classifier tells synthetic from real patients: the generator has not "
    "learnt the joint distribution well enough; {longer}raise the budget (--epsilon) or "
    "{another}",
    "privacy": "synthetic rows sit closer to training patients than new patients do: the "
    "generator memorises; lower the budget (--epsilon), train fewer epochs, and never "
    "release with --no-dp",
}


@dataclass(frozen=True)
class AreaVerdict:
    """One area's verdict: ``passed`` is None when the area has no judged metric."""

    area: str
    passed: bool | None
    checks: int
    failed: tuple[str, ...]  # the labels of the failing checks
    advice: str = ""

    @property
    def word(self) -> str:
        return {True: "pass", False: "fail", None: "not judged"}[self.passed]


@dataclass(frozen=True)
class Verdict:
    """The whole study's verdict: every area's, and a one-line overall sentence."""

    areas: tuple[AreaVerdict, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def failing(self) -> list[AreaVerdict]:
        return [a for a in self.areas if a.passed is False]

    @property
    def passed(self) -> bool:
        return not self.failing

    @property
    def headline(self) -> str:
        judged = [a for a in self.areas if a.passed is not None]
        if not judged:
            return "no area could be judged (no metric has a threshold on this data)"
        if self.passed:
            return f"all {len(judged)} judged areas pass"
        names = ", ".join(a.area for a in self.failing)
        return f"{len(self.failing)} of {len(judged)} judged areas fail: {names}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "headline": self.headline,
            "areas": {
                a.area: {"verdict": a.word, "checks": a.checks, "failed": list(a.failed),
                         "advice": a.advice}
                for a in self.areas
            },
            "notes": list(self.notes),
        }


#: The deep generators (DP-SGD); the other family is ``marginal``.
DEEP = ("tvae", "ctgan", "ddpm")


def another_generator(generator: str | None) -> str:
    """Which generator to try when this one has not learnt enough.

    Why marginal first after a deep one: on the default study (heart disease, 4
    hospitals, epsilon 3, three seeds) the TVAE failed clustering and detection in every
    seed, the marginal generator with the schema's causal graph failed at most
    detection (docs/generators.md, "Which generator")."""
    if generator in DEEP:
        return ("try the marginal generator (--generator marginal, and --generator-params "
                "'{\"causal\": true}' when the schema has a causal graph)")
    if generator == "marginal":
        return ("with a causal graph in the schema, fit it with --generator-params "
                "'{\"causal\": true}', or try a deep generator (--generator tvae|ddpm)")
    return "try another generator (--generator marginal|tvae|ddpm|ctgan)"


def train_longer(generator: str | None) -> str:
    """The advice's first remedy for a generator that has not learnt enough.

    Why by generator: the marginal generator measures its marginals once, whatever
    ``--rounds`` and ``--local-epochs`` say, so sending its users there changed nothing;
    only its budget (or another generator) helps."""
    if generator == "marginal":
        return ""
    return "train longer (--rounds, --local-epochs), "


def verdict(result: ValidationResult, rounds: int | None = None,
            generator: str | None = None) -> Verdict:
    """The verdict of ``result``; ``rounds`` (the study's) and ``generator`` (the one
    that made the synthetic rows) sharpen the advice."""
    areas = []
    another = another_generator(generator)
    for area in result.areas:
        judged = [m for m in result.by_area(area) if m.passed is not None]
        failed = tuple(m.label for m in judged if m.passed is False)
        status = None if not judged else not failed
        advice = (ADVICE.get(area, "").replace("{another}", another)
                  .replace("{longer}", train_longer(generator)) if failed else "")
        areas.append(AreaVerdict(area, status, len(judged), failed, advice))
    notes = []
    learnt_too_little = {"fidelity", "diversity", "detection", "utility"}
    trains = generator != "marginal"  # its rounds are not training rounds
    if trains and rounds is not None and rounds < 5 and any(a.area in learnt_too_little and
                                                 a.passed is False for a in areas):
        notes.append(f"the study ran only {rounds} round(s): a verdict after so few rounds "
                     "says little about the generator; run the default 10 or more")
    return Verdict(tuple(areas), tuple(notes))
