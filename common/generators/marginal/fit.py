"""Fitting and querying the graphical model with ``mbi`` (Private-PGM).

The model is a Markov random field over the attributes' cells, fitted to the noisy
marginals by ``mbi``'s mirror descent (its recommended estimator). Measurements of one
clique from several sites come in one of two forms:

- pooled: the sum of the sites' noisy counts, noise std sqrt(sum sigma_i^2) (what the
  coordinator sees under CKKS, and what a central fit produces);
- by site: the stacked per-site vectors as one measurement of the clique extended by
  the ``SITE`` attribute, each block weighted by 1 / sigma_i (so sites with different
  budgets are weighted by their precision). The model then knows each hospital's
  case mix, and site-conditional sampling is a clamp on ``SITE``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ._jax import mbi
from .outcome_split import Split
from .plan import CODES, LINKS, PAIRS, SPLIT

SITE = "__site__"
Clique = tuple[str, ...]


@dataclass
class Measurement:
    """A noisy marginal: pooled (``by_site`` empty) or one vector per site."""

    clique: Clique
    values: np.ndarray  # pooled: sum of the sites' noisy counts; by site: [S, cells]
    stddev: np.ndarray  # pooled: scalar std of the sum; by site: std of each site's noise
    by_site: bool = False
    kind: str = "measure"
    # per-cell noise relative to ``stddev`` (None: 1 everywhere). A bin made of w fine
    # cells is the sum of w noisy fine counts, so its noise std is sqrt(w) * stddev.
    cell_scale: np.ndarray | None = None
    # a ``SPLIT`` release: the outcome's cells summed into groups (outcome_split.py)
    split: Split | None = None

    def cells(self, sizes: dict[str, int]) -> int:
        return int(np.prod([sizes[a] for a in self.clique]))


@dataclass
class FitConfig:
    iters: int = 1000
    sites: list[str] = field(default_factory=list)  # non-empty: the model has SITE


def domain(sizes: dict[str, int], sites: Sequence[str]):  # noqa: ANN201 (mbi type)
    m = mbi()
    config = dict(sizes)
    if sites:
        config = {SITE: len(sites), **config}
    return m.Domain.fromdict(config)


def _pooled(meas: Measurement, values: np.ndarray) -> tuple[np.ndarray, float]:
    """A measurement's values and noise std as one release: the sites' vectors summed
    and their independent noises' variances added when it came per site."""
    if meas.by_site:
        return values.sum(axis=0), float(np.sqrt(np.sum(np.square(meas.stddev))))
    return values, float(meas.stddev)


def linear_measurements(measurements: Sequence[Measurement], sites: Sequence[str],
                        sizes: dict[str, int] | None = None) -> list:
    m = mbi()
    out = []
    for meas in measurements:
        if meas.kind == LINKS:  # a covariate's c = 1 slice of (c, *tail) (event_links.py)
            out.append(_slice(meas, sites, sizes or {}))
            continue
        if meas.kind == SPLIT:  # (*features, outcome) with the outcome collapsed
            out.append(_collapsed(meas, sites, sizes or {}))
            continue
        if meas.kind in (CODES, PAIRS):  # one count: a code's, or a pair's "both" cell
            out.append(_last_cell(meas, sites, 2 if meas.kind == CODES else 4))
            continue
        scale = (np.ones(meas.values.shape[-1]) if meas.cell_scale is None
                 else np.asarray(meas.cell_scale, dtype=float))
        if meas.by_site and sites:
            values = np.asarray(meas.values, dtype=float)  # [S, cells]
            sd = np.asarray(meas.stddev, dtype=float).reshape(-1, 1) * scale[None, :]
            weights = np.broadcast_to(1.0 / sd, values.shape).ravel()
            out.append(m.LinearMeasurement(
                (values / sd).ravel(), (SITE, *meas.clique), stddev=1.0,
                query=m.WeightedQuery(weights)))
            continue
        # per-site vectors but a pooled model: sum them
        values, sd = _pooled(meas, np.asarray(meas.values, dtype=float))
        if meas.cell_scale is None:
            out.append(m.LinearMeasurement(values, meas.clique, stddev=sd))
        else:
            out.append(m.LinearMeasurement(values / scale, meas.clique, stddev=sd,
                                           query=m.WeightedQuery(1.0 / scale)))
    return out


def _last_cell(meas: Measurement, sites: Sequence[str], cells: int):  # noqa: ANN202
    """One count as a measurement of the last of its clique's ``cells`` cells only: a
    code histogram entry is its binary attribute's cell 1 ("has it"), a pair count
    (``code_pairs.py``) its two codes' cell (1, 1) ("has both")."""
    m = mbi()
    values = np.asarray(meas.values, dtype=float)
    if meas.by_site and sites:
        sd = np.asarray(meas.stddev, dtype=float).reshape(-1)
        y = np.zeros((len(sites), cells))
        w = np.zeros((len(sites), cells))
        y[:, -1], w[:, -1] = values.reshape(len(sites), -1)[:, 0] / sd, 1.0 / sd
        return m.LinearMeasurement(y.ravel(), (SITE, *meas.clique), stddev=1.0,
                                   query=m.WeightedQuery(w.ravel()))
    values, sd = _pooled(meas, values)
    return m.LinearMeasurement(values.reshape(-1)[:1], meas.clique, stddev=sd,
                               query=m.SlicedQuery(cells - 1))


@dataclass(frozen=True, eq=False)
class MatrixQuery:
    """A fixed linear map of a clique's flat marginal (``matrix @ datavector``)."""

    matrix: np.ndarray

    def __call__(self, factor):  # noqa: ANN001, ANN204 (mbi Factor -> jax Array)
        import jax.numpy as jnp

        return jnp.asarray(self.matrix) @ factor.datavector()

    def op_norm_sq(self) -> float:
        return float(np.linalg.norm(self.matrix, 2) ** 2)

    def __hash__(self) -> int:  # identity, as mbi's WeightedQuery (JAX static tracing)
        return id(self)


def _collapsed(meas: Measurement, sites: Sequence[str], sizes: dict[str, int]):  # noqa: ANN202
    """A collapsed release (``outcome_split.py``) as a measurement of its whole clique
    through the split's summing matrix; per site, one block per site scaled by 1 / sigma."""
    m = mbi()
    assert meas.split is not None, "a SPLIT measurement carries its split"
    features = int(np.prod([sizes[a] for a in meas.clique[:-1]]))
    q = meas.split.matrix(features)
    values = np.asarray(meas.values, dtype=float)
    if meas.by_site and sites:
        sd = np.asarray(meas.stddev, dtype=float).reshape(-1)
        y = (values.reshape(len(sites), -1) / sd[:, None]).ravel()
        return m.LinearMeasurement(y, (SITE, *meas.clique), stddev=1.0,
                                   query=MatrixQuery(np.kron(np.diag(1.0 / sd), q)))
    values, sd = _pooled(meas, values)
    return m.LinearMeasurement(values.reshape(-1), meas.clique, stddev=sd,
                               query=MatrixQuery(q))


def _slice(meas: Measurement, sites: Sequence[str], sizes: dict[str, int]):  # noqa: ANN202
    """A link slice as a measurement of the covariate's "present" cells of its clique
    (weight 0 on the others): the covariate is the clique's first attribute, so its
    cell 1 is the second block of ``inner`` entries. A categorical covariate's slice is
    the whole clique (every cell measured)."""
    from .event_links import PRESENT

    m = mbi()
    inner = int(np.prod([sizes[a] for a in meas.clique[1:]]))
    full = sizes[meas.clique[0]] * inner
    values = np.asarray(meas.values, dtype=float)
    at = (slice(0, full) if values.shape[-1] == full
          else slice(PRESENT * inner, (PRESENT + 1) * inner))
    if meas.by_site and sites:
        sd = np.asarray(meas.stddev, dtype=float).reshape(-1, 1)
        y, w = np.zeros((len(sites), full)), np.zeros((len(sites), full))
        y[:, at] = values.reshape(len(sites), -1) / sd
        w[:, at] = 1.0 / sd
        return m.LinearMeasurement(y.ravel(), (SITE, *meas.clique), stddev=1.0,
                                   query=m.WeightedQuery(w.ravel()))
    values, sd = _pooled(meas, values)
    y, w = np.zeros(full), np.zeros(full)
    y[at], w[at] = values.reshape(-1), 1.0
    return m.LinearMeasurement(y, meas.clique, stddev=sd, query=m.WeightedQuery(w))


def estimate(
    sizes: dict[str, int], measurements: Sequence[Measurement], sites: Sequence[str],
    iters: int, warm_start=None,  # noqa: ANN001 (an mbi model)
):  # noqa: ANN201
    """Fit the MRF to the measurements (warm-started from the previous fit if given)."""
    m = mbi()
    dom = domain(sizes, sites)
    lms = linear_measurements(measurements, sites, sizes)
    return m.estimation.MirrorDescent().estimate(
        dom, lms, known_total=noisy_total(measurements), iters=iters, warm_start=warm_start)


def noisy_total(measurements: Sequence[Measurement]) -> float:
    """The number of rows, as the mean of the 1-way measurements' sums (post-processing)."""
    sums = [float(np.sum(m.values)) for m in measurements
            if len(m.clique) == 1 and m.kind not in (CODES, PAIRS, LINKS, SPLIT)]
    sums = sums or [float(np.sum(m.values)) for m in measurements]
    return max(1.0, float(np.mean(sums)) if sums else 1.0)


def model_cells(sizes: dict[str, int], cliques: Sequence[Clique], sites: Sequence[str]) -> int:
    """Cells of the junction tree's maximal cliques: what inference stores and sweeps."""
    m = mbi()
    dom = domain(sizes, sites)
    full = [((SITE,) + tuple(c)) if sites else tuple(c) for c in cliques]
    tree, _ = m.junction_tree.make_junction_tree(dom, full)
    return int(sum(dom.size(cl) for cl in m.junction_tree.maximal_cliques(tree)))


def projected(model, clique: Clique) -> np.ndarray:  # noqa: ANN001
    """The model's counts on ``clique`` (flattened in the clique's order)."""
    return np.asarray(model.project(tuple(clique)).datavector(flatten=True), dtype=float)


# -- a fitted model as flat arrays (save / load / a Flower ArrayRecord) -----------------
def model_to_arrays(model, names: Sequence[str]) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Potentials by clique, cliques as attribute indices, and the total."""
    attrs = list(model.domain.attributes)
    out: dict[str, np.ndarray] = {"total": np.array([float(model.total)])}
    cliques = list(model.cliques)
    width = max(len(c) for c in cliques)
    idx = np.full((len(cliques), width), -1, dtype=np.int64)
    for i, cl in enumerate(cliques):
        idx[i, : len(cl)] = [attrs.index(a) for a in cl]
        out[f"potential.{i}"] = np.asarray(model.potentials[cl].values, dtype=np.float64)
    out["cliques"] = idx
    out["domain"] = np.asarray(model.domain.shape, dtype=np.int64)
    return out


def model_from_arrays(arrays: dict[str, np.ndarray], attrs: Sequence[str]):  # noqa: ANN201
    """Rebuild the fitted MRF from :func:`model_to_arrays` (marginals by message passing)."""
    m = mbi()
    import jax.numpy as jnp

    dom = m.Domain(tuple(attrs), tuple(int(s) for s in arrays["domain"]))
    cliques = [tuple(attrs[j] for j in row if j >= 0) for row in np.asarray(arrays["cliques"])]
    factors = {}
    for i, cl in enumerate(cliques):
        values = np.asarray(arrays[f"potential.{i}"], dtype=np.float64)
        if values.shape != tuple(dom[a] for a in cl):
            raise ValueError(f"potential {i} has shape {values.shape}, its clique needs "
                             f"{tuple(dom[a] for a in cl)}")
        factors[cl] = m.Factor(dom.project(cl), jnp.asarray(values))
    potentials = m.CliqueVector(dom, cliques, factors)
    return with_potentials(potentials, float(np.asarray(arrays["total"]).ravel()[0]))


def with_potentials(potentials, total: float):  # noqa: ANN001, ANN201
    m = mbi()
    marginals = m.marginal_oracles.message_passing_stable(potentials, total)
    return m.MarkovRandomField(potentials=potentials, marginals=marginals, total=total)


def clamp(model, evidence: dict[str, int]):  # noqa: ANN001, ANN201
    """The model conditioned on ``attribute = cell`` for each evidence item (exact).

    Adds a log-indicator factor per evidence attribute (0 on the cell, a large negative
    number elsewhere) and recomputes the marginals: sampling from the result draws
    every other attribute from its exact conditional distribution.
    """
    m = mbi()
    import jax.numpy as jnp

    pots = model.potentials
    dom = pots.domain
    cliques = list(pots.cliques)
    factors = {cl: pots[cl] for cl in cliques}
    for attr, cell in evidence.items():
        values = np.full(dom[attr], -1e6)
        values[cell] = 0.0
        key = (attr,)
        ind = m.Factor(dom.project(key), jnp.asarray(values))
        host = next((cl for cl in cliques if attr in cl), None)
        if host is None:
            cliques.append(key)
            factors[key] = ind
        else:
            factors[host] = factors[host] + ind.expand(dom.project(host))
    return with_potentials(m.CliqueVector(dom, cliques, factors), float(model.total))
