"""The coordinator's side of a measured study (``generator = "marginal"``).

``run_study`` hands a marginal study here before it builds any training strategy. It
first asks each site for its budget (one ``status`` request, nothing released) and
plans for the noise the sums of those sites will carry (``MarginalGenerator.plan``);
then it runs the same engine as a central fit (``common/generators/marginal``):
1-way marginals, then rounds of DP selection scores and measurements, each a
``query.marginal`` message to every site (``common/protocol.py``). It never sees a
row: it adds the sites' noisy vectors and fits the graphical model to the totals.

- In clear, it keeps each site's noisy vector, and with ``site_attribute`` (off by
  default, on with a causal graph and at most 8 sites) fits them as measurements of the marginal
  extended by a site attribute: the model then knows each hospital's case mix
  (disease rates from 0.36 to 0.93 in the heart study), a site's selection score
  compares the site to the model's picture of that site, and
  ``sample(..., site=...)`` draws one hospital's patients. Summing the same vectors
  instead is post-processing too; both cost the same privacy.
- Under ``secure-aggregation = "ckks"`` each site sends its vector encrypted; the
  coordinator adds ciphertexts with its key-less context and asks one site to decrypt
  the sum (flooded, as the final release of an encrypted training study), so it only
  ever holds totals. No site attribute then: that would need per-site vectors.
- Under ``"masks"`` each site sends its vector plus pairwise masks that cancel only in
  the sum of every site's (``common/encryption/masks.py``); no site can open another's,
  so a site may add a share of its noise (``honest-sites``). A step then needs every
  site: one that refuses fails the study. No site attribute either.

Every site's reply carries the epsilon it has spent; a site past its budget refuses
and the study goes on with the others (a pooled total then covers fewer sites: the
round log says which).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ..common import protocol as P
from ..common.encryption import (
    EncryptedUpdateError,
    KeySetupError,
    StateLayout,
    add_encrypted,
    check_ciphertexts,
    load_public_context,
)
from ..common.encryption.masks import MaskError, unmask_sum
from ..common.generators.marginal import MarginalGenerator
from ..common.generators.marginal.event_links import slice_length, whole_covariates
from ..common.generators.marginal.fit import Clique, Measurement, noisy_total
from ..common.generators.marginal.model import NO_DP_NOISE
from ..common.generators.marginal.outcome_split import Split, outcome_split
from ..common.generators.marginal.plan import (
    CODES,
    LINKS,
    PAIRS,
    SPLIT,
    MarginalPlan,
    NoiseLevels,
    budget_noise,
    calibrate,
    summed_noise,
)
from ..common.schema import Schema
from ..common.study import ConfigError, StudyConfig, schema_fingerprint
from .strategy import RoundLog, SiteRound

log = logging.getLogger("fedsynth.coordinator")
MEASURED = P.Status.TRAINED  # a reply that released its vector (the round logs count it)


class NoSiteAnswered(RuntimeError):
    """A marginal request got no usable reply from any site."""


class FederatedMeasurer:
    """The sites, as the marginal engine sees them: ask, check, add."""

    def __init__(self, grid: Grid, study: StudyConfig, schema: Schema, plan: MarginalPlan,
                 sizes: dict[str, int], by_site: Callable[[int], bool],
                 on_round: Callable[[RoundLog], None] | None = None,
                 code_lengths: dict[str, int] | None = None,
                 whole: Sequence[str] = (), split: Split | None = None) -> None:
        self.grid, self.study, self.plan, self.sizes = grid, study, plan, sizes
        self.split = split  # the outcome's public split: a SPLIT vector's layout
        self.code_lengths = code_lengths or {}  # the code histogram's layout (codes.py)
        self.whole = list(whole)  # categorical covariates: whole link slices (event_links)
        self.by_site = by_site  # the answering sites' count -> model the site?
        self.secure = study.encrypted or study.masked  # sums only: no site attribute
        self.public_ctx = None
        if study.encrypted:
            if not study.public_context:
                raise ConfigError("secure-aggregation = 'ckks' needs public-context (the "
                                  "coordinator's key-less CKKS context)")
            try:
                self.public_ctx = load_public_context(study.public_context)
            except KeySetupError as exc:
                raise ConfigError(str(exc)) from None
        self.base = {**study.to_flat(), P.SCHEMA_FINGERPRINT: schema_fingerprint(schema),
                     P.PLAN: json.dumps(plan.to_dict())}
        self.sites: list[str] = []  # the model's SITE attribute, fixed by the first answers
        self.node_site: dict[int, str] = {}
        self.noise: dict[str, dict[str, float]] = {}  # site -> its reported noise levels
        self.history: list[RoundLog] = []
        self.on_round = on_round
        self.step = 0
        self.bytes_in = 0
        self.asked = 0  # sites asked in the last step (a masked sum needs every one)
        self.latest: dict[str, dict[str, float]] = {}  # site -> its last release's metrics
        self.budgets: list[tuple[float, float]] = []  # the sites' stated budgets

    def use_plan(self, plan: MarginalPlan) -> None:
        """Send ``plan`` with every request from now on (each site calibrates to it).

        A split-noise study (``honest-sites`` H > 1) also sends the common noise levels:
        kind by kind the largest any site's budget needs, so every honest site adds 1/H
        of the same variance (each site refuses levels below its own need)."""
        self.plan = plan
        self.base[P.PLAN] = json.dumps(plan.to_dict())
        if self.study.honest_sites > 1:
            if not self.budgets:
                raise ConfigError("a split-noise study needs every site's budget: no site "
                                  "stated one (sites without DP cannot split noise)")
            self.base[P.NOISE_LEVELS] = NoiseLevels.largest(
                [calibrate(plan, e, d, self.study.accountant) for e, d in self.budgets]
            ).to_json()

    def summed_noise(self) -> float | None:
        """The noise scale the sums will carry (``plan.summed_noise``), from the budget
        each connected site states: one status message, nothing released, not a round
        of the study. None if no site states a budget (the plan of one holder then)."""
        config = {**self.base, P.OP: P.STATUS_OP}
        messages = [Message(RecordDict({P.CONFIG: ConfigRecord(config)}), dst_node_id=node,
                            message_type=P.MARGINAL_MESSAGE) for node in self._nodes()]
        budgets: list[tuple[float, float]] = []
        for msg in self.grid.send_and_receive(messages, timeout=self.study.round_timeout):
            if msg.has_error():
                continue
            metrics = P.SiteReply.from_content(msg.content)[1].metrics
            if metrics.get(P.EPSILON_BUDGET, -1.0) > 0 and metrics.get(P.DELTA, 0.0) > 0:
                budgets.append((metrics[P.EPSILON_BUDGET], metrics[P.DELTA]))
        self.budgets = budgets
        if not budgets:
            return None
        h = self.study.honest_sites
        if h > 1:  # every site adds 1/H of the most private site's noise
            top = max(budget_noise(e, d, self.study.accountant) for e, d in budgets)
            return top * math.sqrt(len(budgets) / h)
        return summed_noise(budgets, self.study.accountant)

    # -- transport ----------------------------------------------------------------------
    def _nodes(self) -> list[int]:
        deadline = time.monotonic() + self.study.round_timeout
        while (len(nodes := sorted(self.grid.get_node_ids())) < self.study.min_sites
               and time.monotonic() < deadline):
            time.sleep(0.5)
        return nodes

    def _ask(self, op: str, cliques: Sequence[Clique], kind: str = "",
             model: dict[int, list[np.ndarray]] | None = None
             ) -> list[tuple[str, dict[str, float], Any]]:
        """One message per site; the replies that released a vector, with their site."""
        self.step += 1
        config = {**self.base, P.OP: op, P.CLIQUES: json.dumps([list(c) for c in cliques]),
                  P.STEP: self.step, P.SERVER_ROUND: self.step}
        if kind:
            config[P.RELEASE_KIND] = kind
        messages = []
        for node in self._nodes():
            content = RecordDict({P.CONFIG: ConfigRecord(config)})
            if model is not None:
                arrays = model.get(node, model.get(-1, []))
                content[P.MODEL_RECORD] = ArrayRecord(
                    {f"p.{i}": Array(np.asarray(a, dtype=np.float64))
                     for i, a in enumerate(arrays)})
            messages.append(Message(content, dst_node_id=node, message_type=P.MARGINAL_MESSAGE))
        self.asked = len(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=self.study.round_timeout))
        logged, good = [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                logged.append(SiteRound(site=self.node_site.get(node, f"node {node}"),
                                        status=P.Status.FAILED,
                                        reason=str(msg.error.reason)[:300]))
                continue
            name, reply = P.SiteReply.from_content(msg.content)
            metrics = reply.metrics
            name = name or f"node {node}"
            self.node_site[node] = name
            status = reply.status
            budget = metrics.get(P.EPSILON_BUDGET, -1.0)
            # loss: none (a measurement); NaN keeps the round printers' formats working
            entry = SiteRound(site=name, status=status, epsilon=metrics.get(P.EPSILON),
                              loss=math.nan, problems=reply.problems,
                              budget=budget if budget > 0 else None,
                              delta=metrics.get(P.DELTA),
                              reproducible_noise=bool(metrics.get(P.REPRODUCIBLE_NOISE, 0.0)),
                              honest_sites=int(metrics.get(P.HONEST_SITES, 1.0)))
            if status == MEASURED and budget > 0 and metrics.get(P.EPSILON, 0) > budget * (
                    1 + 1e-6):
                entry.status = P.Status.REFUSED
                entry.reason = "reported epsilon passes its budget"
            elif status == MEASURED:
                good.append((name, metrics, msg.content))
                self.latest[name] = metrics
            else:
                entry.reason = "; ".join(entry.problems) or status
            logged.append(entry)
        record = RoundLog(round=self.step, sites=logged, aggregated=bool(good))
        self.history.append(record)
        if self.on_round is not None:
            self.on_round(record)
        if not good:
            reasons = "; ".join(f"{s.site}: {s.status} ({s.reason})" for s in logged)
            raise NoSiteAnswered(f"no site answered the marginal request {op} "
                                 f"({reasons or 'no reply'})")
        return good

    def _vectors(self, good: list[tuple[str, dict[str, float], Any]], length: int
                 ) -> tuple[dict[str, np.ndarray] | np.ndarray, list[str]]:
        """Per-site vectors in clear, or the sum under CKKS or masks."""
        if self.study.masked:
            return self._unmask(good, length), [name for name, _, _ in good]
        if not self.secure:
            out: dict[str, np.ndarray] = {}
            for name, _, content in good:
                values = np.asarray(content[P.COUNTS_RECORD][P.VALUES].numpy(), dtype=float)
                if values.shape != (length,) or not np.all(np.isfinite(values)):
                    log.warning("marginal: %s sent a vector of shape %s, expected (%d,); "
                                "left out", name, values.shape, length)
                    continue
                out[name] = values
            return out, list(out)
        layout = StateLayout.from_state({P.VALUES: np.zeros(length)})
        chunks, names = [], []
        for name, _, content in good:
            try:
                sent = list(dict(content[P.CKKS_COUNTS])[P.CHUNKS])
                check_ciphertexts(self.public_ctx, sent, layout)
            except (KeyError, EncryptedUpdateError, ValueError) as exc:
                log.warning("marginal: %s sent unusable ciphertexts (%s); left out", name, exc)
                continue
            chunks.append(sent)
            names.append(name)
        if not chunks:
            raise NoSiteAnswered("no site sent usable ciphertexts")
        summed = add_encrypted(self.public_ctx, chunks)
        return self._decrypt(summed, layout, length), names

    def _unmask(self, good: list[tuple[str, dict[str, float], Any]], length: int
                ) -> np.ndarray:
        """The sum of every site's masked vector (``common/encryption/masks.py``): the
        masks cancel only when every site asked answered, so a missing one fails the
        step (the others' vectors stay unreadable)."""
        if len(good) < self.asked:
            missing = self.asked - len(good)
            raise NoSiteAnswered(
                f"a masked sum needs every site's vector and {missing} of {self.asked} "
                "did not send one (the round log says why); the others' stay masked")
        vectors = []
        for name, _, content in good:
            try:
                v = np.asarray(content[P.MASKED_COUNTS][P.VALUES].numpy())
            except KeyError:
                raise NoSiteAnswered(f"{name} sent no masked vector") from None
            if v.dtype != np.uint64 or v.shape != (length,):
                raise NoSiteAnswered(f"{name} sent a masked vector of {v.dtype} {v.shape}, "
                                     f"expected uint64 ({length},)")
            vectors.append(v)
        try:
            return unmask_sum(vectors)
        except MaskError as exc:
            raise NoSiteAnswered(str(exc)) from None

    def _decrypt(self, summed: list[bytes], layout: StateLayout, length: int) -> np.ndarray:
        """One site decrypts the sum (one copy of the flooding noise, as for a release)."""
        record = ConfigRecord({P.CHUNKS: summed, P.LAYOUT: layout.to_json()})
        config = {**self.base, P.OP: P.DECRYPT_OP, P.STEP: self.step}
        for node in self._nodes():
            content = RecordDict({P.CONFIG: ConfigRecord(config), P.CKKS_COUNTS: record})
            msg = Message(content, dst_node_id=node, message_type=P.MARGINAL_MESSAGE)
            replies = list(self.grid.send_and_receive([msg], timeout=self.study.round_timeout))
            if not replies or replies[0].has_error():
                continue
            reply = replies[0].content
            if P.SiteReply.site_of(reply)[1] != MEASURED:
                continue
            values = np.asarray(reply[P.COUNTS_RECORD][P.VALUES].numpy(), dtype=float)
            if values.shape == (length,) and np.all(np.isfinite(values)):
                return values
        raise NoSiteAnswered("no site decrypted the summed marginals")

    def use(self, discretizer: Any, binning: str) -> None:
        """Ask for counts on these cells from now on (the sites rebuild them from
        ``binning``, public post-processing of earlier releases)."""
        self.sizes = discretizer.shape
        if binning:
            self.base[P.BINNING] = binning
        else:
            self.base.pop(P.BINNING, None)

    def _length(self, clique: Clique, kind: str) -> int:
        """Entries of one clique's vector: its cells, or its code histogram entries."""
        if kind == CODES:
            return self.code_lengths[clique[0]]
        if kind == PAIRS:  # one count per pair (code_pairs.py)
            return 1
        if kind == LINKS:  # a covariate's slice: the tail's cells (event_links.py)
            return slice_length(clique, self.sizes, self.whole)
        if kind == SPLIT:  # features' cells by outcome group (outcome_split.py)
            assert self.split is not None
            return self.split.length(clique, self.sizes)
        return math.prod(self.sizes[a] for a in clique)

    def _split(self, vector: np.ndarray, cliques: Sequence[Clique], kind: str = ""
               ) -> list[np.ndarray]:
        sizes = [self._length(c, kind) for c in cliques]
        return np.split(vector, np.cumsum(sizes)[:-1])

    # -- the engine's interface ---------------------------------------------------------
    def measure(self, cliques: Sequence[Clique], kind: str) -> list[Measurement]:
        length = sum(self._length(c, kind) for c in cliques)
        good = self._ask(P.MEASURE_OP, cliques, kind)
        for name, metrics, _ in good:
            self.noise[name] = metrics
        sigma = {name: max(m[P.SIGMA_RELEASED], NO_DP_NOISE) for name, m, _ in good}
        vectors, names = self._vectors(good, length)
        if not self.sites and not self.secure and self.by_site(len(names)):
            self.sites = sorted(names)
        if self.sites:
            assert isinstance(vectors, dict)
            stacked = np.zeros((len(self.sites), length))
            sd = np.full(len(self.sites), 1e12)  # a site that did not answer: no weight
            for i, s in enumerate(self.sites):
                if s in vectors:
                    stacked[i], sd[i] = vectors[s], sigma[s]
            parts = self._split(stacked.T, cliques, kind)
            return [Measurement(c, p.T, sd, by_site=True, kind=kind)
                    for c, p in zip(cliques, parts, strict=True)]
        total = (np.sum(list(vectors.values()), axis=0) if isinstance(vectors, dict)
                 else vectors)
        sd_total = math.sqrt(sum(sigma[n] ** 2 for n in names))
        return [Measurement(c, p, np.asarray(sd_total), kind=kind)
                for c, p in zip(cliques, self._split(total, cliques, kind), strict=True)]

    def score(self, cliques: Sequence[Clique], model_marginals: dict[str, list[np.ndarray]]
              ) -> tuple[np.ndarray, float]:
        if "" in model_marginals:
            model = {-1: model_marginals[""]}
        else:
            model = {node: model_marginals[name] for node, name in self.node_site.items()
                     if name in model_marginals}
        good = self._ask(P.SCORE_OP, cliques, model=model)
        vectors, names = self._vectors(good, len(cliques))
        total = (np.sum(list(vectors.values()), axis=0) if isinstance(vectors, dict)
                 else vectors)
        sd = math.sqrt(sum(max(m[P.SIGMA_RELEASED], NO_DP_NOISE) ** 2 for _, m, _ in good))
        return np.asarray(total), sd

    def measure_noise(self) -> list[float]:
        return [max(m.get(P.SIGMA_MEASURE, NO_DP_NOISE), NO_DP_NOISE)
                for m in self.noise.values()]


def run_marginal_study(grid: Grid, study: StudyConfig, schema: Schema,
                       on_round: Callable[[RoundLog], None] | None = None) -> Any:
    """Run a measured study end to end and write model, synthetic table and summary."""
    from .app import (
        MODEL,
        SUMMARY,
        SYNTHETIC,
        StudyOutcome,
        final_site_privacy,
        release_label,
        write_synthetic,
        write_timings,
    )

    out = Path(study.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if study.resume:
        log.warning("marginal studies do not resume: the study starts again (the sites' "
                    "ledgers keep what they already spent)")
    model = MarginalGenerator(schema, seed=study.seed, **study.generator_params)
    measurer = FederatedMeasurer(grid, study, schema, model.plan(), model.sizes,
                                 model.site_attribute, on_round,
                                 model.discretizer.code_attrs,
                                 whole_covariates(model.discretizer),
                                 outcome_split(schema, model.discretizer))
    plan = model.plan(noise=measurer.summed_noise())  # the plan follows the sums' noise
    measurer.use_plan(plan)
    start = time.perf_counter()
    result = model.run_engine(plan, measurer, sites=measurer.sites)
    model.sites = list(measurer.sites)
    seconds = time.perf_counter() - start
    privacy = release_label(measurer.history)
    model.save(out / MODEL, extra={"study-id": study.study_id, "round": measurer.step,
                                   "privacy": privacy})
    n = study.n_synthetic if study.n_synthetic > 0 else max(
        1, int(round(noisy_total(result.measurements))))
    write_synthetic(model, out / SYNTHETIC, n, seed=study.seed)
    summary: dict[str, Any] = {
        "privacy": privacy,
        "study": study.to_flat(),
        "schema": schema.name,
        "generator_parameters": model.num_parameters(),
        "rounds_completed": len(measurer.history),
        "n_synthetic": n,
        "sites": final_site_privacy(measurer.history),
        "rounds": [_round_json(r) for r in measurer.history],
        "marginal": {
            "plan": plan.to_dict(),
            "site_attribute": measurer.sites,
            "selected": [list(c) for lg in result.log for c in lg.chosen],
            "pairs_released": len(result.pairs),
            "pairs_in_model": [list(c) for c in result.pairs_in_model],
            "links_in_model": [list(c) for c in result.links_in_model],
            "measurements": len(result.measurements),
            "noise": measurer.noise,
        },
    }
    if study.encrypted:
        summary["secure_aggregation"] = {"scheme": study.secure_aggregation,
                                         "public_context": study.public_context,
                                         "marginal_sums_decrypted_by_one_site": True}
    if study.masked:
        summary["secure_aggregation"] = {
            "scheme": "masks",
            "honest_sites": {n: int(m.get(P.HONEST_SITES, 1)) for n, m in
                             sorted(measurer.latest.items())},
            # what each site's patients have spent were all the others to collude with
            # the coordinator (its own noise only): docs/privacy.md, "Distributed noise"
            "epsilon_alone": {n: m.get(P.EPSILON_ALONE) for n, m in
                              sorted(measurer.latest.items())},
        }
    if study.federated_validation:
        from .app import validate_at_sites

        summary["federated_validation"] = validate_at_sites(grid, study, schema, out, model, n)
    write_timings(out, seconds)  # beside the summary, not in it: a side channel
    (out / SUMMARY).write_text(json.dumps(summary, indent=1, default=str))
    return StudyOutcome(out, len(measurer.history), measurer.history, seconds)


def _round_json(r: RoundLog) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(r)
