"""A site's side of a measured study: noisy marginal counts, not a training round.

The coordinator asks (``common/protocol.py``, a ``query.marginal`` message) for one of:

- ``measure``: the site's counts of a list of marginals plus Gaussian noise (on the
  cells the request's ``BINNING`` names: fine cells for the ``fine`` release), its own
  noise level calibrated from the study's plan and the site's own budget
  (``common/generators/marginal/plan.py``);
  The ``pairs`` release (``common/generators/marginal/code_pairs.py``) counts, for
  each asked pair of binary codes, the patients with both, a patient with more than
  the plan's ``pair_bound`` of the codes named weighted down so that their pairs weigh
  as much, in L2, as ``pair_bound`` codes' pairs (deterministic, no draw); the noise is
  the site's secret randomness and the release is charged C(pair_bound, 2).
  The ``links`` release (``common/generators/marginal/event_links.py``) counts, for
  each asked binary covariate, the patients holding it in each cell of the survival
  event (and time), a patient holding more than the plan's ``link_bound`` of them
  weighted down the same way; charged ``link_bound``;
- ``score``: for each candidate marginal, the L1 distance between the site's counts
  and the model's marginal the coordinator sent, plus Gaussian noise;
- ``decrypt`` (encrypted studies): decrypt a sum of the sites' ciphertexts and return
  it, flooded, as the release step of an encrypted training study does.

Every noisy release is charged to the site's one ledger (the same ``PrivacyLedger``
as DP-SGD, in ``context.state`` and ``state-dir``) before anything leaves, and refused
when it would pass the site's budget. The noise is drawn from the site's
``DPRandomness`` (secret unless a test seeded the site), never from anything the
coordinator sends. Under ``secure-aggregation = "ckks"`` the vector leaves only as
CKKS ciphertexts of ``values / count-bound`` (so every slot stays within the scheme's
range), and a site set up with keys refuses to answer in clear.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..common import protocol as P
from ..common.encryption import (
    EncryptedUpdateError,
    EncryptionContextError,
    KeySetupError,
    StateLayout,
)
from ..common.encryption.masks import (
    MaskError,
    Roster,
    load_roster,
    mask,
    pair_keys,
    request_digest,
)
from ..common.generators.marginal.code_pairs import (
    entry_columns,
    noisy_pair_counts,
    pair_request_problem,
    pair_units,
)
from ..common.generators.marginal.codes import noisy_code_histogram
from ..common.generators.marginal.discretize import Discretizer
from ..common.generators.marginal.event_links import (
    link_covariates,
    link_request_problem,
    link_tails,
    noisy_link_counts,
    whole_covariates,
)
from ..common.generators.marginal.measure import noisy_marginals, noisy_scores, noisy_split
from ..common.generators.marginal.model import study_discretizer
from ..common.generators.marginal.outcome_split import Split, outcome_split
from ..common.generators.marginal.plan import (
    CODES,
    FINE,
    LINKS,
    MEASURE,
    ONE_WAY,
    PAIRS,
    SPLIT,
    MarginalPlan,
    NoiseLevels,
    calibrate,
)
from ..common.protocol import SiteReply
from ..common.schema import Schema
from ..common.study import SiteConfig, StudyConfig, schema_fingerprint
from ..common.table import TableCheckError, read_table
from .site import (
    BUDGET_EXHAUSTED,
    INVALID_DATA,
    MIN_SHARE_STD,
    SPLIT_CHARGE_MARGIN,
    SiteState,
    over_budget,
    site_schema,
    split_metrics,
    split_problem,
    status_metrics,
)

if TYPE_CHECKING:
    from ..common.privacy.release_noise import ReleaseNoise

log = logging.getLogger("fedsynth.site")

MEASURED = P.Status.TRAINED  # a reply that released something (the round logs count it)
REFUSED = P.Status.REFUSED
NOT_ENCRYPTED = P.Status.ENCRYPTION_REQUIRED


@dataclass
class MeasureReply:
    reply: SiteReply
    values: np.ndarray | None = None  # in clear
    chunks: list[bytes] | None = None  # encrypted
    layout_json: str = ""
    masked: np.ndarray | None = None  # pairwise-masked, uint64


#: A split-noise site's selection score is scored against its exact count: sensitivity 2.
SPLIT_SCORE_SENSITIVITY = 2.0


_CELLS: dict[tuple[Any, ...], np.ndarray] = {}

# The largest noisy count a site scores against (public, no table is near it). The score
# ``||M - total p||_1`` is computed in floating point: at ``total p`` near 2**59 the
# subtraction rounds to multiples of 128, so one patient moved a score by 128 with the
# noise rounded away. ``p`` must be a probability vector (``_is_distribution``), but the
# plan, hence the 1-way noise that ``total`` carries, is the coordinator's: a 1-way share
# of 1e-40 made the noisy count ~1e20 for next to no epsilon. Below 2**24 every value of
# a score stays below 2**25, where the rounding is under 1e-8 of a count per cell.
SCORE_TOTAL_CEILING = 2**24


def _cached(site: SiteConfig, schema: Schema, discretizer: Discretizer, what: str,
            table: Callable[[pd.DataFrame], np.ndarray], *key: Any) -> np.ndarray:
    """A table made from the site's rows (read, checked and cached once per process)."""
    path = Path(site.data_path)
    mtime = path.stat().st_mtime if path.exists() else -1.0
    full = (str(path.resolve()), mtime, schema_fingerprint(schema), what,
            tuple(discretizer.shape.items()), *key)
    if full not in _CELLS:
        _CELLS[full] = table(read_table(path, schema))
    return _CELLS[full]


def site_cells(site: SiteConfig, schema: Schema, discretizer: Discretizer, bins: int,
               binning: str) -> np.ndarray:
    """The site's rows as cell indices of ``discretizer`` (the request's cells)."""
    return _cached(site, schema, discretizer, "cells", discretizer.encode, bins, binning)


def site_code_presence(site: SiteConfig, schema: Schema, discretizer: Discretizer
                       ) -> np.ndarray:
    """The site's code-histogram entries (0/1 per row and entry, ``codes.py``)."""
    return _cached(site, schema, discretizer, "codes", discretizer.code_presence)


def noise_levels(site: SiteConfig, study: StudyConfig, plan: MarginalPlan) -> NoiseLevels:
    """This site's noise for the plan: from its own budget, or its fixed multiplier."""
    if site.noise_multiplier is not None:
        s = site.noise_multiplier
        return NoiseLevels.flat(s)
    return calibrate(plan, site.epsilon, site.delta, study.accountant)


@dataclass
class _Request:
    """A checked marginal request: the site's cells and what is asked of them."""

    cells: np.ndarray
    plan: MarginalPlan
    cliques: list[tuple[str, ...]]
    names: list[str]
    sizes: dict[str, int]
    presence: np.ndarray  # the code histogram's 0/1 entries per row (codes.py)
    groups: list[str]  # the attributes it covers, in order
    direct: list[str]  # the binary codes among them (each one histogram entry)
    columns: dict[str, int]  # each code attribute's first column in ``presence``
    linkable: list[str]  # the binary covariates a link release may name (event_links.py)
    tails: list[tuple[str, ...]]  # the survival tails a link release may count in
    whole: list[str]  # the categorical covariates, counted whole in a link release
    split: Split | None  # the schema's outcome split (outcome_split.py), if it has one

    def releases(self, kind: str) -> int:
        """Sensitivity-1 Gaussians this release is worth (plan.py explains each)."""
        if kind == CODES:
            return self.plan.code_bound
        if kind == LINKS:
            return self.plan.link_bound
        return pair_units(self.plan.pair_bound) if kind == PAIRS else len(self.cliques)

    def problem(self, kind: str) -> str:
        """Why this request cannot be answered as a ``kind`` release ('' if it can)."""
        if kind not in (ONE_WAY, MEASURE, FINE, "score", CODES, PAIRS, LINKS, SPLIT):
            return f"unknown release kind {kind!r}"
        if kind == SPLIT and not (self.plan.outcome_split and self.split is not None):
            return "the study's plan has no collapsed-outcome ('split') releases"
        if kind == SPLIT:
            return self.split.problem(self.cliques)
        if kind == CODES and ([c[0] for c in self.cliques] != self.groups
                              or not self.plan.code_bound):
            return "a code histogram request must name every code attribute of the schema"
        if kind == PAIRS and not self.plan.pair_bound:
            return "the study's plan has no share for 'pairs' releases"
        if kind == PAIRS:
            return pair_request_problem(self.cliques, self.direct, self.plan.pair_codes)
        if kind == LINKS and not self.plan.link_bound:
            return "the study's plan has no share for 'links' releases"
        if kind == LINKS:
            return link_request_problem(self.cliques, self.linkable, self.tails,
                                        self.plan.link_covariates)
        return ""


def answer(
    site: SiteConfig, study: StudyConfig, config: dict[str, Any],
    model_marginals: dict[str, np.ndarray], ckks: dict[str, Any], state: SiteState,
) -> MeasureReply:
    """Answer one marginal message; mutates ``state`` only when something is released."""
    schema = site_schema(site, state, str(config[P.SCHEMA_FINGERPRINT]))
    if isinstance(schema, SiteReply):
        return MeasureReply(schema)
    if problem := site.aggregation_problem(study):
        return MeasureReply(SiteReply(NOT_ENCRYPTED, status_metrics(site, state),
                                      problems=[problem]))
    op = str(config.get(P.OP, ""))
    if op == P.STATUS_OP:  # releases nothing: the budget every reply states
        return MeasureReply(SiteReply(MEASURED, _metrics(site, state)))
    if study.trains:  # a deep study's sites release a grid and train, never this
        return _refuse(site, state, f"a {study.generator} study's sites answer no marginal "
                       "request: only a marginal study measures counts")
    if op == P.DECRYPT_OP and study.encrypted:
        return _decrypt(site, study, ckks, state)
    if op not in (P.MEASURE_OP, P.SCORE_OP):
        return _refuse(site, state, f"unknown marginal operation {op!r}")
    request = _parse_request(site, study, schema, config, state)
    if isinstance(request, MeasureReply):
        return request
    noise = noise_levels(site, study, request.plan) if site.dp else NoiseLevels.flat(0.0)
    kind = str(config.get(P.RELEASE_KIND, MEASURE)) if op == P.MEASURE_OP else "score"
    if problem := request.problem(kind):
        return _refuse(site, state, problem)
    h = study.honest_sites  # the study's split (1: every site adds its whole noise)
    noise = _study_noise(site, study, config, noise, state)
    if isinstance(noise, MeasureReply):
        return noise
    carried = noise.of(kind)  # the std the sum carries
    if site.dp and not math.isfinite(carried):
        return _refuse(site, state, f"the study's plan has no share for {kind!r} releases")
    # what the ledger charges: the sum's noise (a split's a hair less: a sum of discrete
    # Gaussians is not one, SPLIT_CHARGE_MARGIN)
    sigma = carried * (SPLIT_CHARGE_MARGIN if h > 1 else 1.0)
    added = noise.split(h)  # what this site adds: 1/h of each variance (h = 1: all)
    masks = None
    if study.masked:
        masks = _masks(site, study, config, model_marginals, state, h)
        if isinstance(masks, MeasureReply):
            return masks
    if site.dp and h > 1 and added.of(kind) < MIN_SHARE_STD:
        return _refuse(site, state, _thin_share(h, kind, added.of(kind)))
    if site.dp and _over_budget(site, study, state, sigma, request.releases(kind)):
        return MeasureReply(SiteReply(BUDGET_EXHAUSTED, _metrics(site, state)))
    if masks is not None:  # from here the site answers: its digest is used up
        state.masked_digests.append(masks[2].hex())
    release = site.randomness(f"{study.study_id}:marginal:{config.get(P.STEP, 0)}").release(
        "measurement")
    drawn = added.of(kind)  # std of this site's draw, in the release's own units
    if op == P.MEASURE_OP:
        values = _measure(request, drawn, release, kind, state)
    else:
        if h > 1:  # scores against the exact count: sensitivity 2 (_scores), so twice
            drawn *= SPLIT_SCORE_SENSITIVITY  # the noise for the same charge
        values = _scores(site, request, model_marginals, drawn, release, state,
                         exact_count=h > 1)
        if isinstance(values, MeasureReply):
            return values
    state.split_h = h
    if site.dp:
        state.ledger.record(sigma, 1.0, request.releases(kind))
        if h > 1:
            state.shares.append((sigma, added.of(kind), request.releases(kind)))
    metrics = {
        **_metrics(site, state), P.HONEST_SITES: float(h),
        P.SIGMA_ONE_WAY: added.one_way, P.SIGMA_SCORE: added.score,
        P.SIGMA_MEASURE: added.measure, P.SIGMA_RELEASED: drawn,
        P.SIGMA_CHARGED: sigma,
    }
    if masks is not None:
        return _masked(site, state, metrics, values, *masks)
    return _wrap(site, study, state, metrics, values)


def _thin_share(h: int, kind: str, share: float) -> str:
    return (f"split {h} ways, this {kind!r} release's noise would be {share:.3g} (std, "
            f"counts), below {MIN_SHARE_STD:g}, where a sum of discrete Gaussians is no "
            "longer charged exactly as one: lower honest-sites or the budget")


def _study_noise(site: SiteConfig, study: StudyConfig, config: dict[str, Any],
                 own: NoiseLevels, state: SiteState) -> NoiseLevels | MeasureReply:
    """The noise levels the study's sum carries: this site's own, or with H > 1 the
    study's common levels (every site adds 1/H of one common noise, the most private
    site's); refused under a split other than the study's first release's."""
    if problem := split_problem(state, study.honest_sites):
        return _refuse(site, state, problem)
    if study.honest_sites == 1:
        return own
    return _common_noise(site, config, own, state)


def _over_budget(site: SiteConfig, study: StudyConfig, state: SiteState, sigma: float,
                 count: int) -> bool:
    """Whether ``count`` releases at noise ``sigma`` would take the ledger past the
    site's budget (checked before anything is drawn)."""
    state.ledger.mechanism = study.accountant
    nxt = state.ledger.copy()
    nxt.record(sigma, 1.0, count)
    return over_budget(site, nxt)


def _common_noise(site: SiteConfig, config: dict[str, Any], own: NoiseLevels,
                  state: SiteState) -> NoiseLevels | MeasureReply:
    """The study's common noise levels, checked against what this site needs.

    Each honest site adds 1/H of the *same* variance, so the H honest sites' sum carries
    all of it whatever the others' budgets (a site adding 1/H of its own, smaller
    noise would leave a more private site short). The levels are bound into the masks
    with the rest of the request: a sum is readable only when every site got the same.
    A coordinator that sends levels below this site's own calibration is refused."""
    if not site.dp:
        return _refuse(site, state, "a site without DP adds no noise: it cannot take part "
                       "in a study that splits the noise")
    try:
        common = NoiseLevels.from_json(str(config[P.NOISE_LEVELS]))
    except (KeyError, ValueError, TypeError) as exc:
        return _refuse(site, state, f"a split-noise request needs the study's common noise "
                       f"levels: {exc}")
    short = [f.name for f in fields(NoiseLevels)
             if getattr(common, f.name) < getattr(own, f.name) * (1 - 1e-9)]
    if short:
        return _refuse(site, state, "the study's common noise is below this site's own "
                       f"(its budget's calibration, or its noise-multiplier) for "
                       f"{', '.join(short)}: refused")
    return common


def _metrics(site: SiteConfig, state: SiteState) -> dict[str, float]:
    """Every reply's status metrics, with the site's distributed-noise setting and its
    epsilon were all the other sites to collude with the coordinator (both public:
    functions of its trust setting and the plans)."""
    return {**status_metrics(site, state), **split_metrics(site, state, site.honest_sites)}


def _masks(site: SiteConfig, study: StudyConfig, config: dict[str, Any],
           model_marginals: dict[str, np.ndarray], state: SiteState, h: int
           ) -> tuple[Roster, dict[str, bytes], bytes] | MeasureReply:
    """The roster, pair keys and request digest of a masked reply, or the refusal.

    Checked before anything is drawn or charged: the roster (a site with no keys
    refuses), h against it (more honest sites than the roster holds is a trust that
    cannot be), and the digest (never two vectors under one mask)."""
    try:
        roster = load_roster(site.name, site.key_dir, site.peer_keys)
    except KeySetupError as exc:
        return MeasureReply(SiteReply(P.Status.NO_KEYS, _metrics(site, state),
                                      problems=[str(exc)]))
    if h > roster.size:
        return _refuse(site, state, f"honest-sites = {h} but the roster (peer-keys) holds "
                       f"{roster.size} sites with this one: lower honest-sites")
    digest = request_digest(P.MARGINAL_MESSAGE, config, model_marginals)
    if digest.hex() in state.masked_digests:
        return _refuse(site, state, "this masked request was answered already: a site "
                       "never masks two vectors with one mask (ask a new step)")
    return roster, pair_keys(roster, study.study_id), digest


def _masked(site: SiteConfig, state: SiteState, metrics: dict[str, float],
            values: np.ndarray, roster: Roster, keys: dict[str, bytes], digest: bytes
            ) -> MeasureReply:
    """The released vector plus this site's masks: readable only in the roster's sum."""
    try:
        masked = mask(values, roster, keys, digest)
    except MaskError as exc:
        return MeasureReply(SiteReply(P.Status.ENCRYPTION_FAILED, _metrics(site, state),
                                      problems=[str(exc)]))
    return MeasureReply(SiteReply(MEASURED, metrics), masked=masked)


def _refuse(site: SiteConfig, state: SiteState, problem: str) -> MeasureReply:
    return MeasureReply(SiteReply(REFUSED, status_metrics(site, state), problems=[problem]))


def _parse_request(
    site: SiteConfig, study: StudyConfig, schema: Schema, config: dict[str, Any],
    state: SiteState,
) -> _Request | MeasureReply:
    """The site's cells and the plan and cliques asked for, or the refusal."""
    from ..common.generators.marginal import MarginalGenerator

    try:  # the request's public parts: a problem here may be quoted back
        params = {**MarginalGenerator.defaults, **study.generator_params}
        bins = int(params["bins"])
        binning = str(config.get(P.BINNING, ""))
        disc = study_discretizer(schema, params, binning)  # public cells, checked
        plan = MarginalPlan.from_dict(json.loads(str(config[P.PLAN])))
        cliques = [tuple(c) for c in json.loads(str(config[P.CLIQUES]))]
        names = disc.names
        if not cliques or any(a not in names for c in cliques for a in c):
            raise ValueError("the request names attributes that are not in the schema")
    except (KeyError, ValueError, TypeError) as exc:
        return _refuse(site, state, f"malformed marginal request: {exc}")
    try:  # the site's rows: no exception text of theirs is quoted to the coordinator
        cells = site_cells(site, schema, disc, bins, binning)
        presence = site_code_presence(site, schema, disc)
    except TableCheckError as exc:
        log.warning("site %s: %s", site.name, exc)
        return MeasureReply(SiteReply(INVALID_DATA, status_metrics(site, state),
                                      problems=exc.shareable()))
    return _Request(cells, plan, cliques, names, disc.shape, presence, list(disc.code_attrs),
                    disc.direct_codes, entry_columns(disc.code_attrs),
                    link_covariates(disc, schema), link_tails(schema, disc.shape),
                    whole_covariates(disc), outcome_split(schema, disc))


def _measure(request: _Request, sigma: float, release: ReleaseNoise, kind: str,
             state: SiteState) -> np.ndarray:
    """The noisy marginals of the cliques; the 1-way release also sets the noisy count."""
    if kind == CODES:
        return noisy_code_histogram(request.presence, request.plan.code_bound, sigma, release)
    if kind == PAIRS:
        return noisy_pair_counts(request.presence, request.columns, request.cliques,
                                 request.plan.pair_bound, sigma, release)
    if kind == LINKS:
        return noisy_link_counts(request.cells, request.names, request.sizes,
                                 request.cliques, request.plan.link_bound, sigma, release,
                                 request.whole)
    if kind == SPLIT:
        return np.concatenate(noisy_split(request.cells, request.names, request.sizes,
                                          request.cliques, request.split, sigma, release))
    parts = noisy_marginals(request.cells, request.names, request.sizes, request.cliques,
                            sigma, release)
    if kind == ONE_WAY:
        state.noisy_count = max(1.0, float(np.mean([p.sum() for p in parts])))
    return np.concatenate(parts)


def _scores(
    site: SiteConfig, request: _Request, model_marginals: dict[str, np.ndarray], sigma: float,
    release: ReleaseNoise, state: SiteState, exact_count: bool = False,
) -> np.ndarray | MeasureReply:
    """The noisy selection scores of the cliques against the model's marginals.

    ``||M - n p||_1`` moves by at most 1 with one patient when ``n`` is fixed by an
    earlier DP release: the site's own noisy 1-way count. A site that splits its noise
    has no such release of its own (its share of the 1-way noise is 1/h of what its
    budget needs; only the sum is), so it scores against its exact count, and one
    patient then moves the score by at most ``||e_cell - p||_1 <= 2``
    (``exact_count``; the caller doubles the noise)."""
    try:
        model = [np.asarray(model_marginals[f"p.{i}"], dtype=float)
                 for i in range(len(request.cliques))]
        if any(m.size != int(np.prod([request.sizes[a] for a in c]))
               for m, c in zip(model, request.cliques, strict=True)):
            raise ValueError("a model marginal does not fit its clique")
        if any(not _is_distribution(m) for m in model):
            raise ValueError("a model marginal is not a probability vector (finite, "
                             "non-negative, summing to at most 1)")
    except (KeyError, ValueError) as exc:
        return _refuse(site, state, f"malformed score request: {exc}")
    # the check lets a sum reach 1 + 1e-6 (float rounding of an honest marginal), and a
    # split score's sensitivity is 1 + sum(p): scaled to at most 1, it is 2, as charged
    model = [m / max(1.0, float(m.sum())) for m in model]
    if exact_count:
        return noisy_scores(request.cells, request.names, request.sizes, request.cliques,
                            model, float(len(request.cells)), sigma, release)
    if state.noisy_count is None:
        return _refuse(site, state, "scores need the site's noisy 1-way release first")
    if state.noisy_count > SCORE_TOTAL_CEILING:
        return _refuse(site, state, f"the site's noisy count is above {SCORE_TOTAL_CEILING}: "
                       "a 1-way release at that noise leaves no count to score against")
    return noisy_scores(request.cells, request.names, request.sizes, request.cliques, model,
                        state.noisy_count, sigma, release)


def _is_distribution(p: np.ndarray) -> bool:
    """Whether ``p`` is what an honest coordinator sends: a normalised marginal.

    The score's sensitivity 1 holds in exact arithmetic for any ``p``, not in floating
    point: with ``total * p`` near 2**59 in one cell the subtraction rounds to a multiple
    of 128, so one patient more or less in that cell moves the score by 128 (or 0), and
    the noise (std a few counts) is rounded away with it: the coordinator read whether a
    cell held 63 or 64 patients, with certainty. Within [0, 1] the values stay below the
    site's count, where the rounding is below 1e-9 of a count."""
    return bool(np.all(np.isfinite(p)) and np.all(p >= 0) and p.sum() <= 1.0 + 1e-6)


def _wrap(site: SiteConfig, study: StudyConfig, state: SiteState,
          metrics: dict[str, float], values: np.ndarray) -> MeasureReply:
    """The released vector: in clear, or encrypted under the study's CKKS key.

    Called after the charge: a vector CKKS cannot hold (noisy counts beyond the
    coordinator's ``count-bound``) is a failed reply, not an exception, so the state
    (the charge) is saved and a failure is one more function of a charged release."""
    if not study.encrypted:
        return MeasureReply(SiteReply(MEASURED, metrics), values=values)
    from .secure import encrypt_counts

    try:
        chunks, layout_json = encrypt_counts(site, study, values)
    except (KeySetupError, EncryptionContextError) as exc:
        return MeasureReply(SiteReply(P.Status.NO_KEYS, metrics, problems=[str(exc)]))
    except ValueError as exc:
        return MeasureReply(SiteReply(P.Status.ENCRYPTION_FAILED, metrics, problems=[
            f"{exc}: raise the study's count-bound"]))
    state.decryptable.append(layout_json)
    return MeasureReply(SiteReply(MEASURED, metrics), chunks=chunks, layout_json=layout_json)


def _decrypt(site: SiteConfig, study: StudyConfig, ckks: dict[str, Any], state: SiteState
             ) -> MeasureReply:
    """Decrypt a sum of noisy vectors (DP post-processing: nothing is charged), one per
    vector this site encrypted in the study and laid out as one of them: each release
    is summed once, and a decryption oracle (many decryptions of crafted ciphertexts,
    each flooded afresh) is what the CKKS key must never serve."""
    from .secure import decrypt_counts

    try:
        layout = StateLayout.from_json(str(ckks[P.LAYOUT])).to_json()
        if layout not in state.decryptable:
            raise ValueError("this site decrypts one sum per vector it encrypted in this "
                             "study, laid out as that vector, and has none left")
        flooded = decrypt_counts(site, study, list(ckks[P.CHUNKS]), layout)
    except (KeySetupError, EncryptionContextError, EncryptedUpdateError, KeyError,
            ValueError) as exc:
        return MeasureReply(SiteReply(REFUSED, status_metrics(site, state),
                                      problems=[f"refused to decrypt: {exc}"]))
    state.decryptable.remove(layout)
    return MeasureReply(SiteReply(MEASURED, status_metrics(site, state)), values=flooded)


def measure_reply(site: SiteConfig, study: StudyConfig, content: Any, state: SiteState) -> Any:
    """The Flower reply content of one marginal message (see ``common/protocol.py``)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    config = dict(content[P.CONFIG])
    model = content.get(P.MODEL_RECORD)
    marginals = {k: v.numpy() for k, v in model.items()} if model is not None else {}
    ckks = dict(content[P.CKKS_COUNTS]) if P.CKKS_COUNTS in content else {}
    result = answer(site, study, config, marginals, ckks, state)
    reply = result.reply
    out = reply.to_content(site.name)
    if result.values is not None:
        out[P.COUNTS_RECORD] = ArrayRecord({P.VALUES: Array(np.asarray(result.values))})
    if result.chunks is not None:
        out[P.CKKS_COUNTS] = ConfigRecord({P.CHUNKS: result.chunks, P.LAYOUT: result.layout_json})
    if result.masked is not None:
        out[P.MASKED_COUNTS] = ArrayRecord({P.VALUES: Array(np.asarray(result.masked))})
    return out
