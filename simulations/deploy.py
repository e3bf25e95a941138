"""A real fedsynth deployment on this machine: Flower's SuperLink, SuperNodes and ``flwr run``.

``fedsynth simulate`` runs the study inside Flower's simulation engine; this module runs
it the way hospitals do, on Flower 1.41's deployment engine, only on loopback: one
``flower-superlink`` (the coordinator), one ``flower-supernode`` per site, each with its
own node config, its own Flower home and its own SuperNode key, and ``flwr run``
submitting the study. By default the link is TLS with a study CA and only registered
SuperNodes may join, with files made by :mod:`fedsynth.common.certs`, so a test of this
module tests the secured setup a hospital runs, not a shortcut.

It is a test and demonstration harness, not a production launcher: every party runs
as this user, on 127.0.0.1, with ports picked at random. What it adds to the commands
in ``docs/deployment.md``:

- **No orphan processes.** Each Flower process starts in its own session, and stopping
  it signals its whole tree (SuperExec and the ``flwr-serverapp`` / ``flwr-clientapp``
  processes Flower detaches from the session), by process id only, then kills what is
  left after a grace period.
- **Faults on demand.** ``crash_supernode`` kills a SuperNode's tree at once (a host
  that dies mid-round), ``restart_supernode`` brings the same site back with the same key
  and state folder, ``stop_superlink`` / ``restart_superlink`` do the same for the
  coordinator (its database keeps the registered keys).
- **A staged app folder.** ``flwr run`` rewrites the ``pyproject.toml`` it is given
  when that file still has a ``[tool.flwr.federations]`` table (Flower 1.41 moves it to
  the user's Flower configuration and comments it out), and refuses ``--run-config``
  keys that ``[tool.flwr.app.config]`` does not list. So the run is submitted from a
  copy of ``pyproject.toml`` without federations and with every study key, never from
  the repository itself. The app bundle then holds only that file: every party runs
  the ``fedsynth`` it has installed, which must be the same version everywhere.

Command line (prints the commands it ran, the outputs and the timings)::

    python -m fedsynth.simulations.deploy --sites cleveland,hungarian,va --rounds 2 \\
        --generator-params '{"hidden":16,"latent":4}' --out deploy-run

``--stop-coordinator-after R`` kills the coordinator once round R is checkpointed,
restarts it and resumes the study (``docs/deployment.md``, Faults).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..client.preflight import ConfigValue, node_config_arg
from ..common.certs import (
    AUTH_PRIVATE,
    AUTH_PUBLIC,
    CA_CERT,
    CA_DIR,
    COORDINATOR_DIR,
    SERVER_CERT,
    SERVER_KEY,
    create_study_certs,
    generate_site_auth_keys,
)
from ..common.errors import FedsynthError
from ..common.protocol import SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S
from ..common.study import DEFAULT_DELTA, DEFAULT_EPSILON, StudyConfig

CONNECTION = "fedsynth-local"
REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("model.fsg", "synthetic.csv", "summary.json")
# What a SuperNode logs when the SuperLink refuses to activate it (a key never registered).
ACTIVATION_REFUSED = "Failed to activate SuperNode"
# What a SuperNode logs once the SuperLink has activated it (Flower 1.41's start loop).
ACTIVATED = "SuperNode ID: "
# Seconds each process gets to stop when a deployment closes, before SIGKILL. A Flower
# 1.41 SuperNode says goodbye to the SuperLink within a fraction of a second of SIGTERM,
# then lingers until its 5 s force-exit timer (``FORCE_EXIT_TIMEOUT_SECONDS``) ends it:
# time no study uses. (Stopping one site, ``stop_supernode``, still waits the full grace.)
CLOSE_GRACE = 1.0


class DeploymentError(FedsynthError, RuntimeError):
    """A Flower process failed to start, or a command failed; carries its log's tail."""


class DeploymentTimeout(DeploymentError):
    """A study or a wait ran past its time limit (everything was stopped)."""


# --------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel picks at random among free ones (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def flower_executable(name: str) -> str:
    """A Flower console script next to this interpreter, else the one on PATH.

    Looking next to ``sys.executable`` first makes a test run by ``.venv/bin/python -m
    pytest`` use that venv's Flower even when the venv is not activated.
    """
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"{name} not found: install flwr (pip install 'flwr>=1.41,<1.42')")
    return found


def _write_toml(path: Path, data: Mapping[str, Any]) -> None:
    import tomli_w  # a dependency of flwr, which this module drives anyway

    path.write_text(tomli_w.dumps(dict(data)))


def stage_app(dest: Path, project: Path = REPO_ROOT) -> Path:
    """A copy of the app's ``pyproject.toml`` that ``flwr run`` may read and rewrite.

    The copy has no ``[tool.flwr.federations]`` (so Flower's migration leaves it alone)
    and lists every study key in ``[tool.flwr.app.config]`` with its default (so any of
    them may be overridden with ``--run-config``); keys already there keep their values.
    """
    import tomllib

    with (project / "pyproject.toml").open("rb") as fh:
        config = tomllib.load(fh)
    flwr = config.get("tool", {}).get("flwr", {})
    if "app" not in flwr:
        raise DeploymentError(f"{project}/pyproject.toml has no [tool.flwr.app] table")
    flwr.pop("federations", None)
    app_config = flwr["app"].setdefault("config", {})
    for key, value in StudyConfig().to_flat().items():
        app_config.setdefault(key, value)
    staged = {"build-system": config.get("build-system", {}), "project": config["project"],
              "tool": {"flwr": flwr}}
    dest.mkdir(parents=True, exist_ok=True)
    _write_toml(dest / "pyproject.toml", staged)
    return dest


# A process as (pid, start time in clock ticks): a pid alone may be reused by an unrelated
# process between the moment it is noted and the moment it is signalled.
ProcessId = tuple[int, int | None]


def _stat(pid: int) -> list[str] | None:
    """Fields 3 onwards of ``/proc/PID/stat`` (state, ppid, ...), or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    return text[text.rfind(")") + 2 :].split()


def _start_ticks(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None  # field 22, starttime


def _descendants(root: int) -> list[ProcessId]:
    """Every process below ``root`` (Linux ``/proc``), including detached ones.

    Flower starts SuperExec and the app processes with ``start_new_session=True``, so a
    signal to the root's process group misses them; walking parent ids does not.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    children: dict[int, list[ProcessId]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append((int(entry.name), int(fields[19])))
    found: list[ProcessId] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child[0])
    return found


def process_alive(pid: int, start: int | None = None) -> bool:
    """Whether ``pid`` runs and, given ``start``, is still the process noted then.

    A zombie counts as gone: it holds no resources, only its slot in the table.
    """
    fields = _stat(pid)
    if fields is None:
        if Path("/proc").is_dir():
            return False
        try:  # no /proc: the best this platform offers
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return fields[0] != "Z" and (start is None or int(fields[19]) == start)


def _signal(processes: Sequence[ProcessId], sig: signal.Signals) -> None:
    """Signal each process that is still the one noted (never a reused pid)."""
    for pid, start in processes:
        if start is not None and _start_ticks(pid) != start:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# --------------------------------------------------------------------------- processes


@dataclass
class FlowerProcess:
    """One Flower process this module started, with its log file."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n$ {shlex.join(self.args)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, *, grace: float = 10.0, crash: bool = False) -> None:
        """SIGTERM (or SIGKILL with ``crash``) the process tree; SIGKILL what outlives grace."""
        stop_processes([self], grace=grace, crash=crash)

    def log(self) -> str:
        return _tail(self.log_path)


def stop_processes(
    processes: Sequence[FlowerProcess], *, grace: float = 10.0, crash: bool = False
) -> None:
    """Stop several process trees at once: signal them all, then wait once for all.

    Stopping one after the other would add up their grace periods; a SuperNode takes a
    few seconds to say goodbye to the SuperLink, so a deployment of four sites would
    take half a minute to shut down.
    """
    running = [p for p in processes if p.popen is not None]
    trees: dict[int, list[ProcessId]] = {}
    for p in running:
        assert p.popen is not None
        # The root is our child: its pid cannot be reused before we wait for it.
        trees[id(p)] = [(p.popen.pid, None), *_descendants(p.popen.pid)]
    for tree in trees.values():
        _signal(tree, signal.SIGKILL if crash else signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        pending = False
        for p in running:
            assert p.popen is not None
            tree = trees[id(p)]
            tree += [c for c in _descendants(p.popen.pid) if c not in tree]
            if p.popen.poll() is None or any(process_alive(*c) for c in tree[1:]):
                pending = True
        if not pending:
            break
        time.sleep(0.1)
    for p in running:
        assert p.popen is not None
        leftovers = [c for c in trees[id(p)][1:] if process_alive(*c)]
        if p.popen.poll() is None:  # once reaped, the root's pid is free for reuse
            leftovers.append(trees[id(p)][0])
        _signal(leftovers, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(timeout=5)
        p.popen = None


@dataclass
class SiteSpec:
    """A site of the local deployment: its table, schema, budget and extra node config."""

    name: str
    data_path: str
    schema_path: str
    epsilon: float = DEFAULT_EPSILON
    delta: float = DEFAULT_DELTA
    extra: dict[str, ConfigValue] = field(default_factory=dict)

    def node_config(self, state_dir: Path) -> dict[str, ConfigValue]:
        """The node config the site's SuperNode gets (paths absolute: apps run elsewhere)."""
        return {
            "data-path": str(Path(self.data_path).resolve()),
            "schema-path": str(Path(self.schema_path).resolve()),
            "site-name": self.name,
            "epsilon": float(self.epsilon),
            "delta": float(self.delta),
            "state-dir": str(state_dir.resolve()),
            **self.extra,
        }


@dataclass
class Site:
    """A site's files and process in the deployment."""

    spec: SiteSpec
    folder: Path
    private_key: Path | None
    public_key: Path | None
    runtime_port: int
    process: FlowerProcess
    node_id: int | None = None
    # The site's warm ClientApp runtime (client/runtime.py), None with Flower's default
    # isolation (a cold ClientApp process per message).
    runtime: FlowerProcess | None = None

    def processes(self) -> list[FlowerProcess]:
        """The SuperNode and, when there is one, the site's ClientApp runtime."""
        return [self.process, *([self.runtime] if self.runtime is not None else [])]


@dataclass
class RunResult:
    """What a finished ``flwr run`` left: its status, timing and the coordinator's outputs."""

    run_id: int | None
    status: str
    seconds: float
    output_dir: Path
    log_path: Path
    run_info: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.output_dir / "summary.json").read_text())

    @property
    def timings(self) -> dict[str, float]:
        """The coordinator's timings, kept beside the publishable summary, not in it."""
        from ..server.app import read_timings  # the coordinator's code: loaded on demand

        return read_timings(self.output_dir)

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"

    def log(self) -> str:
        return _tail(self.log_path, 6000)


@dataclass
class RunHandle:
    """A study submitted with ``start_run``; wait for it with ``wait_run``."""

    process: subprocess.Popen[bytes]
    log_path: Path
    output_dir: Path
    started: float


class LocalDeployment:
    """A SuperLink and SuperNodes on loopback, secured like a real study by default.

    Use as a context manager so every process is stopped on the way out, whatever
    happens::

        with LocalDeployment(tmp) as dep:
            dep.start_superlink()
            for spec in specs:
                dep.add_site(spec)
            dep.wait_for_nodes(len(specs))
            result = dep.run_study({"num-server-rounds": 2, ...}, timeout=600)
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        tls: bool = True,
        auth: bool = True,
        project: Path = REPO_ROOT,
        study_id: str = "fedsynth-local",
        site_runtime: bool = True,
    ) -> None:
        if auth and not tls:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses it without)")
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.tls, self.auth = tls, auth
        self.project = project
        self.study_id = study_id
        # Each site runs its SuperNode with `--isolation process` and its own warm
        # ClientApp runtime (docs/deployment.md); False: Flower's default subprocess
        # isolation, a cold ClientApp process per message (kept to compare the two).
        self.site_runtime = site_runtime
        self.certs = self.workdir / "certs"
        self.port = 0
        self.sites: dict[str, Site] = {}
        self.superlink: FlowerProcess | None = None
        self.commands: list[str] = []  # every command line run, for the docs and the logs
        self.app_dir = stage_app(self.workdir / "app", project)
        self.cli_home = self.workdir / "flwr-cli"
        if tls:
            create_study_certs(self.certs, study=study_id, force=True)

    # ------------------------------------------------------------------ environment

    def _env(self, home: Path) -> dict[str, str]:
        """The environment of a Flower process: its own Flower home, no network calls."""
        env = dict(os.environ)
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Flower starts flower-superexec, flwr-serverapp and flwr-clientapp by name: the
        # interpreter's own bin folder goes first on PATH, so a run from a venv that was
        # never activated (``.venv/bin/python -m pytest``) still finds its Flower.
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
        env.update(
            FLWR_HOME=str(home),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            PYTHONUNBUFFERED="1",
        )
        # How often the SuperExec that a SuperNode (or the SuperLink) starts looks for a
        # new message to start an app process for: Flower's default is 1 s; 0.2 s takes
        # 0.4 s of waiting off each message on average (docs/deployment.md).
        env.setdefault(SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S)
        return env

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ca_cert(self) -> Path:
        return self.certs / CA_DIR / CA_CERT

    def _write_cli_config(self) -> None:
        """The flwr CLI's SuperLink connection (Flower 1.41 reads it from FLWR_HOME)."""
        conn: dict[str, Any] = {"address": self.address}
        if self.tls:
            conn["root-certificates"] = str(self.ca_cert)
        else:
            conn["insecure"] = True
        self.cli_home.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_toml(
            self.cli_home / "config.toml", {"superlink": {"default": CONNECTION, CONNECTION: conn}}
        )

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this deployment's SuperLink connection."""
        cmd = [flower_executable("flwr"), *args]
        self.commands.append(shlex.join(cmd))
        try:
            return subprocess.run(
                cmd,
                env=self._env(self.cli_home),
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise DeploymentTimeout(f"{shlex.join(cmd)} ran past {timeout:.0f} s") from None

    @staticmethod
    def _json(proc: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
        text = proc.stdout
        start = text.find("{")
        try:
            data = json.loads(text[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            raise DeploymentError(f"{what}: no JSON answer (exit {proc.returncode}): "
                                  f"{(proc.stdout + proc.stderr)[-1500:]}")
        return data

    # ------------------------------------------------------------------ SuperLink

    def superlink_args(self) -> list[str]:
        args = [flower_executable("flower-superlink")]
        if self.tls:
            coord = self.certs / COORDINATOR_DIR
            args += [
                "--ssl-ca-certfile", str(self.ca_cert),
                "--ssl-certfile", str(coord / SERVER_CERT),
                "--ssl-keyfile", str(coord / SERVER_KEY),
            ]
        else:
            args.append("--insecure")
        if self.auth:
            args.append("--enable-supernode-auth")
        args += [
            # No network here: the app's dependencies are installed, never fetched.
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            # The database keeps registered SuperNodes (and runs) across a restart.
            "--database", str(self.workdir / "superlink" / "state.db"),
        ]
        return args

    def start_superlink(self, timeout: float = 60.0) -> None:
        """Start the SuperLink on a random free port and wait until it answers."""
        if self.superlink is not None and self.superlink.running():
            return
        for _attempt in range(3):  # a port picked free may be taken before we bind it
            if not self.port:
                self.port = free_port()
            args = self.superlink_args()
            self.commands.append(shlex.join(args))
            folder = self.workdir / "superlink"
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.superlink = FlowerProcess(
                "superlink", args, self._env(folder / "home"), folder / "superlink.log"
            )
            self.superlink.start()
            self._write_cli_config()
            if self._wait_listening(timeout):
                return
            log = self.superlink.log()
            self.superlink.stop()
            if "address already in use" not in log.lower():
                raise DeploymentError(f"the SuperLink did not start:\n{log}")
            self.port = 0
        raise DeploymentError("no free port for the SuperLink after 3 tries")

    def _wait_listening(self, timeout: float) -> bool:
        assert self.superlink is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.superlink.running():
                return False
            if "Application startup complete" in self.superlink.log():
                with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1
                ):
                    return True
            time.sleep(0.2)
        return False

    def stop_superlink(self, *, crash: bool = False) -> None:
        """Stop the coordinator (SIGTERM; SIGKILL at once with ``crash``)."""
        if self.superlink is not None:
            self.superlink.stop(crash=crash)

    def restart_superlink(self, timeout: float = 60.0) -> None:
        """Start the SuperLink again on the same port with the same database and certs."""
        self.stop_superlink()
        assert self.superlink is not None
        self.commands.append(shlex.join(self.superlink.args))
        self.superlink.start()
        if not self._wait_listening(timeout):
            raise DeploymentError(f"the SuperLink did not restart:\n{self.superlink.log()}")

    # ------------------------------------------------------------------ sites

    def site_keys(self, name: str) -> tuple[Path, Path]:
        """The site's SuperNode key pair, made in the site's own folder as a site would."""
        folder = self.workdir / "sites" / name / "keys"
        private, public = folder / AUTH_PRIVATE, folder / AUTH_PUBLIC
        if not private.exists():
            generate_site_auth_keys(name, folder)
        return private, public

    def register(self, *public_keys: Path) -> list[int]:
        """``flwr supernode register``: the coordinator admits sites' public keys.

        One CLI process per key, all at once: each spends seconds importing Flower, and
        a study with several sites should not wait for them in turn.
        """
        procs = []
        for key in public_keys:
            cmd = [flower_executable("flwr"), "supernode", "register", str(key), CONNECTION,
                   "--format", "json"]
            self.commands.append(shlex.join(cmd))
            procs.append(subprocess.Popen(
                cmd, env=self._env(self.cli_home), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))
        node_ids = []
        for key, proc in zip(public_keys, procs, strict=True):
            try:
                out, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise DeploymentTimeout(f"registering {key} ran past 120 s") from None
            done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            data = self._json(done, f"registering {key}")
            if not data.get("success"):
                raise DeploymentError(f"registering {key} failed: {data}")
            node_ids.append(int(data["node-id"]))
        return node_ids

    def supernode_args(self, site: Site) -> list[str]:
        args = [flower_executable("flower-supernode"), "--superlink", self.address]
        if self.tls:
            args += ["--root-certificates", str(self.ca_cert)]
        else:
            args.append("--insecure")
        if site.private_key is not None:
            args += ["--auth-supernode-private-key", str(site.private_key)]
        if site.runtime is not None:  # the site runs its own ClientApp runtime
            args += ["--isolation", "process",
                     "--superexec-auth-secret-file", str(self.superexec_secret(site))]
        args += [
            "--port", str(site.runtime_port),
            "--node-config", node_config_arg(site.spec.node_config(site.folder / "state")),
        ]
        return args

    @staticmethod
    def superexec_secret(site: Site) -> Path:
        """The site's SuperExec secret (random, 0600): its SuperNode hands tasks only to
        the SuperExec of its own runtime."""
        path = site.folder / "superexec.secret"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(32).hex().encode())
        return path

    def runtime_args(self, site: Site) -> list[str]:
        """``fedsynth site-runtime`` for the site: its SuperNode's Runtime API is local
        and without TLS (Flower's default for the SuperNode's ``--port``)."""
        return [sys.executable, "-m", "fedsynth.client.runtime",
                "--runtime-dir", str((site.folder / "runtime").resolve()),
                "--runtime-api-address", f"127.0.0.1:{site.runtime_port}", "--insecure",
                "--superexec-auth-secret-file", str(self.superexec_secret(site))]

    def add_site(self, spec: SiteSpec, *, register: bool = True, start: bool = True) -> Site:
        """Add one site (see ``add_sites``)."""
        return self.add_sites([spec], register=register, start=start)[0]

    def add_sites(
        self, specs: Sequence[SiteSpec], *, register: bool = True, start: bool = True
    ) -> list[Site]:
        """Make each site's key (when auth is on), register the keys, start the SuperNodes.

        The key pair is made in the site's own folder, as a hospital would make it, and
        only the public key is handed to ``flwr supernode register``. ``register=False``
        leaves the keys unknown to the SuperLink: the SuperNode of a hospital that never
        enrolled, which authentication must keep out.
        """
        added = []
        for spec in specs:
            if spec.name in self.sites:
                raise ValueError(f"site {spec.name!r} already added")
            folder = self.workdir / "sites" / spec.name
            (folder / "state").mkdir(parents=True, exist_ok=True, mode=0o700)
            private = public = None
            if self.auth:
                private, public = self.site_keys(spec.name)
            process = FlowerProcess(
                f"supernode-{spec.name}", [], self._env(folder / "home"),
                folder / "supernode.log",
            )
            site = Site(spec, folder, private, public, free_port(), process)
            if self.site_runtime:
                site.runtime = FlowerProcess(
                    f"runtime-{spec.name}", [], self._env(folder / "home"),
                    folder / "runtime.log",
                )
                site.runtime.args = self.runtime_args(site)
            process.args = self.supernode_args(site)
            self.sites[spec.name] = site
            added.append(site)
        if start:  # a runtime needs no SuperLink: its imports overlap the registrations
            for site in added:
                self._start(site.runtime)
        if self.auth and register:
            ids = self.register(*(s.public_key for s in added if s.public_key is not None))
            for site, node_id in zip(added, ids, strict=True):
                site.node_id = node_id
        if start:
            for site in added:
                self.start_supernode(site.spec.name)
        return added

    def _start(self, process: FlowerProcess | None) -> None:
        if process is not None and not process.running():
            self.commands.append(shlex.join(process.args))
            process.start()

    def start_supernode(self, name: str) -> None:
        """Start the site's SuperNode and, when it has one, its ClientApp runtime."""
        for process in self.sites[name].processes():
            self._start(process)

    def stop_supernode(self, name: str) -> None:
        """A site shut down in order (SIGTERM): it tells the SuperLink it leaves."""
        stop_processes(self.sites[name].processes())

    def crash_supernode(self, name: str) -> None:
        """A site whose host dies: SIGKILL to the SuperNode, its runtime and every
        process under them."""
        stop_processes(self.sites[name].processes(), crash=True, grace=5.0)

    def restart_supernode(self, name: str) -> None:
        """Bring a stopped or crashed site back with the same key, config and state folder."""
        site = self.sites[name]
        stop_processes(site.processes())
        site.runtime_port = free_port()
        site.process.args = self.supernode_args(site)
        if site.runtime is not None:
            site.runtime.args = self.runtime_args(site)
        self.start_supernode(name)

    def wait_supernode_exit(self, name: str, timeout: float = 60.0) -> int | None:
        """The SuperNode's exit code once it ends, or None if it still runs at ``timeout``."""
        popen = self.sites[name].process.popen
        if popen is None:
            return None
        try:
            return popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def wait_for_activation(self, names: Sequence[str], timeout: float = 120.0) -> None:
        """Wait until each named SuperNode, since its last start, has been activated by
        the SuperLink (it logs its node id once ``ActivateNode`` succeeds: the SuperLink
        then lists it online).

        Reads the SuperNodes' own logs, where ``wait_for_nodes`` asks the SuperLink with
        the ``flwr`` CLI, a process that spends seconds importing Flower at each look.
        Use it right after starting SuperNodes; after stopping some, ``wait_for_nodes``
        with ``exact`` says how many the SuperLink still counts.
        """
        deadline = time.monotonic() + timeout
        waiting = list(names)
        while waiting:
            for name in list(waiting):
                process = self.sites[name].process
                since_start = process.log_path.read_text(errors="replace").rsplit("\n$ ", 1)[-1]
                if ACTIVATED in since_start:
                    waiting.remove(name)
                elif not process.running():
                    raise DeploymentError(f"SuperNode {name} exited:\n{process.log()}")
            if waiting and time.monotonic() > deadline:
                raise DeploymentTimeout(f"SuperNode(s) {', '.join(waiting)} not activated "
                                        f"after {timeout} s")
            if waiting:
                time.sleep(0.1)

    def list_nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode ls``: every node the SuperLink knows, with its status."""
        data = self._json(self.flwr("supernode", "ls", CONNECTION, "--format", "json"),
                          "listing SuperNodes")
        return list(data.get("nodes", []))

    def online_node_ids(self) -> set[int]:
        return {int(n["node-id"]) for n in self.list_nodes() if n.get("status") == "online"}

    def wait_for_nodes(
        self, count: int, timeout: float = 120.0, *, exact: bool = False
    ) -> set[int]:
        """Wait until ``count`` SuperNodes (exactly, with ``exact``) are online.

        ``exact`` matters after stopping sites: the SuperLink marks a node offline only
        when it says goodbye or misses its heartbeats, so "at least n" may count a
        node that is on its way out.
        """
        deadline = time.monotonic() + timeout
        online: set[int] = set()
        while time.monotonic() < deadline:
            online = self.online_node_ids()
            if len(online) == count or (len(online) > count and not exact):
                return online
            dead = [s.spec.name for s in self.sites.values()
                    if s.process.popen is not None and not s.process.running()]
            if dead:
                logs = "\n".join(f"--- {n}\n{self.sites[n].process.log()}" for n in dead)
                raise DeploymentError(f"SuperNode(s) {', '.join(dead)} exited:\n{logs}")
            time.sleep(1.0)
        raise DeploymentTimeout(f"{len(online)} of {count} SuperNodes online after {timeout} s")

    # ------------------------------------------------------------------ runs

    def start_run(self, run_config: Mapping[str, ConfigValue], name: str = "run") -> RunHandle:
        """Submit a study with ``flwr run --stream`` (returns at once; see ``wait_run``).

        ``output-dir`` defaults to ``<workdir>/<name>/output``; it must be absolute,
        because the ServerApp runs in a process started by the SuperLink, not here.
        """
        folder = self.workdir / name
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        config: dict[str, ConfigValue] = {"study-id": self.study_id, **run_config}
        config.setdefault("output-dir", str(folder / "output"))
        output_dir = Path(str(config["output-dir"]))
        if not output_dir.is_absolute():
            raise ValueError("output-dir must be an absolute path in a deployment")
        config_file = folder / "run-config.toml"
        _write_toml(config_file, config)
        cmd = [flower_executable("flwr"), "run", str(self.app_dir), CONNECTION,
               "--run-config", str(config_file), "--stream"]
        self.commands.append(shlex.join(cmd))
        log_path = folder / "flwr-run.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self._env(self.cli_home), start_new_session=True,
            )
        return RunHandle(proc, log_path, output_dir, time.monotonic())

    def wait_run(self, handle: RunHandle, timeout: float = 900.0) -> RunResult:
        """Wait for ``flwr run --stream`` to end; on timeout stop the run and raise."""
        remaining = timeout - (time.monotonic() - handle.started)
        try:
            handle.process.wait(timeout=max(remaining, 0.1))
        except subprocess.TimeoutExpired:
            run_id = self._run_id(handle.log_path)
            if run_id is not None:
                with contextlib.suppress(DeploymentError):
                    self.flwr("stop", str(run_id), CONNECTION, timeout=60)
            _signal([(handle.process.pid, None)], signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                handle.process.wait(timeout=10)
            raise DeploymentTimeout(
                f"the study ran past {timeout:.0f} s and was stopped; log:\n"
                f"{_tail(handle.log_path)}"
            ) from None
        seconds = time.monotonic() - handle.started
        run_id = self._run_id(handle.log_path)
        info: dict[str, Any] = {}
        status = "not-started"
        if run_id is not None:
            try:
                info = self.run_info(run_id)
                status = str(info.get("status", "unknown"))
            except DeploymentError:  # the SuperLink was stopped under the run (fault tests)
                status = "unknown:superlink-unreachable"
        return RunResult(run_id, status, seconds, handle.output_dir, handle.log_path, info)

    def run_study(
        self, run_config: Mapping[str, ConfigValue], *, timeout: float = 900.0, name: str = "run"
    ) -> RunResult:
        """Submit a study and wait for it (see ``start_run``)."""
        return self.wait_run(self.start_run(run_config, name), timeout)

    @staticmethod
    def _run_id(log_path: Path) -> int | None:
        match = re.search(r"Successfully started run (\d+)", _tail(log_path, 10**7))
        return int(match.group(1)) if match else None

    def run_info(self, run_id: int) -> dict[str, Any]:
        """``flwr ls --run-id``: status, timings, network traffic of one run."""
        data = self._json(
            self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json"),
            f"run {run_id}",
        )
        runs = data.get("runs", [])
        return dict(runs[0]) if runs else {}

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Stop every SuperNode, then the SuperLink; nothing started here outlives this."""
        stop_processes([p for site in self.sites.values() for p in site.processes()],
                       grace=CLOSE_GRACE)
        if self.superlink is not None:
            self.superlink.stop(grace=CLOSE_GRACE)

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collect_outputs(result: RunResult, dest: Path) -> list[Path]:
    """Copy the coordinator's outputs (model, synthetic table, summary) to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in OUTPUTS:
        src = result.output_dir / name
        if src.is_file():
            shutil.copy2(src, dest / name)
            copied.append(dest / name)
    return copied


@contextlib.contextmanager
def heart_disease_deployment(
    workdir: Path,
    sites: Sequence[str] = ("cleveland", "hungarian", "va"),
    *,
    epsilon: float = DEFAULT_EPSILON,
    tls: bool = True,
    auth: bool = True,
    timeout: float = 180.0,
    site_runtime: bool = True,
) -> Iterator[LocalDeployment]:
    """A running deployment of the bundled heart-disease hospitals (whole files)."""
    specs = heart_site_specs(sites, epsilon)
    with LocalDeployment(workdir, tls=tls, auth=auth, site_runtime=site_runtime) as dep:
        dep.start_superlink()
        dep.add_sites(specs)
        dep.wait_for_activation(sites, timeout=timeout)
        yield dep


def heart_site_specs(sites: Sequence[str], epsilon: float) -> list[SiteSpec]:
    """The bundled heart-disease hospitals named in ``sites`` (whole files)."""
    from .datasets import bundled_schema_path, bundled_site_files

    files = bundled_site_files("heart_disease")
    unknown = set(sites) - set(files)
    if unknown:
        raise ValueError(f"unknown heart-disease site(s): {sorted(unknown)}")
    schema = bundled_schema_path("heart_disease")
    return [SiteSpec(name, str(files[name]), str(schema), epsilon=epsilon) for name in sites]


# --------------------------------------------------------------------------- CLI


def _stop_and_resume(
    dep: LocalDeployment, study: dict[str, ConfigValue], after: int, timeout: float
) -> RunResult:
    """Run a study, kill the coordinator once round ``after`` is checkpointed, resume it."""
    from ..common.generators import Generator

    if not 0 < after < int(study["num-server-rounds"]):
        raise ValueError("--stop-coordinator-after must be a round before the last")
    handle = dep.start_run(study, name="first")
    checkpoint = handle.output_dir / "checkpoint.fsg"
    deadline = time.monotonic() + timeout
    while not (checkpoint.exists() and int(Generator.read_meta(checkpoint)["round"]) >= after):
        if time.monotonic() > deadline or handle.process.poll() is not None:
            raise DeploymentError(f"round {after} was never checkpointed:\n"
                                  f"{_tail(handle.log_path)}")
        time.sleep(0.5)
    dep.stop_superlink(crash=True)
    print(f"Coordinator killed after round {after}, "
          f"{time.monotonic() - handle.started:.1f} s into the study")
    try:  # `flwr run --stream` lost its SuperLink
        handle.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        _signal([(handle.process.pid, None)], signal.SIGTERM)
        handle.process.wait(timeout=30)
    start = time.monotonic()
    dep.restart_superlink()
    dep.wait_for_nodes(len(dep.sites), timeout=180)
    print(f"SuperLink restarted, {len(dep.sites)} SuperNodes online again: "
          f"{time.monotonic() - start:.1f} s")
    return dep.run_study({**study, "resume": True, "output-dir": str(handle.output_dir)},
                         timeout=timeout, name="resumed")


def main(argv: Sequence[str] | None = None) -> int:
    """Run a deployed heart-disease study on loopback and print commands, outputs, timings."""
    parser = argparse.ArgumentParser(
        prog="python -m fedsynth.simulations.deploy",
        description="A fedsynth study on Flower's deployment engine, on this machine.",
    )
    parser.add_argument("--sites", default="cleveland,hungarian,va")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=StudyConfig().local_epochs)
    parser.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON)
    parser.add_argument("--generator-params", default="{}")
    parser.add_argument("--min-sites", type=int, default=0,
                        help="sites a round needs (default: all of --sites)")
    parser.add_argument("--out", type=Path, default=Path("fedsynth-deploy"))
    parser.add_argument("--round-timeout", type=float, default=StudyConfig().round_timeout)
    parser.add_argument("--stop-coordinator-after", type=int, default=0, metavar="ROUND",
                        help="kill the SuperLink once ROUND is checkpointed, restart it and "
                        "resume the study (the coordinator-restart drill)")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no authentication")
    parser.add_argument("--flower-isolation", action="store_true",
                        help="Flower's default subprocess isolation (a cold ClientApp "
                        "process per message) instead of each site's warm runtime")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args(None if argv is None else list(argv))
    sites = [s for s in args.sites.split(",") if s]
    tls = not args.insecure
    start = time.monotonic()
    study: dict[str, ConfigValue] = {
        "num-server-rounds": args.rounds,
        "local-epochs": args.local_epochs,
        "generator-params": json.dumps(json.loads(args.generator_params)),
        "min-sites": args.min_sites or len(sites),
        "round-timeout": args.round_timeout,
    }
    specs = heart_site_specs(sites, args.epsilon)
    with LocalDeployment(args.out.resolve(), tls=tls, auth=tls,
                         site_runtime=not args.flower_isolation) as dep:
        dep.start_superlink()
        # The study is submitted as soon as the SuperLink listens, while the sites are
        # registered and start: the ServerApp's own start (a process importing torch) is
        # the longest step before round 1, and it waits for min-sites SuperNodes before
        # its first question anyway.
        handle = None if args.stop_coordinator_after else dep.start_run(study)
        dep.add_sites(specs)
        dep.wait_for_activation(sites, timeout=180.0)
        ready = time.monotonic() - start
        if handle is not None:
            result = dep.wait_run(handle, timeout=args.timeout)
        else:
            result = _stop_and_resume(dep, study, args.stop_coordinator_after, args.timeout)
        print("Commands run:")
        for cmd in dep.commands:
            print(f"  {cmd}")
    print(f"Deployment up (SuperLink + {len(sites)} SuperNodes online): {ready:.1f} s")
    print(f"Study {result.run_id}: {result.status} in {result.seconds:.1f} s (flwr run)")
    if result.completed:
        summary = result.summary
        print(f"  rounds completed {summary['rounds_completed']}, "
              f"federated seconds {result.timings['seconds_federated']:.1f}")
        for site, entry in summary["sites"].items():
            print(f"  {site}: {entry}")
        print(f"  outputs in {result.output_dir}: {', '.join(OUTPUTS)}")
    else:
        print(result.log())
    return 0 if result.completed else 1


if __name__ == "__main__":
    sys.exit(main())
