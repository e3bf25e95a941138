"""The site's Flower ClientApp.

Site settings come from the SuperNode's node config (``data-path``, ``schema-path``,
``epsilon``, ``delta``, ``site-name``, ``state-dir``); the study's plan comes with each
message from the coordinator. In a simulation without node configs, the run config's
``simulation-sites`` names a sites file (or a bundled dataset) and the node's
``partition-id`` picks its entry.

The privacy ledger lives in the node's ``context.state`` for the whole run, and also in
``state-dir`` when one is configured, so a coordinator restart (a new run) does not
reset a site's accounting.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..common.study import ConfigError, SiteConfig, StudyConfig
from .site import SiteReply, SiteState, ledger_path, train_site

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
    if "data-path" in node:
        return SiteConfig.from_node_config(node)
    if sites is None:
        sites = load_sites_file(str(context.run_config.get("simulation-sites", "")))
    idx = int(node.get("partition-id", 0))
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


def make_client_app(sites: list[SiteConfig] | None = None) -> ClientApp:
    """A ClientApp; ``sites`` fixes the simulation's site list (else read from configs)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = resolve_site(context, sites)
        config = dict(msg.content["config"])
        study = StudyConfig.from_flat(config)
        server_round = int(config.get("server-round", 0))
        global_state = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        state = _load_state(context, site, study)
        reply = train_site(site, study, str(config["schema-fingerprint"]), global_state, state,
                           server_round)
        _save_state(context, site, study, state)
        return Message(reply_content(site, reply), reply_to=msg)

    return app


app = make_client_app()
