"""A real deployment on loopback: Flower's SuperLink and SuperNodes, TLS, authentication.

Not a simulation: ``flower-superlink`` and one ``flower-supernode`` per hospital run as
separate processes, talk HTTPS with a study CA made by ``fedsynth certs``, and the
SuperLink admits only registered SuperNode keys; ``flwr run`` submits the study. One
deployment serves the whole module (starting Flower's processes is most of the cost):

1. a SuperNode whose key was never registered is refused, and a client that does not
   trust the study CA cannot even complete the TLS handshake;
2. three hospitals run a two-round DP study; its outputs and each site's accounting
   are checked;
3. a fourth, registered site whose table fails the schema check takes part in the same
   study: it is left out of every round with its problems, and the study goes on with
   the three others (one study serves both checks: each round costs every SuperNode a
   process start with torch and Opacus, tens of seconds on a small machine);
4. every message that crossed the network, as the coordinator's Grid recorded it, holds
   model arrays of the model's shapes, counts and metrics, and no row-level data;
5. shutting the deployment down leaves no Flower process behind.

Before it, quick checks without any Flower process: ``fedsynth certs`` writes files
Flower's own loaders accept, owner-only and never over existing ones, and
``fedsynth preflight`` lists every problem of a site's setup at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import socket
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedsynth.client.preflight import parse_node_config, preflight_command
from fedsynth.common.certs import certs_command
from fedsynth.common.dp_histogram import LEVELS
from fedsynth.common.generators import Generator
from fedsynth.common.protocol import GRID_MESSAGE
from fedsynth.common.quantile_grid import numeric_columns, release_cells
from fedsynth.common.schema import Schema
from fedsynth.simulations.datasets import bundled_schema_path, bundled_site_files
from fedsynth.simulations.deploy import (
    ACTIVATION_REFUSED,
    LocalDeployment,
    RunResult,
    SiteSpec,
    process_alive,
)

# Ray, the deployment engine or a whole study: the slow tier (pytest -m 'not slow').
pytestmark = pytest.mark.slow

SITES = ("cleveland", "hungarian", "va")
EPSILON = 3.0
ROUNDS = 2
N_SYNTHETIC = 200
STUDY = {
    "num-server-rounds": ROUNDS,
    "local-epochs": 1,
    "min-sites": len(SITES),
    "generator-params": json.dumps({"hidden": 16, "latent": 4}),
    "n-synthetic": N_SYNTHETIC,
}


BROKEN = "broken"


def _broken_table(src: Path, dest: Path) -> None:
    """Cleveland's first rows with an impossible age and an unknown chest-pain code."""
    lines = src.read_text().splitlines()[:40]
    bad = []
    for i, line in enumerate(lines):
        cells = line.split(",")
        if i % 7 == 0:
            cells[0] = "250"
        if i % 5 == 0:
            cells[2] = "9.0"
        bad.append(",".join(cells))
    dest.write_text("\n".join(bad) + "\n")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- certs, preflight


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode)
            for p in [folder, *folder.rglob("*")]}


def test_certs_are_owner_only_and_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    assert certs_command(["study", "--out", str(out), "--site", "cleveland",
                          "--host", "localhost", "--host", "127.0.0.1"]) == 0
    modes = _modes(out)
    assert all(m == 0o700 for p, m in modes.items() if (out / p).is_dir()), modes
    assert all(m == 0o600 for p, m in modes.items() if (out / p).is_file()), modes
    before = (out / "ca" / "ca.key").read_bytes()
    assert certs_command(["study", "--out", str(out)]) == 1  # refused, nothing replaced
    assert (out / "ca" / "ca.key").read_bytes() == before
    assert certs_command(["study", "--out", str(tmp_path / "x"), "--host", "not a host"]) == 1
    assert not (tmp_path / "x").exists()  # a bad argument writes nothing


def test_certs_are_what_flower_accepts(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    out = tmp_path / "certs"
    assert certs_command(["study", "--out", str(out), "--site", "va"]) == 0
    assert certs_command(["site", "--site", "va2", "--out", str(tmp_path / "va2")]) == 0
    for keys in (out / "sites" / "va", tmp_path / "va2"):
        # What flower-supernode --auth-supernode-private-key and `flwr supernode register` do.
        private = load_ssh_private_key((keys / "auth.key").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"
        assert try_load_public_key(keys / "auth.pub")
    ca = x509.load_pem_x509_certificate((out / "ca" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate(
        (out / "coordinator" / "superlink.crt").read_bytes()
    )
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_preflight_lists_every_problem(
    tmp_path: Path, heart_schema_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = tmp_path / "site.csv"
    _broken_table(bundled_site_files("heart_disease")["cleveland"], table)
    digest = _digest(table)
    assert certs_command(["site", "--site", "s", "--out", str(tmp_path / "keys")]) == 0
    key = tmp_path / "keys" / "auth.key"
    key.chmod(0o644)
    code = preflight_command([
        "--data", str(table), "--schema", str(heart_schema_path), "--epsilon", "-1",
        "--auth-key", str(key), "--ca-cert", str(tmp_path / "missing-ca.crt"),
    ])
    out = capsys.readouterr().out
    assert code == 1
    problems = [line for line in out.splitlines() if "PROBLEM" in line]
    for expected in ("epsilon must be a finite number > 0", "column 'age'", "column 'cp'",
                     "no state-dir", "no --superlink", "missing-ca.crt does not exist",
                     "permissions 0644"):
        assert any(expected in p for p in problems), (expected, out)
    assert "flower-supernode" not in out  # no command to start a broken site
    assert _digest(table) == digest


def test_preflight_prints_the_command_it_checked(
    tmp_path: Path, heart_schema_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "my data" / "cleveland.data"  # a space in the path
    data.parent.mkdir()
    shutil.copy(bundled_site_files("heart_disease")["cleveland"], data)
    assert certs_command(["study", "--out", str(tmp_path / "c"), "--site", "cleveland"]) == 0
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    node = (f'data-path="{data}" schema-path="{heart_schema_path}" site-name="cleveland" '
            f'epsilon=2.5 delta=1e-6 state-dir="{state}"')
    code = preflight_command([
        "--node-config", node, "--superlink", "127.0.0.1:9093",
        "--ca-cert", str(tmp_path / "c" / "ca" / "ca.crt"),
        "--auth-key", str(tmp_path / "c" / "sites" / "cleveland" / "auth.key"),
    ])
    out = capsys.readouterr().out
    assert code == 0, out
    command = out.strip().splitlines()[-1].strip()
    assert command.startswith("flower-supernode --superlink 127.0.0.1:9093 --root-certificates")
    argv = shlex.split(command)
    printed = parse_node_config(argv[argv.index("--node-config") + 1])
    assert printed == parse_node_config(node)  # what Flower will parse is what was checked


# --------------------------------------------------------------------------- deployment


def _loopback_usable() -> str:
    """Why this machine cannot host the deployment ('' when it can): outside the project."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen(1)
    except OSError as exc:
        return f"cannot listen on 127.0.0.1 ({exc}); a deployment needs loopback sockets"
    if not Path("/proc").is_dir():
        return "no /proc: the harness needs it to stop Flower's detached processes"
    return ""


@pytest.fixture(scope="module")
def broken_table(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The bad site's table and its digest before the study (the file must not change)."""
    path = tmp_path_factory.mktemp("broken-site") / "table.csv"
    _broken_table(bundled_site_files("heart_disease")["cleveland"], path)
    return path, _digest(path)


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, broken_table: tuple[Path, str]
) -> Iterator[LocalDeployment]:
    reason = _loopback_usable()
    if reason:
        pytest.skip(reason)
    files = bundled_site_files("heart_disease")
    schema = bundled_schema_path("heart_disease")
    broken, _ = broken_table
    with LocalDeployment(tmp_path_factory.mktemp("deploy"), study_id="deploy-test") as dep:
        dep.start_superlink()
        specs = [SiteSpec(name, str(files[name]), str(schema), epsilon=EPSILON) for name in SITES]
        dep.add_sites([*specs, SiteSpec(BROKEN, str(broken), str(schema), epsilon=EPSILON)])
        dep.wait_for_nodes(len(SITES) + 1, timeout=180)
        yield dep


@pytest.fixture(scope="module")
def study(deployment: LocalDeployment) -> RunResult:
    # The coordinator describes every message it sends and receives (layout only).
    record = deployment.workdir / "study" / "messages.jsonl"
    return deployment.run_study({**STUDY, "record-messages": str(record)}, timeout=600,
                                name="study")


def _handshake(port: int, ca: Path | None) -> None:
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1"):
        pass


def test_tls_uses_the_study_ca(deployment: LocalDeployment) -> None:
    _handshake(deployment.port, deployment.ca_cert)  # the study CA verifies the SuperLink
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(deployment.port, None)  # a client trusting only public CAs does not
    assert "Uvicorn running on https://" in deployment.superlink.log()


def test_unregistered_supernode_is_refused(deployment: LocalDeployment) -> None:
    known = {s.node_id for s in deployment.sites.values()}  # registered, all online
    va = deployment.sites["va"].spec
    rogue = deployment.add_site(
        SiteSpec("rogue", va.data_path, va.schema_path, epsilon=EPSILON), register=False
    )
    code = deployment.wait_supernode_exit("rogue", timeout=90)
    assert code is not None and code != 0, "an unregistered SuperNode must not stay connected"
    assert ACTIVATION_REFUSED in rogue.process.log()
    assert "No SuperNode found with the given public key" in deployment.superlink.log()
    nodes = deployment.list_nodes()
    assert {int(n["node-id"]) for n in nodes} == known  # no node was created for it
    assert all(n["status"] == "online" for n in nodes)
    deployment.stop_supernode("rogue")  # its ClientApp runtime too
    del deployment.sites["rogue"]


def test_deployed_study_outputs(deployment: LocalDeployment, study: RunResult) -> None:
    assert study.completed, study.log()
    summary = study.summary
    assert summary["rounds_completed"] == ROUNDS
    for record in summary["rounds"]:
        trained = {s["site"] for s in record["sites"] if s["status"] == "trained"}
        assert trained == set(SITES), record
        assert {s["site"] for s in record["sites"]} == {*SITES, BROKEN}
    for site in SITES:
        entry = summary["sites"][site]
        assert entry["rounds_trained"] == ROUNDS
        assert 0 < entry["epsilon"] <= EPSILON * (1 + 1e-9)

    model = Generator.load(study.output_dir / "model.fsg")
    schema = Schema.load(bundled_schema_path("heart_disease"))
    rows = model.sample(5, seed=0)
    assert list(rows.columns) == [c.name for c in schema.columns]
    synthetic = pd.read_csv(study.output_dir / "synthetic.csv")
    assert len(synthetic) == N_SYNTHETIC
    assert list(synthetic.columns) == [c.name for c in schema.columns]
    # Flower saw the run end normally and moved only model-sized payloads.
    assert study.run_info["status"] == "finished:completed"
    assert study.run_info["network-traffic"]["total-bytes"] > 0


def test_site_ledgers_match_reported_epsilon(deployment: LocalDeployment, study: RunResult) -> None:
    """Each site's ledger on its own disk accounts for the whole study, as reported."""
    from fedsynth.client.site import SiteState

    reported = study.summary["sites"]
    for name in SITES:
        ledgers = list((deployment.sites[name].folder / "state").glob("*ledger*.json"))
        assert len(ledgers) == 1, ledgers
        state = SiteState.from_record(json.loads(ledgers[0].read_text()))
        assert state.rounds_trained == ROUNDS
        assert state.ledger.epsilon(1e-5) == pytest.approx(reported[name]["epsilon"], rel=1e-9)
        assert ledgers[0].stat().st_mode & 0o077 == 0


def test_invalid_site_is_left_out(study: RunResult, broken_table: tuple[Path, str]) -> None:
    summary = study.summary
    for record in summary["rounds"]:
        entry = next(s for s in record["sites"] if s["site"] == BROKEN)
        assert entry["status"] == "invalid-data"
        problems = entry["problems"]
        assert any("'age'" in p for p in problems) and any("'cp'" in p for p in problems)
        # What reaches the coordinator names columns and counts, never rows or values.
        assert not any("row " in p or "250" in p for p in problems), problems
    assert summary["sites"][BROKEN]["last_status"] == "invalid-data"
    assert summary["sites"][BROKEN]["rounds_trained"] == 0
    # The coordinator's log (streamed by `flwr run`) names the site and its problems.
    log = study.log_path.read_text(errors="replace")
    assert f"site {BROKEN} did not train (invalid-data)" in log
    for problem in problems:  # every problem the site listed, in the coordinator's log
        assert f"    - {problem}" in log, problem
    # The site's file is only read: it is byte for byte what it was before the study.
    path, digest = broken_table
    assert _digest(path) == digest


def _row_counts() -> dict[str, int]:
    counts = {}
    for name in SITES:
        path = bundled_site_files("heart_disease")[name]
        counts[name] = sum(1 for line in path.read_text().splitlines() if line.strip())
    return counts


def test_no_row_leaves_a_site(
    deployment: LocalDeployment, study: RunResult, broken_table: tuple[Path, str]
) -> None:
    """Every message that crossed the network: model arrays, counts, metrics, nothing else.

    The coordinator's Grid logged the layout of each message it sent and received
    (``record-messages``): record kinds, keys, array shapes, value types and lengths.
    Every array must be one of the model's, shape for shape; metrics are the public
    figures a site sends; config values are scalars or short text, and no list or text
    is as long as a site's table (a column of rows would be).
    """
    assert study.completed, study.log()
    lines = (deployment.workdir / "study" / "messages.jsonl").read_text().splitlines()
    messages = [json.loads(line) for line in lines]
    schema = Schema.load(bundled_schema_path("heart_disease"))
    model = Generator.load(study.output_dir / "model.fsg")
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    rows = {**_row_counts(), BROKEN: len(broken_table[0].read_text().splitlines())}
    cells = {n * len(schema.columns) for n in rows.values()}
    metric_keys = {"num-examples", "loss", "steps", "noise-multiplier",
                   "epsilon", "delta", "epsilon-budget", "reproducible-noise"}

    sent = [m for m in messages if m["direction"] == "sent"]
    received = [m for m in messages if m["direction"] == "received"]
    sites = len(SITES) + 1
    # before round 1, one quantile-grid query each way per site (the sites' DP release
    # of where their numeric columns lie, docs/privacy.md); then one train message each
    grid_cells = release_cells(schema)
    queries = [m for m in messages if m["message_type"] == GRID_MESSAGE]
    messages = [m for m in messages if m["message_type"] != GRID_MESSAGE]
    assert len(queries) == 2 * sites and all("error" not in m for m in queries)
    for m in queries:
        if m["direction"] == "sent":
            assert set(m["records"]) == {"config"}
        elif "arrays" in m["records"]:  # a release: one vector of noisy counts, no row
            got = {k: e["shape"] for k, e in m["records"]["arrays"]["entries"].items()}
            assert got == {"values": [grid_cells]}
    assert sum("arrays" in m["records"] for m in queries) == len(SITES)  # not the broken one
    sent = [m for m in sent if m["message_type"] != GRID_MESSAGE]
    received = [m for m in received if m["message_type"] != GRID_MESSAGE]
    assert len(sent) == len(received) == ROUNDS * sites  # one train message each way
    assert all(m["message_type"] == "train" and "error" not in m for m in messages)
    for m in sent:
        assert set(m["records"]) == {"arrays", "config"}
    for m in received:
        assert set(m["records"]) <= {"arrays", "metrics", "site"}
        assert set(m["records"]["metrics"]["entries"]) <= metric_keys
    for m in messages:
        for name, record in m["records"].items():
            if record["kind"] == "arrays":
                # on the wire the model is one packed array (common/protocol.py), whose
                # bytes decode to exactly the model's arrays
                assert record["decodes"] and record["packed_bytes"] > 0, name
                got = {k: e["shape"] for k, e in record["entries"].items()}
                assert got == shapes, (name, m["direction"])
                assert all(e["dtype"] == "float32" for e in record["entries"].values())
            else:
                assert record["kind"] in ("metrics", "config"), record
                for key, entry in record["entries"].items():
                    assert entry["type"] in ("float", "int", "str", "bool", "list"), key
                    length = entry.get("length", 0)
                    # generator-params carries the public grid: (LEVELS + 1) edges per
                    # numeric column, as text, derived from the summed DP releases, and
                    # the heaps found in them (a few [value, lo, hi, share] rows)
                    limit = (20 * (LEVELS + 1) * len(numeric_columns(schema)) + 2000
                             if key == "generator-params" else 1000)
                    assert length < limit and entry.get("max_item_length", 0) < 1000, key
                    if entry["type"] == "list":  # a site's problems, never a column
                        assert entry["items"] in ([], ["str"]), (key, entry)
                        assert length not in rows.values() and length not in cells, key
    # The trained replies carried the model; the broken site's replies carried none.
    trained = [m for m in received if "arrays" in m["records"]]
    assert len(trained) == ROUNDS * len(SITES)


def _listening_inodes() -> set[str]:
    """Socket inodes of every TCP socket listening on this machine (IPv4 and IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    inodes.add(fields[9])
    return inodes


def test_each_site_runs_a_warm_runtime_reachable_only_by_its_user(
    deployment: LocalDeployment, study: RunResult
) -> None:
    """Every site ran its rounds through its own ClientApp runtime (``--isolation
    process``), which listens on no network port: only an owner-only Unix socket."""
    assert study.completed
    listening = _listening_inodes()
    for site in deployment.sites.values():
        assert site.runtime is not None and site.runtime.running(), site.spec.name
        assert "--isolation" in site.process.args
        assert site.process.args[site.process.args.index("--isolation") + 1] == "process"
        folder = site.folder / "runtime"
        sock = folder / "runtime.sock"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert site.runtime.popen is not None
        pid = site.runtime.popen.pid
        fds = [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()]
        inodes = {f[len("socket:["):-1] for f in fds if f.startswith("socket:[")}
        assert inodes and not inodes & listening, site.spec.name
    # the runtime served the rounds: its log shows Flower's ClientApp ran in it
    log = (deployment.sites[SITES[0]].folder / "runtime.log").read_text()
    assert "fedsynth site runtime ready" in log and "Loading ClientApp" in log
    assert "OMP_NUM_THREADS=" in log  # the runtime's thread setting, 1 unless the site chose


def test_shutdown_leaves_no_process(deployment: LocalDeployment) -> None:
    processes = [deployment.superlink,
                 *(p for s in deployment.sites.values() for p in s.processes())]
    roots = [p.pid for p in processes if p is not None and p.pid is not None]
    ports = [deployment.port, *(s.runtime_port for s in deployment.sites.values())]
    deployment.close()
    assert not any(process_alive(pid) for pid in roots)
    leftovers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(f"127.0.0.1:{port} " in cmdline + " " for port in ports) and process_alive(
            int(entry.name)
        ):
            leftovers.append(cmdline)
    assert not leftovers, leftovers
