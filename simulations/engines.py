"""The two engines a simulated study runs on: in this process, or Flower's Ray simulation.

Both run the same Flower apps, the project's ServerApp (``server.app``) and ClientApp
(``client.app``); they differ in what carries the messages:

- ``"inprocess"`` (the default): the ServerApp is called with an
  :class:`~.benchmark_inprocess.InProcessGrid`, which hands each message to the
  destination site's ClientApp in this process, one Flower ``Context`` per site kept
  for the whole study (each site's privacy ledger lives in ``context.state`` as under
  Ray). Sites train one after another. Measured on the default study (heart disease,
  4 sites, 10 rounds; ``measure_engines.py``, 3 alternated pairs on a shared 2-core
  machine at load 12-18): median 49.5 s against Ray's 72.0 s (Ray 1.46 times slower),
  peak 594 MB in one process against 2376 MB over Ray's 12 processes: Ray starts a
  cluster (GCS, raylet) and worker processes before the first round.
- ``"ray"``: ``flwr.simulation.run_simulation``, Flower's own simulation engine
  (SuperLink, SuperNodes in Ray actors, sites in parallel).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

ENGINES = ("inprocess", "ray")
DEFAULT_ENGINE = "inprocess"


def run_inprocess(server_app: ServerApp, client_app: ClientApp, num_sites: int,
                  run_config: dict) -> None:
    """Call the ServerApp with a grid whose nodes are ClientApps in this process."""
    from .benchmark_inprocess import COORDINATOR_NODE, InProcessGrid, coordinator_identity

    grid = InProcessGrid(client_app, num_sites, run_config)
    context = Context(run_id=grid.run.run_id, node_id=COORDINATOR_NODE, node_config={},
                      state=RecordDict(), run_config=run_config)
    with coordinator_identity(grid.run.run_id):
        server_app(grid, context)


def run_ray(server_app: ServerApp, client_app: ClientApp, num_sites: int,
            verbose: bool) -> None:
    """Flower's simulation engine: one Ray actor per CPU, the sites in parallel."""
    from flwr.simulation import run_simulation

    # CPU only: keep Ray's behaviour for zero GPUs without its FutureWarning on the console
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_sites,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            # log_to_driver: the actors' own warnings go to Ray's log files, not the
            # user's console, unless they asked for --verbose
            "init_args": {"num_cpus": max(1, min(num_sites, os.cpu_count() or 1)),
                          "log_to_driver": verbose},
        },
        verbose_logging=verbose,
    )


def route_framework_logs(log_file: Path | None, verbose: bool) -> None:
    """Flower's and Ray's messages go to ``log_file`` (the study's log), and to the
    console only with ``verbose``: a researcher reads the study's own progress, not
    DEPRECATED FEATURE banners or actor shutdown notices."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:  # Flower re-levels its console handler itself: detach it for the study
        # (and keep its records from the root logger, where Ray installs a stderr handler)
        flwr_logger.propagate = False
        for handler in list(flwr_logger.handlers):
            if not isinstance(handler, logging.FileHandler):
                flwr_logger.removeHandler(handler)
                _detached.append(handler)
    if log_file is not None and not any(
        isinstance(h, logging.FileHandler) and Path(h.baseFilename) == log_file.resolve()
        for h in flwr_logger.handlers
    ):
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        flwr_logger.addHandler(handler)
        for name in ("ray", "fedsynth"):
            logging.getLogger(name).addHandler(handler)


_detached: list[logging.Handler] = []  # Flower's console handler while a study runs


def close_log(log_file: Path | None) -> None:
    """Detach the study's log file (a later study in this process has its own) and give
    Flower its console handler back."""
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = True
    while _detached:
        flwr_logger.addHandler(_detached.pop())
    if log_file is None:
        return
    for name in ("flwr", "ray", "fedsynth"):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == log_file.resolve():
                logger.removeHandler(h)
                h.close()
