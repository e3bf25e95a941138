"""The site's Flower ClientApp.

Site settings come from the SuperNode's node config (``data-path``, ``schema-path``,
``epsilon``, ``delta``, ``site-name``, ``state-dir``); the study's plan comes with each
message from the coordinator. In a simulation without node configs, the run config's
``simulation-sites`` names a sites file (or a bundled dataset) and the node's
``partition-id`` picks its entry.

The privacy ledger lives in the node's ``context.state`` for the whole run, and also in
``state-dir`` when one is configured, so a coordinator restart (a new run) does not
reset a site's accounting. A round asked again with the same model (a coordinator that
resumed before checkpointing it) gets the site's stored reply, not a second training
(``client/replay.py``). A site answers one request at a time (``one_request_at_a_time``),
so two requests at once cannot both spend against the same ledger.

When the study says ``secure-aggregation = "ckks"``, the train handler decrypts the
relayed aggregate and replies with ciphertexts only (``client/secure.py``); the query
handler is the end-of-study release. A site never falls back to sending weights in
clear: without its key files it refuses an encrypted round, and with them it refuses
every round in clear (encryption is the site's decision, not the coordinator's).

Every message's records and keys are those of ``common/protocol.py``.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..common.bundled import bundled_sites
from ..common.protocol import (
    ARRAYS,
    CKKS,
    CONFIG,
    GRID_ACTION,
    KIND,
    MARGINAL_ACTION,
    RELEASE,
    SCHEMA_FINGERPRINT,
    QueryKind,
    SiteReply,
    Status,
    TrainRequest,
    ValidationRequest,
    WireFormatError,
    pack_content,
    unpack_content,
)
from ..common.study import ConfigError, SiteConfig, StudyConfig
from ..common.threads import site_threads, torch_threads
from .grid import grid_reply
from .measure import measure_reply
from .replay import cached_reply, drop_older_replies, keep_reply, model_digest
from .secure import GlobalModel, release_final, train_encrypted
from .site import (
    NOT_A_REAL_NODE_SETTING,
    SiteState,
    ledger_path,
    load_site_state,
    status_metrics,
    train_site,
)

STATE_KEY = "fedsynth-site"

log = logging.getLogger("fedsynth.site")


def load_sites_file(ref: str) -> list[SiteConfig]:
    """Sites of a simulation: a JSON list of site configs, or a bundled dataset's name."""
    if not ref:
        raise ConfigError(
            "this node has no data-path in its node config and the run config names no "
            "simulation-sites file"
        )
    path = Path(ref)
    if not path.is_file():
        return bundled_sites(ref)
    raw = json.loads(path.read_text())
    return [SiteConfig.from_node_config(entry) for entry in raw]


def is_deployed(context: Context) -> bool:
    """A real SuperNode (its own node config names its data), not a simulated site."""
    node = dict(context.node_config)
    return "data-path" in node or "partition-id" not in node


def site_threaded(handler: Callable[[Message, Context], Message]
                  ) -> Callable[[Message, Context], Message]:
    """Run a handler with the site's torch threads (``common/threads.py``): one for a
    simulated site, so sites sharing a machine do not oversubscribe its cores; the node
    config's ``torch-threads`` (or ``FEDSYNTH_TORCH_THREADS``, default 1) for a real one."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        try:
            n = site_threads(dict(context.node_config)) if is_deployed(context) else 1
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        with torch_threads(n):
            return handler(msg, context)

    return run


def resolve_site(context: Context, sites: list[SiteConfig] | None) -> SiteConfig:
    node = dict(context.node_config)
    if is_deployed(context):
        # A real SuperNode: its own node config or nothing. Falling back to a bundled
        # demo table here would make a misconfigured hospital train on someone else's
        # rows under its own name.
        return deployed_site(node)
    if sites is None:
        sites = load_sites_file(str(context.run_config.get("simulation-sites", "")))
    idx = int(node["partition-id"])
    if idx >= len(sites):
        raise ConfigError(f"partition {idx} has no site: the study lists {len(sites)} sites")
    return sites[idx]


def deployed_site(node: dict) -> SiteConfig:
    """A real SuperNode's site config, refused when it would weaken the guarantee.

    Reproducible noise makes every DP draw replayable by whoever learns the seed, and a
    site without a ``state-dir`` would forget its ledger when its process restarts (and
    Flower starts one per message): both are for tests and simulations only.
    """
    site = SiteConfig.from_node_config(node)
    if site.reproducible_noise_seed is not None:
        raise ConfigError(
            f"site {site.name}: {NOT_A_REAL_NODE_SETTING}: reproducible-noise-seed makes the "
            "site's DP noise replayable, so its releases are not DP; remove it from the node "
            "config (it is for tests and benchmarks only)"
        )
    if site.dp and not site.state_dir:
        raise ConfigError(
            f"site {site.name}: the node config has no state-dir, so the site's privacy "
            "ledger would not outlive this process; set state-dir to a folder only the "
            "site can write (fedsynth preflight checks it)"
        )
    return site


def _load_state(context: Context, site: SiteConfig, study: StudyConfig) -> SiteState:
    """The site's state: its state-dir when it has one (the truth), else context.state."""
    if ledger_path(site) is not None:
        return load_site_state(site, study.study_id)
    if STATE_KEY in context.state:
        return SiteState.from_record(dict(context.state[STATE_KEY])).for_study(study.study_id)
    return SiteState().for_study(study.study_id)


def _save_state(context: Context, site: SiteConfig, study: StudyConfig, state: SiteState) -> None:
    context.state[STATE_KEY] = ConfigRecord(state.to_record())
    path = ledger_path(site)
    if path is not None:
        state.save(path)


def reply_content(site: SiteConfig, reply: SiteReply) -> RecordDict:
    return reply.to_content(site.name)


def received_model(request: TrainRequest) -> GlobalModel:
    """The starting point a coordinator's message carries in an encrypted study."""
    return GlobalModel(
        aggregate=request.aggregate,
        layout_json=request.layout,
        initial=request.arrays or None,
    )


def handle_train(msg: Message, context: Context, sites: list[SiteConfig] | None) -> Message:
    site = resolve_site(context, sites)
    request = TrainRequest.from_content(msg.content)
    study = StudyConfig.from_flat(request.config)
    server_round = request.server_round
    schema_fp = request.schema_fingerprint
    state = _load_state(context, site, study)
    digest = model_digest(msg.content, (ARRAYS, CKKS))
    cached = cached_reply(site, study.study_id, state, server_round, digest)
    if cached is not None:
        return Message(cached, reply_to=msg)
    if problem := site.aggregation_problem(study):
        # The site's node config decides: a coordinator cannot switch encryption off.
        reply = SiteReply(Status.ENCRYPTION_REQUIRED, status_metrics(site, state),
                          problems=[problem])
        return Message(reply_content(site, reply), reply_to=msg)
    def commit(planned: SiteState) -> None:  # the round's cost, saved before any draw
        _save_state(context, site, study, planned)

    if study.encrypted:
        result = train_encrypted(
            site, study, schema_fp, received_model(request), state, server_round, commit
        )
        reply = result.reply
        if result.ciphertexts is not None:
            reply.chunks, reply.layout = result.ciphertexts, result.layout_json
    else:
        reply = train_site(site, study, schema_fp, request.arrays or {}, state,
                           server_round, commit)
    content = reply_content(site, reply)
    trained = reply.status == Status.TRAINED
    if trained:  # the reply file first, then the ledger that pays for it
        keep_reply(site, study.study_id, state, server_round, digest, content)
    _save_state(context, site, study, state)
    if trained:
        drop_older_replies(site, study.study_id, server_round)
    return Message(content, reply_to=msg)


def handle_query(msg: Message, context: Context, sites: list[SiteConfig] | None) -> Message:
    """The release step of an encrypted study: decrypt, flood, hand over; no training."""
    site = resolve_site(context, sites)
    request = TrainRequest.from_content(msg.content)
    config = request.config
    study = StudyConfig.from_flat(config)
    state = _load_state(context, site, study)
    is_release = config.get(KIND) == QueryKind.RELEASE or config.get(RELEASE) is True
    if not (is_release and study.encrypted):
        reply = SiteReply(
            Status.UNSUPPORTED_QUERY,
            status_metrics(site, state),
            problems=["this site answers only the release query of an encrypted study"],
        )
    elif state.final_released:
        # Each answer carries fresh flooding noise: a coordinator allowed to ask again
        # could average it away and solve for the key. One release per study.
        reply = SiteReply(
            Status.ALREADY_RELEASED,
            status_metrics(site, state),
            problems=["this site released this study's final model once already"],
        )
    else:
        reply = release_final(
            site, study, request.schema_fingerprint, received_model(request), state
        )
        if reply.arrays is not None:
            state.final_released = True
            _save_state(context, site, study, state)
    return Message(reply_content(site, reply), reply_to=msg)


def handle_evaluate(msg: Message, context: Context, sites: list[SiteConfig] | None) -> Message:
    """Federated validation: score the study's released synthetic table against this
    site's rows and send back scores only, once per study (``client/evaluate.py``).
    The count sent with them is the one already released under DP; in an encrypted
    study, where counts never travel in clear, it stays here."""
    # Imported here: a training round (a new process per message when deployed) need
    # not load the validation suite and scikit-learn.
    from .evaluate import evaluate_reply, released_table
    site = resolve_site(context, sites)
    request = ValidationRequest.from_content(msg.content)
    study = StudyConfig.from_flat(request.config)
    state = _load_state(context, site, study)
    if site.aggregation_problem(study):
        # A study "in clear" would skip the check that the model is the release and send
        # the count encryption hid: the site's node config decides, as for training. A
        # masked study's model is the coordinator's fit of sums: scored as in clear.
        reply = SiteReply(Status.ENCRYPTION_REQUIRED, status_metrics(site, state), problems=[
            "this site is set up for encrypted aggregation and scores nothing in clear"])
        return Message(reply_content(site, reply), reply_to=msg)
    schema_fp = str(request.config[SCHEMA_FINGERPRINT])
    table = released_table(
        site, study, schema_fp, request.arrays, request.rows, request.seed, state
    )
    if isinstance(table, SiteReply):
        return Message(reply_content(site, table), reply_to=msg)
    if not study.encrypted and site.validation_scores == "all":
        # In clear the site cannot check the model is the real release: the per-patient
        # screens (recall, nearest distance, DCR, copies: ``PATIENT_SCREENS``) would
        # answer "is this record here" for a model pinned to it (docs/privacy.md).
        site = replace(site, validation_scores="quality")
    def spend() -> None:  # once per study, whether the scoring then succeeds or not
        state.validated = True
        _save_state(context, site, study, state)

    reply = evaluate_reply(
        site,
        schema_fp,
        table.to_csv(index=False),
        state,
        # a masked study's sites sent no count of their own in clear either (and a
        # split-noise site's own count carries only its share of the noise)
        send_count=not (study.encrypted or study.masked),
        spend=spend,
    )
    return Message(reply_content(site, reply), reply_to=msg)


class SiteFailure(RuntimeError):
    """What the coordinator learns of a request the site failed on: a fixed text.

    Flower sends a handler's exception text to the coordinator as the error reply's
    reason; an exception raised on the site's rows may quote them (a value, a batch's
    size, a row count), and its text is no DP release. The full exception stays in the
    site's log; the coordinator sees that the request failed (a fact this reply cannot
    hide, stated in docs/privacy.md) and this text. Errors of the settings (``ConfigError``,
    the node's or the coordinator's own config) and of the message's envelope
    (``WireFormatError``) name no row and pass through as they are.
    """


def private_errors(handler: Callable[[Message, Context], Message]
                   ) -> Callable[[Message, Context], Message]:
    """Run a handler so that no exception text computed on the site's rows leaves it."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except (ConfigError, WireFormatError):
            raise
        except Exception:
            log.exception("the %s request failed at this site", msg.metadata.message_type)
            raise SiteFailure(
                "the site could not answer this request; the details are in the site's own "
                "log (its exception text is not sent: it may quote the site's rows)"
            ) from None

    return run


def on_the_wire(handler: Callable[[Message, Context], Message]
                ) -> Callable[[Message, Context], Message]:
    """The site's side of the wire format (``common/protocol.py``, "on the wire"): the
    handler reads the request's array records as named arrays and its reply's records
    are packed, each into one array, as the coordinator's are (``server/packed_grid.py``).
    """
    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        msg.content = unpack_content(msg.content)
        reply = handler(msg, context)
        if reply.has_content():
            reply.content = pack_content(reply.content)
        return reply

    return run


#: A site's lock file in its state-dir (``one_request_at_a_time``).
LOCK_FILE = "site.lock"


@contextmanager
def one_request_at_a_time(site: SiteConfig) -> Iterator[None]:
    """Hold the site's lock (an exclusive ``flock`` on ``state-dir/site.lock``) while a
    request reads its ledger, releases and writes the ledger back.

    Flower's SuperExec starts a ClientApp process for each message without waiting for
    the last one, so two requests (two studies, two runs) can be at a site at once. Each
    would check its budget against the same ledger and the second write would drop the
    first's releases: a site that released two studies, each calibrated to the whole
    budget, with a ledger showing one. Without a state-dir (a simulated site) there is
    no file to share and nothing to lock.
    """
    if not site.state_dir:
        yield
        return
    folder = Path(site.state_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with os.fdopen(os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600), "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def site_handler(sites: list[SiteConfig] | None
                 ) -> Callable[[Callable[[Message, Context], Message]],
                               Callable[[Message, Context], Message]]:
    """Every handler's wrapping, outermost first: ``private_errors``, ``on_the_wire``,
    ``site_threaded``, and the site's lock around the handler itself."""

    def wrap(handler: Callable[[Message, Context], Message]
             ) -> Callable[[Message, Context], Message]:
        @functools.wraps(handler)
        def locked(msg: Message, context: Context) -> Message:
            with one_request_at_a_time(resolve_site(context, sites)):
                return handler(msg, context)

        return private_errors(on_the_wire(site_threaded(locked)))

    return wrap


def make_client_app(sites: list[SiteConfig] | None = None) -> ClientApp:
    """A ClientApp; ``sites`` fixes the simulation's site list (else read from configs)."""
    app = ClientApp()

    @app.train()
    @site_handler(sites)
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, sites)

    @app.query()
    @site_handler(sites)
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context, sites)

    @app.query(MARGINAL_ACTION)
    @site_handler(sites)
    def marginal(msg: Message, context: Context) -> Message:
        """A measured study's request: noisy marginal counts or scores (client/measure.py)."""
        site = resolve_site(context, sites)
        study = StudyConfig.from_flat(dict(msg.content[CONFIG]))
        state = _load_state(context, site, study)
        content = measure_reply(site, study, msg.content, state)
        _save_state(context, site, study, state)
        return Message(content, reply_to=msg)

    @app.query(GRID_ACTION)
    @site_handler(sites)
    def grid(msg: Message, context: Context) -> Message:
        """A deep generator's quantile-grid request, before round 1 (client/grid.py)."""
        site = resolve_site(context, sites)
        config = dict(msg.content[CONFIG])
        study = StudyConfig.from_flat(config)
        state = _load_state(context, site, study)
        ckks = dict(msg.content[CKKS]) if CKKS in msg.content else {}
        reply = grid_reply(site, study, str(config.get(SCHEMA_FINGERPRINT, "")), state,
                           config, ckks)
        _save_state(context, site, study, state)
        return Message(reply_content(site, reply), reply_to=msg)

    @app.evaluate()
    @site_handler(sites)
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, sites)

    return app


app = make_client_app()
