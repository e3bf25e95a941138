"""A study's causal graph: a DAG over schema columns, from domain knowledge only.

The coordinator may publish, in the schema file, a ``graph`` section that names each
column's direct causes (its parents). It is written by clinicians, never learnt from
private rows in clear, so publishing it costs no privacy::

    graph:
      trestbps: [age]        # blood pressure rises with age
      num: [age, sex]        # coronary disease: older men first
      cp: [num]              # the disease produces the chest pain

A column the section does not name is a root (no parents). The graph is checked when
the schema is read: every node is a schema column, no column is its own parent, and
there is no directed cycle (the error names the cycle).

What generators and validators need from it lives here too: a topological order, each
node's family (the node and its parents, the marginal that encodes its mechanism),
descendants, and the do-operator (``intervened``: the graph with the incoming edges of
the intervened columns cut). ``local_independences`` lists the conditional
independences the graph implies through the local Markov property.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import FedsynthError


class GraphError(FedsynthError, ValueError):
    """The causal graph is not a DAG over the schema's columns."""


class CausalError(FedsynthError, ValueError):
    """An interventional request that cannot be met (no graph, unknown column...)."""


@dataclass(frozen=True)
class CausalGraph:
    """Parents of every node (columns absent from ``parents`` are roots)."""

    parents: Mapping[str, tuple[str, ...]]

    def __hash__(self) -> int:  # a schema (frozen, hashable) holds one
        return hash(tuple(sorted((c, tuple(p)) for c, p in self.parents.items())))

    # -- structure -------------------------------------------------------------------
    @property
    def nodes(self) -> list[str]:
        seen: dict[str, None] = {}
        for child, pas in self.parents.items():
            for p in pas:
                seen.setdefault(p, None)
            seen.setdefault(child, None)
        return list(seen)

    @property
    def edges(self) -> list[tuple[str, str]]:
        return [(p, c) for c, pas in self.parents.items() for p in pas]

    def parents_of(self, node: str) -> tuple[str, ...]:
        return tuple(self.parents.get(node, ()))

    def children_of(self, node: str) -> list[str]:
        return [c for c, pas in self.parents.items() if node in pas]

    def family(self, node: str) -> tuple[str, ...]:
        """The node's parents then the node: the marginal of its mechanism."""
        return (*self.parents_of(node), node)

    def topological_order(self, columns: Sequence[str] | None = None) -> list[str]:
        """Every node (and every extra column in ``columns``, as a root), parents first.

        Ties are broken by the order of ``columns`` (the schema's), so the order is
        stable across processes.
        """
        names = list(columns) if columns is not None else self.nodes
        names += [n for n in self.nodes if n not in names]
        remaining = {n: set(self.parents_of(n)) for n in names}
        order: list[str] = []
        while remaining:
            ready = [n for n in names if n in remaining and not remaining[n]]
            if not ready:
                raise GraphError(f"the causal graph has a cycle: {' -> '.join(_cycle(self))}")
            for n in ready:
                order.append(n)
                del remaining[n]
            for pas in remaining.values():
                pas.difference_update(ready)
        return order

    def descendants(self, node: str) -> set[str]:
        out: set[str] = set()
        stack = [node]
        while stack:
            for c in self.children_of(stack.pop()):
                if c not in out:
                    out.add(c)
                    stack.append(c)
        return out

    def ancestors(self, node: str) -> set[str]:
        out: set[str] = set()
        stack = [node]
        while stack:
            for p in self.parents_of(stack.pop()):
                if p not in out:
                    out.add(p)
                    stack.append(p)
        return out

    # -- do-operator ----------------------------------------------------------------------
    def intervened(self, columns: Iterable[str]) -> CausalGraph:
        """The mutilated graph of do(columns): their incoming edges are cut."""
        cut = set(columns)
        return CausalGraph({c: (() if c in cut else pas) for c, pas in self.parents.items()})

    # -- implied independences -------------------------------------------------------------
    def local_independences(self, columns: Sequence[str] | None = None
                            ) -> list[tuple[str, str, tuple[str, ...]]]:
        """(X, Y, parents of X) for every non-descendant Y of X that is not a parent.

        The local Markov property: each node is independent of its non-descendants
        given its parents. Together these imply every d-separation of the graph, and
        each one is a testable statement on a table. A pair is listed once, conditioned
        on the parents of whichever comes later in the topological order.
        """
        order = self.topological_order(columns)
        out: list[tuple[str, str, tuple[str, ...]]] = []
        for i, x in enumerate(order):
            pas = self.parents_of(x)
            for y in order[:i]:
                if y not in pas and y not in self.descendants(x):
                    out.append((x, y, pas))
        return out

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, list[str]]:
        return {c: list(pas) for c, pas in self.parents.items() if pas}


def parse_graph(raw: Any, columns: Sequence[str], where: str = "graph") -> CausalGraph:
    """A checked graph from a schema's ``graph`` section (child -> list of parents).

    Raises :class:`GraphError` listing every problem: a malformed section, a node that
    is not a schema column, a self-loop, a repeated parent, a directed cycle.
    """
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise GraphError(f"'{where}' must map each column to the list of its direct causes, "
                         "e.g. {trestbps: [age]}")
    known = set(columns)
    parents: dict[str, tuple[str, ...]] = {}
    for child, pas in raw.items():
        child = str(child)
        if pas is None:
            pas = []
        if isinstance(pas, str):
            pas = [pas]
        if not isinstance(pas, list):
            problems.append(f"'{where}.{child}' must be a list of parent columns")
            continue
        pas = [str(p) for p in pas]
        for name in [child, *pas]:
            if name not in known:
                problems.append(f"'{where}': {name!r} is not a column of the schema; the graph "
                                "may only name declared columns")
        if child in pas:
            problems.append(f"'{where}.{child}': a column cannot be its own cause")
        if len(set(pas)) != len(pas):
            problems.append(f"'{where}.{child}': parents repeat: {pas}")
        parents[child] = tuple(dict.fromkeys(p for p in pas if p != child))
    graph = CausalGraph(parents)
    if not problems:
        cycle = _cycle(graph)
        if cycle:
            problems.append(f"'{where}' has a directed cycle: {' -> '.join(cycle)}; a causal "
                            "graph must be acyclic (remove one of these edges)")
    if problems:
        raise GraphError("the causal graph has problem(s):\n"
                         + "\n".join(f"  - {p}" for p in problems))
    return graph


def _cycle(graph: CausalGraph) -> list[str]:
    """One directed cycle as [a, b, ..., a], or [] when the graph is acyclic."""
    colour: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        colour[n] = 1
        stack.append(n)
        for c in graph.children_of(n):
            if colour.get(c) == 1:
                return [*stack[stack.index(c):], c]
            if c not in colour and (found := visit(c)):
                return found
        stack.pop()
        colour[n] = 2
        return []

    for n in graph.nodes:
        if n not in colour and (found := visit(n)):
            return found
    return []


def parse_interventions(items: Sequence[str]) -> dict[str, str]:
    """``["col=value", ...]`` (the CLI's ``--intervene``) as a mapping of raw strings.

    Values stay strings; the generator matches them to the schema (categories written
    as numbers match, numbers are checked against the column's domain).
    """
    out: dict[str, str] = {}
    for item in items:
        col, sep, value = item.partition("=")
        if not sep or not col.strip() or not value.strip():
            raise CausalError(f"--intervene {item!r}: write it as column=value, e.g. cp=4")
        if col.strip() in out:
            raise CausalError(f"--intervene names {col.strip()!r} twice")
        out[col.strip()] = value.strip()
    return out
