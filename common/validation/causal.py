"""Causal validation: does a table behave as the study's causal graph says?

Two checks, run on the real holdout and on the synthetic table alike, so the report
shows where they disagree:

- **Implied independences.** Every conditional independence of the graph's local
  Markov property (``CausalGraph.local_independences``: a node is independent of its
  non-descendants given its parents) is tested with causal-learn's G-squared test on
  the columns cut into the marginal generator's cells (numeric columns in ``bins``
  equal-width bins of their public range, missing as its own cell). A statement
  "holds" when the test does not reject it at ``alpha``. The share that holds on real
  data says how well the graph fits the data; the share on which real and synthetic
  agree says whether the generator kept the graph's structure.
- **Edge signs.** For each edge parent -> child, the child is regressed (least squares)
  on all its parents, categories coded by their numeric value (ordinal severity in
  this data: ``num``, ``ca``, ``slope``...; columns with text categories are left out),
  rows with a missing value dropped. The sign of the parent's coefficient is compared
  between real and synthetic, over the edges whose real coefficient is significant.

``ate`` estimates an average treatment effect as a difference in means with a
normal-approximation 95% interval: from two interventional samples it is the causal
effect; from two conditional (observational) samples it is the naive contrast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..causal import CausalGraph
from ..generators.marginal.discretize import Discretizer
from ..schema import Schema
from .context import Context
from .data import MISSING
from .metric import MetricValue, metric


@dataclass
class IndependenceResult:
    x: str
    y: str
    given: tuple[str, ...]
    p_real: float
    p_synthetic: float

    def holds(self, alpha: float) -> tuple[bool, bool]:
        return self.p_real > alpha, self.p_synthetic > alpha


@dataclass
class EdgeSign:
    parent: str
    child: str
    coef_real: float
    p_real: float
    coef_synthetic: float

    @property
    def agrees(self) -> bool:
        return bool(np.sign(self.coef_real) == np.sign(self.coef_synthetic))


def _pvalues(cells: np.ndarray, names: list[str],
             tests: list[tuple[str, str, tuple[str, ...]]]) -> list[float]:
    from causallearn.utils.cit import CIT

    # G-squared on cell indices; drop constant columns' degenerate cases to p = 1
    cit = CIT(cells.astype(np.int64), "gsq")
    idx = {a: i for i, a in enumerate(names)}
    out = []
    for x, y, z in tests:
        try:
            out.append(float(cit(idx[x], idx[y], [idx[a] for a in z])))
        except (ValueError, ZeroDivisionError, IndexError):
            out.append(1.0)
    return out


def independences(real: pd.DataFrame, synthetic: pd.DataFrame, schema: Schema,
                  graph: CausalGraph, bins: int = 5,
                  site_column: str | None = None) -> list[IndependenceResult]:
    """Every local-Markov independence tested on both tables (see the module doc).

    With ``site_column`` (present in both tables) every test also conditions on the
    hospital: the graph's statements are about patients within one hospital, and
    pooling hospitals that differ in case mix adds a common cause of every column that
    the graph leaves out.
    """
    disc = Discretizer(schema, bins, group_codes=False)  # the graph names columns, not groups
    tests = graph.local_independences(schema.names)
    names = list(disc.names)
    cells = [disc.encode(real), disc.encode(synthetic)]
    if site_column is not None:
        codes = {s: i for i, s in enumerate(sorted(
            set(real[site_column].astype(str)) | set(synthetic[site_column].astype(str))))}
        cells = [np.column_stack([c, f[site_column].astype(str).map(codes).to_numpy()])
                 for c, f in zip(cells, (real, synthetic), strict=True)]
        names.append(site_column)
        tests = [(x, y, (*z, site_column)) for x, y, z in tests]
    pr = _pvalues(cells[0], names, tests)
    ps = _pvalues(cells[1], names, tests)
    return [IndependenceResult(x, y, z, a, b)
            for (x, y, z), a, b in zip(tests, pr, ps, strict=True)]


def _numeric(frame: pd.DataFrame, schema: Schema, columns: list[str]) -> pd.DataFrame | None:
    out = {}
    for c in columns:
        col = schema.column(c)
        if col.is_categorical and not col.numeric_categories:
            return None
        out[c] = pd.to_numeric(frame[c], errors="coerce").astype(float)
    return pd.DataFrame(out).dropna()


def edge_signs(real: pd.DataFrame, synthetic: pd.DataFrame, schema: Schema,
               graph: CausalGraph) -> list[EdgeSign]:
    """Each edge's adjusted coefficient on both tables (see the module doc)."""
    import statsmodels.api as sm

    out: list[EdgeSign] = []
    for child in graph.nodes:
        pas = list(graph.parents_of(child))
        if not pas:
            continue
        fits = []
        for frame in (real, synthetic):
            data = _numeric(frame, schema, [child, *pas])
            if data is None or len(data) <= len(pas) + 2 or data[child].std() == 0:
                fits.append(None)
                continue
            x = data[pas]
            keep = [c for c in pas if x[c].std() > 0]
            res = sm.OLS(data[child], sm.add_constant(x[keep], has_constant="add")).fit()
            fits.append({c: (float(res.params.get(c, 0.0)), float(res.pvalues.get(c, 1.0)))
                         for c in pas})
        if fits[0] is None or fits[1] is None:
            continue
        for p in pas:
            out.append(EdgeSign(p, child, fits[0][p][0], fits[0][p][1], fits[1][p][0]))
    return out


def causal_report(real: pd.DataFrame, synthetic: pd.DataFrame, schema: Schema,
                  graph: CausalGraph | None = None, alpha: float = 0.05,
                  bins: int = 5, site_column: str | None = None) -> dict[str, Any]:
    """Shares of independences that hold, their agreement, and edge-sign agreement
    (independences within hospitals when ``site_column`` names one in both tables)."""
    graph = graph or schema.graph
    if graph is None:
        raise ValueError(f"schema {schema.name!r} publishes no causal graph")
    ind = independences(real, synthetic, schema, graph, bins, site_column)
    held = [r.holds(alpha) for r in ind]
    signs = edge_signs(real, synthetic, schema, graph)
    sig = [s for s in signs if s.p_real < alpha]
    return {
        "alpha": alpha,
        "implied_independences": len(ind),
        "hold_real": float(np.mean([h[0] for h in held])) if held else float("nan"),
        "hold_synthetic": float(np.mean([h[1] for h in held])) if held else float("nan"),
        "independence_agreement": (float(np.mean([a == b for a, b in held]))
                                   if held else float("nan")),
        "disagreements": [asdict(r) for r, h in zip(ind, held, strict=True) if h[0] != h[1]],
        "independences": [asdict(r) for r in ind],
        "edges_tested": len(signs),
        "edges_significant_real": len(sig),
        "edge_sign_agreement": (float(np.mean([s.agrees for s in sig])) if sig
                                else float("nan")),
        "edge_sign_agreement_all": (float(np.mean([s.agrees for s in signs])) if signs
                                    else float("nan")),
        "edges": [asdict(s) | {"agrees": s.agrees} for s in signs],
    }


def ate(treated: pd.Series, control: pd.Series) -> tuple[float, float, float]:
    """Difference in means with its normal-approximation 95% interval."""
    a = pd.to_numeric(treated, errors="coerce").dropna().to_numpy(dtype=float)
    b = pd.to_numeric(control, errors="coerce").dropna().to_numpy(dtype=float)
    d = float(a.mean() - b.mean())
    se = float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))
    return d, d - 1.96 * se, d + 1.96 * se


AREA = "causal"
#: Share of the significant real edge effects whose sign the synthetic table must keep.
EDGE_SIGN_THRESHOLD = 0.8


def _frame(ctx: Context, name: str, rows: int) -> pd.DataFrame:
    """A table as the discretizer reads it (missing as NaN), cut to ``rows`` rows: the
    tests' power grows with rows, so every table is compared at the holdout's size."""
    frame = ctx.table(name).frame(ctx.schema).iloc[:rows]
    return frame.replace(MISSING, np.nan)


def run(ctx: Context) -> list[MetricValue]:
    """The causal area: does the synthetic table keep what the schema's graph says?

    Runs only when the schema publishes a graph. The real holdout is the reference
    table; the same figures for the real training rows (at the holdout's size) say what
    new real patients score. Each implied independence and each edge is listed as a
    per-pair figure (p-values, coefficients), so the report shows where they disagree.
    """
    graph = ctx.schema.graph
    n = min(ctx.holdout.n, ctx.synthetic.n, ctx.train.n)
    if graph is None or n < 30:
        return []
    hold = _frame(ctx, "holdout", n)
    syn, train = _frame(ctx, "synthetic", n), _frame(ctx, "train", n)
    try:
        rep = causal_report(hold, syn, ctx.schema, graph)
        ref = causal_report(hold, train, ctx.schema, graph)
    except (KeyError, ValueError):  # a value off the schema: the fidelity area says so
        return []
    out = [
        metric("causal_independence_agreement", AREA, rep["independence_agreement"],
               "higher", "share of the graph's implied conditional independences on which "
               "the synthetic table and the real holdout agree (G-squared test, alpha "
               f"{rep['alpha']}, tables of {n} rows)",
               reference=ref["independence_agreement"],
               details={k: rep[k] for k in ("implied_independences", "hold_real",
                                            "hold_synthetic")}),
        metric("causal_edge_sign_agreement", AREA, rep["edge_sign_agreement"], "higher",
               "share of the graph's edges with a significant effect in the real holdout "
               "whose sign the synthetic table keeps (regression of each column on its "
               "causes)", reference=ref["edge_sign_agreement"],
               threshold=EDGE_SIGN_THRESHOLD,
               details={"edges_significant_real": rep["edges_significant_real"],
                        "edges_tested": rep["edges_tested"]}),
    ]
    for r in rep["independences"]:
        given = ", ".join(r["given"]) or "nothing"
        out.append(metric(
            "independence_p", AREA, r["p_synthetic"], "higher",
            f"p-value of '{r['x']} independent of {r['y']} given {given}' (reference: on "
            "the real holdout)", columns=(r["x"], r["y"], *r["given"]),
            reference=r["p_real"]))
    for e in rep["edges"]:
        out.append(metric(
            "edge_coefficient", AREA, e["coef_synthetic"], "higher",
            f"effect of {e['parent']} on {e['child']} adjusted for its other causes "
            f"(reference: real holdout, p = {e['p_real']:.3g})",
            columns=(e["parent"], e["child"]), reference=e["coef_real"]))
    return out
