"""``MarginalGenerator``: the MST/AIM family of DP synthesizers, central or federated.

It learns from noisy marginal counts, not from gradients: a site's share is a vector of
noisy counts (``engine.py``, ``plan.py``), the model is a graphical model fitted to
them with ``mbi`` (``fit.py``), and samples are decoded into the schema
(``discretize.py``). Its state is the fitted model's potentials as flat arrays, so it
saves, loads and samples like every other generator (``fedsynth sample``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from ...causal import CausalError
from ...dp_histogram import bin_weights, cell_weights, equal_mass_cuts, mass_and_width_cuts
from ...privacy import PrivacyLedger
from ...privacy.randomness import DPRandomness
from ...schema import Schema
from ..base import (
    COUNT,
    FIT_REPRODUCIBLE,
    NON_NEGATIVE,
    Bound,
    ConditionError,
    Generator,
    NotFittedError,
)
from . import causal, engine, fit
from .code_pairs import entry_columns, noisy_pair_counts
from .codes import code_weights, noisy_code_histogram, pooled_counts
from .discretize import Discretizer, FineCells, binning_to_json, discretizer_for
from .event_links import (
    link_covariates,
    link_tails,
    noisy_link_counts,
    slice_length,
    whole_covariates,
)
from .fit import SITE, Clique, Measurement
from .measure import noisy_marginals, noisy_scores, noisy_split
from .outcome_split import Split, outcome_split
from .plan import (
    CODES,
    FINE,
    LINKS,
    ONE_WAY,
    PAIRS,
    SPLIT,
    MarginalPlan,
    NoiseLevels,
    calibrate,
    summed_noise,
)

# a table with more candidate pairs than this (8 times the 48 a round scores by
# default) gets the public workload order without scores (MarginalGenerator.workload)
WORKLOAD_PAIRS = 384
# (code_bound, codes_share) by default. A wide table's plan has no score share, so its
# code histogram gets more, and AMLSG's patients (93% with 4 mutations or fewer) lose
# little to a bound of 4: with 18 sites' noise, gene-frequency correlation 0.946 ->
# 0.972 and co-occurrence sign agreement 0.46 -> 0.80 (docs/generators.md). MIMIC's
# patients carry about 13 codes each, so the scored (narrower) tables keep 6.
WIDE_CODES, SCORED_CODES = (4, 0.45), (6, 0.2)
# the budget's shares by default (a hyperparameter set to a number wins)
# links_share 0 here: on TCGA-BRCA (no code set) the link release gave no reliable gain
# (emulated 6 regions, C-index 0.638 against 0.617 at links_share 0.45; federated, secret
# noise, 0.575 [0.570-0.702] against 0.611 [0.601-0.636]) at 8x the study's time
SHARES = {"one_way_share": 0.2, "fine_share": 0.1, "pairs_share": 0.0, "links_share": 0.0}
# the pair release (code_pairs.py), on by default on a table with two or more binary
# codes and a code histogram (AMLSG): a patient's pairs weigh at most those of 3 codes
# (3 Gaussians; 79% of AMLSG's patients have 3 genes or fewer), the code histogram
# keeps 3 codes a patient too, and the shares move to the pairs from the code
# histogram, the 1-way and the fine releases. Chosen with 18 sites' noise
# (docs/generators.md "Pairs of codes", benchmarks/marginal-datasets/results.md)
PAIR_BOUND = 3
PAIR_SHARES = {"one_way_share": 0.15, "fine_share": 0.05, "codes_share": 0.35,
               "pairs_share": 0.25, "links_share": 0.1}
# the link release (event_links.py), on by default on a table with a binary survival
# event and binary covariates (AMLSG, TCGA-BRCA; not heart disease, which has no
# survival outcome, nor MIMIC, whose codes are grouped): (link_bound with a code set,
# without). AMLSG's patients hold 2 genes (median; 95% at most 5), TCGA's one-hot
# indicators 9-14 a patient (median 10). Its share comes from the measurements
# (docs/generators.md "Event links", benchmarks/marginal-datasets/results.md)
LINK_BOUNDS = (4, 10)
# (fine cells of a numeric column, decode_threshold) by default: wide tables keep the
# third pass's decoding, scored ones get the heap-keeping one; see fine_cells
WIDE_DECODING, SCORED_DECODING = (64, 0.0), (256, 2.0)
# The summed noise (plan.summed_noise: the whole-budget noise multiplier of the
# coordinator's sums) from which a scored table with an outcome gets the outcome plan
# (MarginalGenerator.outcome_plan): 4 sites at epsilon 1 sum to 8.1, one central
# holder at epsilon 1 has 4.0, 4 sites at epsilon 3 3.0 (rdp, delta 1e-5). Between
# the last two: both epsilon-1 modes gain from it (heart disease, emulated), the
# epsilon-3 and -10 plans, whose figures hold, stay as they were
# (docs/generators.md "Selection at high summed noise")
OUTCOME_PLAN_NOISE = 3.5
# the outcome plan's shares: no score release, so the 1-way and fine releases (the
# columns' fidelity) take more, the outcome's pairs the rest
OUTCOME_SHARES = {"one_way_share": 0.3, "fine_share": 0.15}
NO_DP_NOISE = 1e-3  # noise std of a fit without DP: just enough to keep mbi well posed
# the ways of drawing rows from the fitted model (mbi's synthetic_data methods). "round"
# takes away the scatter of independent draws (on AMLSG's genes at 18 sites, five draws
# of one model spread 0.936-0.955 in gene-frequency correlation, rounded ones
# 0.951-0.952) but not their median (0.951 both): "sample" stays the default
# (benchmarks/marginal-datasets/results.md "Sixth pass")
SAMPLERS = ("sample", "round")


# a graph-following model left to its default models the site up to this many sites
SITE_MECHANISMS_MAX_SITES = 8


class MarginalGenerator(Generator):
    """Marginal-based DP generator (AIM-style selection, Private-PGM inference)."""

    name = "marginal"
    defaults: dict[str, Any] = {
        "bins": 6,  # bins of a numeric column (the model's cells)
        # fine equal-width cells of a numeric column's public range: their noisy
        # histogram is released first, the bins are runs of them of about equal noisy
        # mass (with a causal graph, joined with equal-width cuts of the noisy support:
        # dp_histogram.mass_and_width_cuts). 0: equal-width bins of the public range
        # (no fine release). Never more cells than grid values (discretize.grid_cells),
        # so a heaped value (0.0 mm ST depression) has a cell of its own. None:
        # by the table's width (WIDE_DECODING, SCORED_DECODING; fine_cells)
        "fine_bins": None,
        # decoding inside a bin: per bin, a blend of the noisy counts less this many
        # noise stds (clipped at 0) and the smooth estimate, by the share of the bin's
        # mass above that threshold (dp_histogram.bin_weights); 0: the smooth estimate
        # alone (clipped counts shrunk towards uniform, dp_histogram.cell_weights).
        # None: by the table's width (WIDE_DECODING, SCORED_DECODING)
        "decode_threshold": None,
        "rounds": 2,  # selection rounds after the 1-way marginals (one mbi fit each)
        "per_round": 8,  # marginals measured per round (top-k of one noisy score vector)
        "candidates": 48,  # candidates scored per round at most (the plan's bound)
        # shares of the privacy budget for the 1-way marginals and for the fine
        # histograms of the numeric columns; None: SHARES (PAIR_SHARES with pairs)
        "one_way_share": None,
        "fine_share": None,
        "select_share": 0.15,  # share for the selection scores (the rest: measurements)
        # the schema's outcome: its candidates are always scored, their scores weighted
        # by this (public workload weight); 1: no preference
        "outcome_weight": 2.0,
        # summed noise (plan.summed_noise) at or above which a scored table with an
        # outcome measures its outcome's pairs only, without scores (outcome_plan);
        # None: OUTCOME_PLAN_NOISE; 0 or less: never
        "outcome_plan_noise": None,
        # the outcome plan measures each pair with the outcome collapsed to the schema's
        # {absent, present} (outcome_split.py), when the outcome has such a split
        "outcome_split": True,
        "max_way": 2,  # 2: pairs only; 3: also triples that extend a measured pair
        "max_cells": 200_000,  # cap on the junction tree's cells (inference cost)
        "max_clique_cells": 2_000,  # largest marginal a round may measure
        "iters": 1000,  # mirror-descent iterations per fit
        # federated in clear: model the site as an attribute (site-conditional
        # sampling). None: on with a causal graph and at most 8 sites (per-site
        # mechanisms; see site_attribute), else off
        "site_attribute": None,
        "causal": False,  # True: follow the schema's causal graph (causal.py, docs/causal.md)
        "site_pooling": 1.0,  # causal: weight of the pooled mechanism in a site's (0: none)
        # code sets the schema groups (codes.py): one attribute per group, its code count
        "group_codes": True,  # False: one binary attribute per code even when grouped
        "code_cap": 3,  # a group's count cells 0..cap, the last meaning "cap or more"
        "anchor_survival": True,  # half of each round's candidates hold a survival column
        # the covariates the workload links to (time, event): None, the schema's
        # ``prognostic`` list (every covariate when it has none); a list: these; []: all
        # (engine.workload_order; docs/generators.md "Prognostic covariates")
        "prognostic": None,
        # wide tables: no score release (select_share unused); each round measures the
        # next pairs of a public workload order (survival pairs, code co-occurrences,
        # the rest, ranked by the noisy 1-way releases; engine.workload_order). None:
        # on when the table has more than WORKLOAD_PAIRS candidate pairs
        "workload": None,
        # code sets: one bounded histogram release for every code (codes.py); 0: off, one
        # 1-way marginal per ungrouped code and uniform decoding inside groups
        # codes a patient adds to the code histogram at most, and the histogram's share
        # of the budget (if the schema has code sets). None: WIDE_CODES with the
        # workload (no score share), SCORED_CODES with scores
        "code_bound": None,
        "codes_share": None,
        # pairs of codes: one bounded release of the co-occurrence counts of every pair
        # of the (at most pair_codes) most frequent binary codes (code_pairs.py); each
        # patient's pairs weigh at most those of pair_bound codes. None: PAIR_BOUND and
        # PAIR_SHARES when the table has two or more binary codes and a code
        # histogram; pair_bound or pairs_share 0: off
        "pair_bound": None,
        "pairs_share": None,
        "pair_codes": 24,
        # the model reads a released pair only when both its codes' noisy histogram
        # counts are at least this many of the pair count's noise stds (post-processing,
        # code_pairs.above_floor; 0: every pair). Off: it lets the model's gene
        # frequencies reach the histogram's but costs co-occurrence signs (AMLSG)
        "pair_floor": 0.0,
        # the model reads each pooled pair count capped at the smaller of its codes'
        # noisy histogram counts (post-processing, code_pairs.capped). Off: no measured
        # gain (AMLSG; benchmarks/marginal-datasets/results.md "Sixth pass")
        "pair_cap": False,
        # event links: one bounded release of every binary covariate's counts in each
        # cell of the survival event and time (event_links.py). None: LINK_BOUNDS and
        # SHARES' / PAIR_SHARES' links_share when the schema has a survival pair and
        # binary covariates; link_bound or links_share 0: off
        "link_bound": None,
        "links_share": None,
        "link_covariates": 40,
        # the tail: False, the event alone; True: the event and the binned time (6 times
        # the cells at the same noise each: TCGA, 6 regions emulated, C-index 0.547
        # against 0.629 with the event alone, medians of 3 seeds)
        "link_time": False,
        # the model reads a released link only when its event count is this many noise
        # stds from independence (post-processing; 0: every link)
        "link_min_z": 0.0,
        # how rows are drawn from the fitted model (post-processing, no privacy cost):
        # "sample", each row independently; "round", mbi's randomized rounding, which
        # keeps each column's drawn counts within the rounding of the model's (the
        # conditionals of each junction-tree group rounded). See SAMPLERS.
        "sampler": "sample",
    }
    # the shares are checked by the plan (their sum too); None: the generator picks
    bounds = {
        "bins": Bound(2, integer=True), "fine_bins": Bound(0, integer=True),
        "decode_threshold": NON_NEGATIVE, "rounds": Bound(0, integer=True),
        "per_round": COUNT, "candidates": COUNT, "outcome_weight": Bound(0.0, open_low=True),
        "outcome_plan_noise": Bound(-math.inf), "max_way": Bound(2, 4, integer=True),
        "max_cells": COUNT, "max_clique_cells": Bound(2, integer=True), "iters": COUNT,
        "site_pooling": NON_NEGATIVE, "code_cap": COUNT,
        "code_bound": Bound(0, integer=True), "pair_bound": Bound(0, integer=True),
        "pair_codes": Bound(2, integer=True), "pair_floor": NON_NEGATIVE,
        "link_bound": Bound(0, integer=True), "link_covariates": COUNT,
        "link_min_z": NON_NEGATIVE,
    }

    # -- Generator plumbing (no networks: nothing here is trained by DP-SGD) -----------
    def build(self) -> None:
        if self.hparams["sampler"] not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, not "
                             f"{self.hparams['sampler']!r}")
        self.discretizer = study_discretizer(self.schema, self.hparams)
        self.prognostic()  # a bad list fails here, before any release
        self.binning = ""  # JSON of the DP-derived cells (discretize.binning_to_json)
        self.mrf: Any = None
        self.sites: list[str] = []
        self.fit_info: dict[str, Any] = {}
        if self.hparams["causal"] and self.schema.graph is None:
            raise CausalError(f"causal=True but schema {self.schema.name!r} publishes no "
                              "causal graph: add a 'graph' section (docs/causal.md) or "
                              "leave causal off")
        self.graph = self.schema.graph if self.hparams["causal"] else None
        self.order = (self.graph.topological_order(self.discretizer.names)
                      if self.graph is not None else [])
        self.mechanisms: list[causal.Mechanism] | None = None

    def site_attribute(self, n_sites: int) -> bool:
        """Whether a federated study in clear with ``n_sites`` answering sites models
        the site (see ``defaults``).

        Left to the default, a graph-following model gives each hospital its own
        mechanisms when there are at most ``SITE_MECHANISMS_MAX_SITES`` of them. Measured
        (docs/causal.md, federated, epsilon 3, 3 seeds): heart disease's 4 hospitals,
        whose case mixes differ most, gain pairwise fidelity (correlation gap 0.125 vs
        0.164), TSTR (0.875 vs 0.832) and the graph's independences (the pooled table
        holds 0.63 of them against 0.65 in real data; 0.93 without, the hospital being
        a common cause the model lacks); AMLSG's 18 small hospitals lose column
        fidelity (0.907 vs 0.966 on seed 0): each one's families are mostly noise.
        """
        chosen = self.hparams["site_attribute"]
        if chosen is None:
            return self.graph is not None and n_sites <= SITE_MECHANISMS_MAX_SITES
        return bool(chosen)

    def networks(self) -> dict[str, nn.Module]:
        return {}

    def private_module(self) -> nn.Module:
        raise TypeError("the marginal generator is measured, not trained with DP-SGD")

    def per_sample_loss(self, module: nn.Module, batch: Any) -> Any:
        raise TypeError("the marginal generator has no per-sample loss")

    def generate_encoded(self, n: int, rng: Any) -> np.ndarray:
        raise TypeError("the marginal generator samples through sample()")

    @property
    def sizes(self) -> dict[str, int]:
        return self.discretizer.shape

    def _causal_sizes(self) -> dict[str, int]:
        """Cells per attribute at most, before the fine release cuts the bins: a
        numeric column gets up to twice ``bins`` (``mass_and_width_cuts``), so a family
        is refused before any budget is spent rather than after."""
        fine_bins, bins = self.fine_cells(), int(self.hparams["bins"])
        if fine_bins <= 0:
            return self.sizes
        return study_discretizer(self.schema, {**self.hparams,
                                               "bins": min(2 * bins, fine_bins)}).shape

    def workload(self, pairs: int | None = None) -> bool:
        """Whether pairs are picked by the public workload order, without scores.

        Why automatic on wide tables: a round scores at most ``candidates`` pairs, so
        on AMLSG (2,278 pairs) the noisy scores chose among a random 2% of them and the
        pairs that matter (NPM1-FLT3, death with age) were rarely even scored; with 18
        sites the summed score noise also exceeds those pairs' signal. No score release
        leaves the measurements a larger share. Heart disease (91 pairs) keeps AIM's
        scores (docs/generators.md has the figures of both)."""
        chosen = self.hparams["workload"]
        if chosen is not None:
            return bool(chosen)
        if pairs is None:
            pairs = len(engine.candidates(self.discretizer.names, self.sizes, [], 2,
                                          int(self.hparams["max_clique_cells"])))
        return pairs > WORKLOAD_PAIRS

    def fine_cells(self) -> int:
        """Fine cells per numeric column in the fine release (0: no fine release).

        Why two defaults: a finer release keeps heaped values apart (heart disease, 4
        sites: 64 -> 256 cells and ``bin_weights`` raised federated fidelity from 0.910
        to 0.931) but its running sum, from which the bins are cut, adds one noise per
        cell, so at many sites' noise it cuts worse bins (AMLSG, 18 sites emulated:
        fidelity 0.971 at 64 cells, 0.969 at 128, 0.966 at 256), and noise alone then
        lifts cells over the decoding threshold (AMLSG federated, 64 cells: detection
        0.887 at threshold 0, 0.919 at 2). The plan does not know the number of sites,
        so, as for the code histogram, the table's width stands in for it: wide tables
        (the public workload; AMLSG's 18 and TCGA's 6 sites) keep 64 cells and the
        smooth decoding."""
        chosen = self.hparams["fine_bins"]
        return int(chosen) if chosen is not None else self._decoding()[0]

    def decode_threshold(self) -> float:
        """``decode_threshold`` as set, or its default by the table's width (fine_cells)."""
        chosen = self.hparams["decode_threshold"]
        return float(chosen) if chosen is not None else self._decoding()[1]

    def _decoding(self) -> tuple[int, float]:
        return WIDE_DECODING if self.graph is None and self.workload() else SCORED_DECODING

    def plan(self, n_candidates: int | None = None, noise: float | None = None
             ) -> MarginalPlan:
        """The study's privacy plan from the hyperparameters (no row is read).

        ``noise``: the noise scale the coordinator's sums will carry
        (``plan.summed_noise`` of the answering sites' budgets; of the budget itself for
        a central fit); None: unknown, the plan of one holder. Past
        ``OUTCOME_PLAN_NOISE`` a scored table gets the outcome plan (``outcome_plan``)."""
        d = len(self.discretizer.attributes)
        fine = (len(self.discretizer.numeric_names())
                if self.fine_cells() > 0 else 0)
        pool = engine.candidates(self.discretizer.names, self.sizes, [], 2,
                                 int(self.hparams["max_clique_cells"]))
        # a graph names its families: no selection, so no workload order either
        wide = self.graph is None and self.workload(len(pool))
        bound = (WIDE_CODES if wide else SCORED_CODES)[0]
        bound = bound if self.hparams["code_bound"] is None else int(self.hparams["code_bound"])
        codes = bool(self.discretizer.code_attrs) and bound > 0
        direct = len(self.discretizer.direct_codes) if codes else 0
        pair_bound, pair_codes = self._pair_release(codes, direct)
        if pair_bound and self.hparams["code_bound"] is None:
            bound = PAIR_BOUND  # with the pair release, both code releases bound alike
        shares = self._shares(wide, pair_bound > 0)
        fine_share = shares["fine_share"] if fine else 0.0
        code_bound, codes_share = (bound, shares["codes_share"]) if codes else (0, 0.0)
        pairs_share = shares["pairs_share"] if pair_bound else 0.0
        link_bound, link_cap = (self._link_release(codes) if shares["links_share"] > 0
                                else (0, 0))
        links_share = shares["links_share"] if link_bound else 0.0
        if self.graph is not None:  # the graph's families, no selection
            fams = causal.families(self.graph, self.order)
            causal.check_families(fams, self._causal_sizes(),
                                  int(self.hparams["max_clique_cells"]))
            return causal.plan(max(1, d - direct), fams, shares["one_way_share"],
                               fine, fine_share, code_bound, codes_share)
        m = min(int(self.hparams["candidates"]), max(len(pool), 1))
        if n_candidates is not None:
            m = n_candidates
        rounds = int(self.hparams["rounds"]) if len(pool) else 0
        select = 0.0 if wide else float(self.hparams["select_share"])
        plan = MarginalPlan(max(1, d - direct), rounds, m, int(self.hparams["per_round"]),
                            shares["one_way_share"], select, fine, fine_share,
                            code_bound, codes_share, pair_bound, pair_codes, pairs_share,
                            link_bound, link_cap, links_share)
        return self.outcome_plan(plan, pool, noise) if not wide else plan

    def outcome_plan(self, plan: MarginalPlan, pool: Sequence[Clique],
                     noise: float | None) -> MarginalPlan:
        """``plan``, or at high summed noise one round measuring every pair with the
        outcome and no score release, the 1-way releases taking ``OUTCOME_SHARES``.

        Why: at 4 sites' summed noise (heart disease, epsilon 1 per site: 8.1, twice
        one central holder's) a score's noise (std 205 against pair counts of tens)
        drowns the pairs' signal, the selection picks pairs without the outcome, and
        measured pairs whose cells hold fewer patients than their noise std can reverse
        the outcome's associations (TSTR 0.19 on one emulated seed). The outcome's
        pairs alone (a naive-Bayes-shaped model, what a classifier on synthetic rows
        reads), each measured with the score share's budget too, keep them
        (docs/generators.md "Selection", benchmarks/marginal/results.md "Fifth pass").
        Public inputs only: the schema's outcome, the candidate pairs, the sites'
        budgets; AIM likewise fits what it measures to the noise its budget leaves."""
        limit = self.hparams["outcome_plan_noise"]
        limit = OUTCOME_PLAN_NOISE if limit is None else float(limit)
        outcome = self.schema.outcome.column if self.schema.outcome is not None else None
        with_outcome = [c for c in pool if outcome in c]
        if noise is None or limit <= 0 or noise < limit or not with_outcome or not (
                plan.rounds and plan.select_share > 0):
            return plan
        shares = {k: v if self.hparams[k] is None else float(self.hparams[k])
                  for k, v in OUTCOME_SHARES.items()}
        fine_share = shares["fine_share"] if plan.fine else 0.0
        split = bool(self.hparams["outcome_split"]) and outcome_split(
            self.schema, self.discretizer) is not None
        return dataclasses.replace(plan, rounds=1, per_round=len(with_outcome),
                                   candidates=len(with_outcome), select_share=0.0,
                                   one_way_share=shares["one_way_share"],
                                   fine_share=fine_share, outcome_split=int(split))

    def _link_release(self, codes: bool) -> tuple[int, int]:
        """(link_bound, link_covariates) of the plan, (0, 0) for none: the link release
        needs a survival pair with a binary event, binary covariates and no graph (a
        graph's families are what it measures)."""
        allowed = link_covariates(self.discretizer, self.schema)
        # every patient is in one cell of each categorical covariate: one entry each
        whole = len(whole_covariates(self.discretizer))
        bound = (LINK_BOUNDS[0 if codes else 1] + whole if self.hparams["link_bound"] is None
                 else int(self.hparams["link_bound"]))
        cap = int(self.hparams["link_covariates"])
        binary = [a for a in allowed if a not in whole_covariates(self.discretizer)]
        if not (bound > 0 and cap > 0 and binary and self.graph is None
                and self.hparams["links_share"] != 0 and link_tails(self.schema, self.sizes)):
            return 0, 0
        return bound, min(cap, len(allowed))

    def _pair_release(self, codes: bool, direct: int) -> tuple[int, int]:
        """(pair_bound, pair_codes) of the plan, (0, 0) for none: the pair release needs
        the code histogram (which picks its codes) and two binary codes; no graph."""
        bound = (PAIR_BOUND if self.hparams["pair_bound"] is None
                 else int(self.hparams["pair_bound"]))
        cap = int(self.hparams["pair_codes"])
        if not (codes and direct >= 2 and bound > 0 and cap >= 2 and self.graph is None
                and self.hparams["pairs_share"] != 0):
            return 0, 0
        return bound, min(cap, direct)

    def _shares(self, wide: bool, pairs: bool) -> dict[str, float]:
        """Each release's share of the budget: the hyperparameter where it is set, else
        the table's default (``SHARES``; ``WIDE_CODES`` / ``SCORED_CODES``' code share;
        ``PAIR_SHARES`` when the pair release is on)."""
        base = {**SHARES, "codes_share": (WIDE_CODES if wide else SCORED_CODES)[1],
                **(PAIR_SHARES if pairs else {})}
        return {k: v if self.hparams[k] is None else float(self.hparams[k])
                for k, v in base.items()}

    # -- state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        if self.mrf is None:
            return {}
        out = fit.model_to_arrays(self.mrf, self._attrs())
        out["sites_json"] = np.frombuffer(json.dumps(self.sites).encode(), dtype=np.uint8)
        if self.binning:
            out["binning_json"] = np.frombuffer(self.binning.encode(), dtype=np.uint8)
        if self.mechanisms is not None:
            out.update(causal.to_arrays(self.mechanisms))
        if self.discretizer.code_weights:
            out["code_weights"] = np.concatenate(
                [self.discretizer.code_weights.get(g.name, np.ones(len(g.members)))
                 for g in self.discretizer.groups])
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if not state:
            self.mrf = None
            return
        for key in ("total", "cliques", "domain", "sites_json"):
            if key not in state:
                raise ValueError(f"state does not fit a marginal model: missing {key!r}")
        self.sites = list(json.loads(bytes(np.asarray(state["sites_json"], dtype=np.uint8))))
        self._use_binning(bytes(np.asarray(state["binning_json"], dtype=np.uint8)).decode()
                          if "binning_json" in state else "")
        attrs = self._attrs()
        expected = [len(self.sites)] if self.sites else []
        expected += [self.sizes[a] for a in self.discretizer.names]
        if list(np.asarray(state["domain"])) != expected:
            raise ValueError(f"state domain {list(state['domain'])} does not fit this schema "
                             f"and binning ({expected})")
        for k, v in state.items():
            if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.all(np.isfinite(v)):
                raise ValueError(f"state key {k!r} holds NaN or infinite values")
        self.discretizer.code_weights = split_code_weights(
            self.discretizer, state.get("code_weights"))
        self.mrf = fit.model_from_arrays(
            {k: v for k, v in state.items()
             if k not in ("sites_json", "binning_json", "code_weights")}, attrs)
        self.mechanisms = (causal.from_arrays(state, self.graph, self.order, self.sites)
                           if self.graph is not None else None)

    def _attrs(self) -> list[str]:
        return ([SITE] if self.sites else []) + self.discretizer.names

    # -- central fit --------------------------------------------------------------------
    def fit(  # type: ignore[override]
        self,
        data: pd.DataFrame,
        *,
        epsilon: float | None = 3.0,
        delta: float = 1e-5,
        accountant: str = "rdp",
        randomness: DPRandomness | None = None,
        **_training: Any,
    ) -> MarginalGenerator:
        """Fit on one table (pooled rows) under (epsilon, delta)-DP.

        The same engine as a federated study, with this process as the only data
        holder; the noise comes from ``randomness`` (secret by default: pass
        ``DPRandomness.reproducible`` in tests only). ``epsilon=None`` fits without DP
        (a reference, not a release). Training options of the other generators
        (``epochs``, ``sample_rate``...) mean nothing here and are ignored.
        """
        data = self.fit_input(data, epsilon, delta)
        dp = epsilon is not None
        plan = self.plan(noise=summed_noise([(epsilon, delta)], accountant) if dp else None)
        noise = (calibrate(plan, epsilon, delta, accountant) if dp else
                 NoiseLevels.flat(NO_DP_NOISE))
        ledger = PrivacyLedger(accountant)
        holder = LocalMeasurer(data, self.discretizer, noise, ledger if dp else None,
                               randomness or DPRandomness.secret(),
                               code_bound=plan.code_bound, pair_bound=plan.pair_bound,
                               link_bound=plan.link_bound,
                               split=outcome_split(self.schema, self.discretizer))
        result = self.run_engine(plan, holder, sites=[])
        self.fit_info = {
            "epsilon": ledger.epsilon(delta) if dp else None,
            "delta": delta if dp else None,
            "ledger": ledger.to_record() if dp else None,
            "noise": {"one_way": noise.one_way, "score": noise.score, "measure": noise.measure,
                      "fine": noise.fine, "codes": noise.codes, "pairs": noise.pairs,
                      "links": noise.links},
            "plan": plan.to_dict(),
            "selected": [list(c) for lg in result.log for c in lg.chosen],
            "pairs_released": len(result.pairs),
            "links_in_model": [list(c) for c in result.links_in_model],
            "pairs_in_model": [list(c) for c in result.pairs_in_model],
            FIT_REPRODUCIBLE: (randomness or DPRandomness.secret()).is_reproducible,
        }
        return self

    def run_engine(self, plan: MarginalPlan, measurer: engine.Measurer,
                   sites: Sequence[str]) -> engine.EngineResult:
        """Run the selection/measurement plan and keep the fitted model."""
        direct = self.discretizer.direct_codes if plan.code_bound else []
        first = (self._fine_one_way(measurer, direct) if self.fine_cells() > 0
                 else None)
        codes = self.discretizer.code_attrs if plan.code_bound else None
        if self.graph is not None:
            result = causal.run(self.discretizer.names, self.sizes,
                                causal.families(self.graph, self.order), measurer,
                                int(self.hparams["iters"]), first=first, codes=codes,
                                direct=direct)
            self.mechanisms = causal.from_measurements(
                result.measurements, self.graph, self.order, self.sizes,
                list(getattr(measurer, "sites", [])), float(self.hparams["site_pooling"]))
        else:
            result = self._select(plan, measurer, first, codes, direct)
        self.mrf, self.sites = result.model, list(sites)
        self.discretizer.code_weights = {
            m.clique[0]: code_weights(*pooled_counts(m)) for m in result.codes
            if m.clique[0] in {g.name for g in self.discretizer.groups}}
        # Every fit compiles new JAX programs; a long process (a benchmark of many
        # studies) that keeps them all ran out of memory for LLVM's code sections.
        import jax

        jax.clear_caches()
        return result

    def _select(self, plan: MarginalPlan, measurer: engine.Measurer,
                first: list[Measurement] | None, codes: dict[str, int] | None,
                direct: Sequence[str]) -> engine.EngineResult:
        """AIM-style selection of the marginals to measure, or the public workload
        order on wide tables (no graph)."""
        return engine.run(
            self.discretizer.names, self.sizes, plan, measurer, first=first,
            max_way=int(self.hparams["max_way"]), max_cells=int(self.hparams["max_cells"]),
            max_clique_cells=int(self.hparams["max_clique_cells"]),
            iters=int(self.hparams["iters"]), rng=np.random.default_rng(self.seed),
            codes=codes, direct=direct,
            anchors=([c for pair in self.schema.survival_pairs for c in pair]
                     if self.hparams["anchor_survival"] else ()),
            focus=self.schema.outcome.column if self.schema.outcome is not None else None,
            focus_weight=float(self.hparams["outcome_weight"]),
            workload=self.workload(),
            links=link_covariates(self.discretizer, self.schema) if plan.link_bound else (),
            link_tail=self.link_tail(), link_min_z=float(self.hparams["link_min_z"]),
            split=outcome_split(self.schema, self.discretizer),
            pair_floor=float(self.hparams["pair_floor"]),
            pair_cap=bool(self.hparams["pair_cap"]),
            prognostic=self.prognostic(),
        )

    def prognostic(self) -> tuple[str, ...]:
        """The covariates the workload links to survival (``prognostic``; () for all)."""
        chosen = self.hparams["prognostic"]
        names = self.schema.prognostic if chosen is None else tuple(chosen)
        unknown = [n for n in names if n not in self.discretizer.names]
        if unknown:
            raise ValueError(f"prognostic names {unknown}, which are not attributes of "
                             f"schema {self.schema.name!r}: name its columns")
        return names

    def link_tail(self) -> tuple[str, ...]:
        """The survival columns each link counts in: (event, time), or (event,) with
        ``link_time`` False; () without a survival pair."""
        tails = link_tails(self.schema, self.sizes)
        if not tails:
            return ()
        return tails[1] if bool(self.hparams["link_time"]) else tails[0]

    # -- bins from the fine 1-way release -------------------------------------------
    def _use_binning(self, binning: str) -> None:
        self.binning = binning
        self.discretizer = study_discretizer(self.schema, self.hparams, binning)

    def _fine_one_way(self, measurer: engine.Measurer, direct: Sequence[str] = ()
                      ) -> list[Measurement]:
        """The 1-way releases with bins cut from the data's DP picture.

        1. ``fine``: each numeric column's histogram over fine equal-width cells of its
           public range (``plan.FINE``);
        2. each numeric column's bins: runs of fine cells of about equal mass in the
           summed noisy fine counts, and the clipped counts as decoding weights
           (post-processing, ``common/dp_histogram.py``); the sites are told the cuts;
        3. ``one-way``: every column's 1-way marginal on those bins (but the ``direct``
           codes: the code histogram measures them, ``engine.run``).

        Returns the model's 1-way measurements: the ``one-way`` release and, for each
        numeric column, its fine histogram summed into the bins (a second, independent
        measurement of the same marginal, noise std sqrt(width) x the fine one's).
        """
        fine_bins, bins = self.fine_cells(), int(self.hparams["bins"])
        # a graph's mechanisms need resolution in the tails too (mass_and_width_cuts)
        cut = mass_and_width_cuts if self.graph is not None else equal_mass_cuts
        fine = study_discretizer(self.schema, {**self.hparams, "bins": fine_bins})
        numeric = [a for a in fine.attributes if a.numeric]
        measurer.use(fine, json.dumps({"fine": fine_bins}))
        raw = measurer.measure([(a.name,) for a in numeric], FINE) if numeric else []
        cells: dict[str, FineCells] = {}
        for meas, attr in zip(raw, numeric, strict=True):
            noisy = np.asarray(meas.values, dtype=float)
            pooled = (noisy.sum(axis=0) if noisy.ndim == 2 else noisy)[: attr.bins]
            sd = float(np.sqrt(np.sum(np.square(meas.stddev))))  # of the summed noise
            cuts = cut(pooled, min(bins, attr.bins), sd)
            threshold = self.decode_threshold()
            weights = (bin_weights(pooled, sd, cuts, threshold) if threshold > 0
                       else cell_weights(pooled, sd))
            cells[attr.name] = FineCells(attr.bins, tuple(int(c) for c in cuts),
                                         tuple(weights))
        self.discretizer = fine.refined(cells)
        self.binning = binning_to_json(fine_bins, cells, weights=True)
        measurer.use(self.discretizer, binning_to_json(fine_bins, cells))
        ones = measurer.measure([(a,) for a in self.discretizer.names if a not in direct],
                                ONE_WAY)
        return ones + [coarsen(m, self.discretizer.attribute(m.clique[0])) for m in raw]

    # -- sampling ---------------------------------------------------------------------
    def sample(  # type: ignore[override]
        self,
        n: int,
        conditions: dict[str, Any] | None = None,
        seed: int | None = None,
        max_tries: int = 200,
        site: str | None = None,
        interventions: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """``n`` schema-valid rows; conditions are exact (the evidence is clamped).

        A numeric condition clamps its bin and sets the value itself; ``site`` (a model
        fitted with a site attribute) draws patients like that hospital's. With a causal
        graph, rows are drawn mechanism by mechanism (``causal.py``) and
        ``interventions`` are do() values: set, incoming edges cut, descendants redrawn.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        if self.mrf is None:
            raise NotFittedError("this marginal model is neither fitted nor loaded: fit it "
                                 "(.fit) or load a saved one (Generator.load) first")
        if interventions and self.graph is None:
            raise CausalError("this marginal model has no causal graph, so it cannot sample "
                              "interventions: publish a 'graph' section in the schema and "
                              "fit with causal=True" if self.schema.graph is None else
                              "this marginal model was fitted with causal=False: refit it "
                              "with causal=True to sample interventions")
        wanted = self._parse_conditions(conditions or {})
        evidence = self._cells(wanted)
        if site is not None:
            if site not in self.sites:
                raise ConditionError(f"site {site!r} is not in this model; it knows "
                                     f"{self.sites or 'no sites (fitted without them)'}")
            evidence[SITE] = self.sites.index(site)
        if self.graph is not None:
            return self._sample_causal(n, wanted, evidence, interventions or {}, seed,
                                       max_tries)
        model = fit.clamp(self.mrf, evidence) if evidence else self.mrf
        if n == 0:
            return self.discretizer.decode(np.zeros((0, len(self.sizes)), dtype=np.int64),
                                           np.random.default_rng(0))
        base = self.seed if seed is None else seed
        state = np.random.get_state()
        np.random.seed(base % 2**32)  # mbi draws from numpy's global generator
        try:
            data = model.synthetic_data(n, method=self.hparams["sampler"]).to_dict()
        finally:
            np.random.set_state(state)
        cells = np.stack([np.asarray(data[a], dtype=np.int64) for a in self.discretizer.names],
                         axis=1)
        for col, cell in evidence.items():
            if col != SITE and np.any(cells[:, self.discretizer.names.index(col)] != cell):
                raise ConditionError(f"the model could not meet {col} exactly")
        return self.discretizer.decode(cells, np.random.default_rng(base), fixed=wanted)


    def _cells(self, wanted: dict[str, Any]) -> dict[str, int]:
        """The model cell of each parsed column value."""
        evidence: dict[str, int] = {}
        for col, value in wanted.items():
            try:
                attr = self.discretizer.attribute(col)
            except KeyError as exc:
                raise ConditionError(str(exc).strip('"')) from None
            if value is None:
                evidence[col] = int(attr.missing_cell)  # type: ignore[arg-type]
            elif attr.numeric:
                evidence[col] = int(attr.value_cell(np.array([float(value)]))[0])
            else:
                cats = [str(c) for c in attr.column.categories]
                evidence[col] = cats.index(str(value))
        return evidence

    def _sample_causal(self, n: int, wanted: dict[str, Any], evidence: dict[str, int],
                       interventions: dict[str, Any], seed: int | None, max_tries: int
                       ) -> pd.DataFrame:
        """Ancestral sampling; do() values are set, conditions are met by rejection."""
        try:
            done = self._parse_conditions(interventions)
        except ConditionError as exc:
            raise CausalError(f"intervention: {exc}") from None
        both = sorted(set(done) & set(wanted))
        if both:
            raise CausalError(f"{both} are both conditioned on and intervened on: a column "
                              "is either observed or set, not both")
        fixed = self._cells(done)
        if SITE in evidence:  # the site is a root: conditioning on it is setting it
            fixed[SITE] = evidence.pop(SITE)
        base = self.seed if seed is None else seed
        rng = np.random.default_rng(base)
        names = self.discretizer.names
        mechs = self.mechanisms or causal.mechanisms(self.mrf, self.graph, self.order)
        site_probs = None if self.mechanisms else causal.site_weights(self.mrf)
        kept: list[np.ndarray] = []
        have = drawn = 0
        for _ in range(max_tries if evidence else 1):
            if have >= n:
                break
            cells = causal.ancestral(mechs, names, max(n, 256) if evidence else n, rng,
                                     fixed, site_probs)
            drawn += len(cells)
            for col, cell in evidence.items():
                cells = cells[cells[:, names.index(col)] == cell]
            kept.append(cells)
            have += len(cells)
        if have < n:
            raise ConditionError(
                f"the model produced {have} of {n} rows matching {wanted} in {drawn} draws "
                f"(rate {have / max(drawn, 1):.2e}): ask for a more common condition")
        cells = np.concatenate(kept)[:n]
        return self.discretizer.decode(cells, rng, fixed={**wanted, **done})


def study_discretizer(schema: Schema, params: dict[str, Any], binning: str | None = None
                      ) -> Discretizer:
    """The cells of a marginal study from its parameters and (``discretize.
    discretizer_for``) its public binning: coordinator and sites alike."""
    p = {**MarginalGenerator.defaults, **params}
    return discretizer_for(schema, int(p["bins"]), binning,
                           group_codes=bool(p["group_codes"]), code_cap=int(p["code_cap"]))


def split_code_weights(disc: Discretizer, vector: np.ndarray | None
                       ) -> dict[str, np.ndarray]:
    """The code histogram's noisy counts, one array per group ({} when there are none)."""
    if vector is None or not disc.groups:
        return {}
    sizes = [len(g.members) for g in disc.groups]
    vector = np.asarray(vector, dtype=float).ravel()
    if vector.size != sum(sizes) or not np.all(np.isfinite(vector)):
        raise ValueError(f"code weights of size {vector.size} do not fit the schema's "
                         f"{sum(sizes)} grouped codes")
    parts = np.split(vector, np.cumsum(sizes)[:-1])
    return {g.name: p for g, p in zip(disc.groups, parts, strict=True)}


class LocalMeasurer:
    """The data holder of a central fit: this process, its rows and one ledger."""

    def __init__(self, data: pd.DataFrame, discretizer: Discretizer, noise: NoiseLevels,
                 ledger: PrivacyLedger | None, randomness: DPRandomness,
                 code_bound: int = 0, pair_bound: int = 0, link_bound: int = 0,
                 split: Split | None = None) -> None:
        self.data = data
        self.split = split  # the outcome's public split (outcome_split.py)
        self.pair_bound, self.link_bound = pair_bound, link_bound
        # the code histogram (codes.py): its 0/1 entries per row, and each attribute's
        # number of entries (code sets do not depend on the numeric binning)
        self.presence, self.code_bound = discretizer.code_presence(data), code_bound
        self.code_lengths = discretizer.code_attrs
        self.code_columns = entry_columns(self.code_lengths)
        self.noise, self.ledger, self.randomness = noise, ledger, randomness
        self.total: float | None = None
        self.sites: list[str] = []  # one holder, no site attribute
        self.use(discretizer, "")

    def use(self, discretizer: Discretizer, binning: str) -> None:
        """Measure on these cells from now on (``binning``: what a site would be sent)."""
        self.cells = discretizer.encode(self.data)
        self.names, self.sizes = discretizer.names, discretizer.shape
        self.whole = whole_covariates(discretizer)

    def measure(self, cliques: Sequence[Clique], kind: str) -> list[Measurement]:
        sigma = self.noise.of(kind)
        if kind == CODES:  # the whole code histogram, split by attribute (codes.py)
            assert [c[0] for c in cliques] == list(self.code_lengths)
            values = np.split(
                noisy_code_histogram(self.presence, self.code_bound, sigma,
                                     self.randomness.release("measurement")),
                np.cumsum(list(self.code_lengths.values()))[:-1])
        elif kind == PAIRS:  # every asked pair's count, one entry each (code_pairs.py)
            values = np.split(noisy_pair_counts(
                self.presence, self.code_columns, cliques, self.pair_bound, sigma,
                self.randomness.release("measurement")), len(cliques))
        elif kind == LINKS:  # each covariate's slice over the tail (event_links.py)
            lengths = [slice_length(c, self.sizes, self.whole) for c in cliques]
            values = np.split(noisy_link_counts(
                self.cells, self.names, self.sizes, cliques, self.link_bound, sigma,
                self.randomness.release("measurement"), self.whole), np.cumsum(lengths)[:-1])
        elif kind == SPLIT:  # pairs with the outcome collapsed (outcome_split.py)
            assert self.split is not None and not self.split.problem(cliques)
            values = noisy_split(self.cells, self.names, self.sizes, cliques, self.split,
                                 sigma, self.randomness.release("measurement"))
        else:
            values = noisy_marginals(self.cells, self.names, self.sizes, cliques, sigma,
                                     self.randomness.release("measurement"))
        if self.ledger is not None:
            self.ledger.record(sigma, 1.0, self.code_bound if kind == CODES else
                               math.comb(self.pair_bound, 2) if kind == PAIRS else
                               self.link_bound if kind == LINKS else len(cliques))
        if len(cliques[0]) == 1 and kind != CODES and self.total is None:
            self.total = float(np.mean([v.sum() for v in values]))
        return [Measurement(c, v, np.asarray(sigma), kind=kind)
                for c, v in zip(cliques, values, strict=True)]

    def score(self, cliques: Sequence[Clique], model_marginals: dict[str, list[np.ndarray]]
              ) -> tuple[np.ndarray, float]:
        sigma = self.noise.score
        if self.total is None:  # never the exact row count: a private statistic
            raise ValueError("scores need the noisy 1-way release first (their total)")
        if self.ledger is not None:
            self.ledger.record(sigma, 1.0, len(cliques))
        scores = noisy_scores(self.cells, self.names, self.sizes, cliques,
                              model_marginals[""], float(self.total),
                              sigma, self.randomness.release("measurement"))
        return scores, sigma

    def measure_noise(self) -> list[float]:
        return [self.noise.measure]




def coarsen(meas: Measurement, attr: Any) -> Measurement:
    """A fine 1-way measurement summed into ``attr``'s bins (the missing cell kept).

    A bin of w fine cells carries the sum of w independent noises: its std is
    sqrt(w) times the fine cells' (``Measurement.cell_scale``)."""
    fine = getattr(attr, "fine", None)
    if fine is None:
        return meas
    values = np.asarray(meas.values, dtype=float)
    cuts = np.asarray(fine.cuts)
    value_part, rest = values[..., : fine.count], values[..., fine.count:]
    summed = np.add.reduceat(value_part, cuts[:-1], axis=-1)
    scale = np.concatenate([np.sqrt(np.diff(cuts)), np.ones(rest.shape[-1])])
    return Measurement(meas.clique, np.concatenate([summed, rest], axis=-1), meas.stddev,
                       by_site=meas.by_site, kind=meas.kind, cell_scale=scale)
