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
(``client/replay.py``).

When the study says ``secure-aggregation = "ckks"``, the train handler decrypts the
relayed aggregate and replies with ciphertexts only (``client/secure.py``); the query
handler is the end-of-study release. Encryption is the study's choice, so a site never
falls back to sending weights in clear: without its key files it refuses the round.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..common.protocol import MARGINAL_ACTION
from ..common.study import ConfigError, SiteConfig, StudyConfig
from .evaluate import SYNTHETIC_KEY, evaluate_reply
from .measure import measure_reply
from .replay import cached_reply, drop_older_replies, keep_reply, model_digest
from .secure import (
    AGGREGATE,
    CHUNKS,
    CKKS_RECORD,
    LAYOUT,
    RELEASE,
    GlobalModel,
    release_final,
    train_encrypted,
)
from .site import TRAINED, SiteReply, SiteState, ledger_path, status_metrics, train_site

STATE_KEY = "fedsynth-site"


def load_sites_file(ref: str) -> list[SiteConfig]:
    """Sites of a simulation: a JSON list of site configs, or a bundled dataset's name."""
    if not ref:
        raise ConfigError(
            "this node has no data-path in its node config and the run config names no "
            "simulation-sites file"
        )
    path = Path(ref)
    if not path.is_file():
        from ..simulations.datasets import bundled_sites

        return bundled_sites(ref)
    raw = json.loads(path.read_text())
    return [SiteConfig.from_node_config(entry) for entry in raw]


def resolve_site(context: Context, sites: list[SiteConfig] | None) -> SiteConfig:
    node = dict(context.node_config)
    if "data-path" in node or "partition-id" not in node:
        # A real SuperNode: its own node config or nothing. Falling back to a bundled
        # demo table here would make a misconfigured hospital train on someone else's
        # rows under its own name.
        return SiteConfig.from_node_config(node)
    if sites is None:
        sites = load_sites_file(str(context.run_config.get("simulation-sites", "")))
    idx = int(node["partition-id"])
    if idx >= len(sites):
        raise ConfigError(f"partition {idx} has no site: the study lists {len(sites)} sites")
    return sites[idx]


def _load_state(context: Context, site: SiteConfig, study: StudyConfig) -> SiteState:
    if STATE_KEY in context.state:
        return SiteState.from_record(dict(context.state[STATE_KEY]))
    path = ledger_path(site, study.study_id)
    if path is not None and path.is_file():
        return SiteState.from_record(json.loads(path.read_text()))
    return SiteState()


def _save_state(context: Context, site: SiteConfig, study: StudyConfig, state: SiteState) -> None:
    context.state[STATE_KEY] = ConfigRecord(state.to_record())
    path = ledger_path(site, study.study_id)
    if path is not None:
        state.save(path)


def reply_content(site: SiteConfig, reply: SiteReply) -> RecordDict:
    content = RecordDict(
        {
            "metrics": MetricRecord(reply.metrics),
            "site": ConfigRecord(
                {"name": site.name, "status": reply.status, "problems": reply.problems}
            ),
        }
    )
    if reply.arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in reply.arrays.items()})
    return content


def received_model(content: RecordDict) -> GlobalModel:
    """The starting point a coordinator's message carries in an encrypted study."""
    ckks = dict(content[CKKS_RECORD]) if CKKS_RECORD in content else {}
    aggregate = ckks.get(AGGREGATE)
    layout = ckks.get(LAYOUT)
    arrays = content.get("arrays")
    initial = {k: v.numpy() for k, v in arrays.items()} if arrays is not None else None
    return GlobalModel(
        aggregate=list(aggregate) if isinstance(aggregate, list) else None,
        layout_json=str(layout) if layout is not None else None,
        initial=initial or None,
    )


def make_client_app(sites: list[SiteConfig] | None = None) -> ClientApp:
    """A ClientApp; ``sites`` fixes the simulation's site list (else read from configs)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = resolve_site(context, sites)
        config = dict(msg.content["config"])
        study = StudyConfig.from_flat(config)
        server_round = int(config.get("server-round", 0))
        schema_fp = str(config["schema-fingerprint"])
        state = _load_state(context, site, study)
        digest = model_digest(msg.content, ("arrays", CKKS_RECORD))
        cached = cached_reply(site, study.study_id, state, server_round, digest)
        if cached is not None:
            return Message(cached, reply_to=msg)
        if study.secure_aggregation == "ckks":
            result = train_encrypted(
                site, study, schema_fp, received_model(msg.content), state, server_round
            )
            content = reply_content(site, result.reply)
            if result.ciphertexts is not None:
                content[CKKS_RECORD] = ConfigRecord(
                    {CHUNKS: result.ciphertexts, LAYOUT: result.layout_json}
                )
        else:
            global_state = {k: v.numpy() for k, v in msg.content["arrays"].items()}
            reply = train_site(site, study, schema_fp, global_state, state, server_round)
            content = reply_content(site, reply)
        trained = dict(content["site"]).get("status") == TRAINED
        if trained:  # the reply file first, then the ledger that pays for it
            keep_reply(site, study.study_id, state, server_round, digest, content)
        _save_state(context, site, study, state)
        if trained:
            drop_older_replies(site, study.study_id, server_round)
        return Message(content, reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """The release step of an encrypted study: decrypt, flood, hand over; no training."""
        site = resolve_site(context, sites)
        config = dict(msg.content["config"])
        study = StudyConfig.from_flat(config)
        state = _load_state(context, site, study)
        if not (config.get(RELEASE) is True and study.secure_aggregation == "ckks"):
            reply = SiteReply(
                "unsupported-query",
                status_metrics(site, state),
                problems=["this site answers only the release query of an encrypted study"],
            )
        else:
            reply = release_final(
                site, study, str(config["schema-fingerprint"]), received_model(msg.content), state
            )
        return Message(reply_content(site, reply), reply_to=msg)

    @app.query(MARGINAL_ACTION)
    def marginal(msg: Message, context: Context) -> Message:
        """A measured study's request: noisy marginal counts or scores (client/measure.py)."""
        site = resolve_site(context, sites)
        study = StudyConfig.from_flat(dict(msg.content["config"]))
        state = _load_state(context, site, study)
        content = measure_reply(site, study, msg.content, state)
        _save_state(context, site, study, state)
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Federated validation: score the released synthetic table against this site's
        rows and send back scores only (the count is the one already released under DP;
        in an encrypted study, where counts never travel in clear, it stays here)."""
        site = resolve_site(context, sites)
        config = dict(msg.content["config"])
        study = StudyConfig.from_flat(config)
        state = _load_state(context, site, study)
        reply = evaluate_reply(
            site,
            str(config["schema-fingerprint"]),
            str(config[SYNTHETIC_KEY]),
            state,
            send_count=study.secure_aggregation != "ckks",
        )
        return Message(reply_content(site, reply), reply_to=msg)

    return app


app = make_client_app()
