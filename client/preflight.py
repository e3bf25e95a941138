"""``fedsynth preflight``: a site checks its whole setup before its SuperNode joins a study.

A hospital's SuperNode is started once and then waits for the coordinator's rounds; a
wrong path, a table that fails the schema or a key file with loose permissions shows up
only when the first round arrives, in a log nobody is watching, and costs the study a
round. So a site runs this with the very values its SuperNode will get as node config,
and is told every problem at once:

- the node config itself (budget, delta, noise multiplier) as the ClientApp parses it;
- the schema and the table (the same check as ``fedsynth check``; the table is only
  read, never changed, and the detailed findings with row numbers stay on this screen);
- ``state-dir``: present and writable, because the site's privacy ledger lives there
  and a ledger that cannot be saved is a ledger that resets when the SuperNode restarts;
- key files: the SuperNode's authentication key, the study CA certificate and, for
  encrypted studies, the X25519 key and wrapped CKKS context; each must exist, be
  readable and parse, and secret ones must be readable by this user only.

When nothing is wrong it prints the exact ``fedsynth site-runtime`` and ``flower-supernode``
command lines (the site's warm ClientApp runtime, client/runtime.py), with the
node config quoted the way Flower parses it, so what was checked is what runs.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import stat
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..common.protocol import HONEST_SITES
from ..common.study import NODE_KEYS

ConfigValue = str | int | float | bool

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
#: The SuperNode's Runtime API port when ``--port`` is not given (Flower 1.41's default).
FLOWER_RUNTIME_PORT = 9094

# Node config keys a fedsynth SuperNode reads: common/study.py, SiteConfig.
ENCRYPTION_KEYS = ("key-dir", "holder-public-key", "wrapped-context")


# --------------------------------------------------------------------------- node config


def _toml_value(key: str, value: ConfigValue) -> str:
    """A value as Flower's ``--node-config`` parser reads it (TOML, one token or quoted).

    Flower finds ``key=value`` pairs with a regular expression that ends a quoted value
    at the next quote of the same kind, so a string is written as a TOML basic string
    ("...") when it holds no double quote or backslash (which TOML would read as an
    escape), else as a literal string ('...'); a value with both quotes cannot be passed.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if "\n" in value:
        raise ValueError(f"node config value of {key!r} may not contain a newline")
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    raise ValueError(f"node config value of {key!r} holds both kinds of quote")


def node_config_arg(config: Mapping[str, ConfigValue]) -> str:
    """The ``--node-config`` string for ``config``: space-separated ``key=value`` pairs."""
    for key in config:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise ValueError(f"node config key {key!r} must be letters, digits, '-', '_', '.'")
    return " ".join(f"{k}={_toml_value(k, v)}" for k, v in config.items())


def parse_node_config(text: str) -> dict[str, ConfigValue]:
    """Parse a ``--node-config`` string exactly as ``flower-supernode`` does."""
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args([text]))
    except Exception as exc:  # click.ClickException on malformed TOML
        raise ValueError(f"--node-config is not in Flower's key=value format: {exc}") from None


# --------------------------------------------------------------------------- findings


@dataclass
class Report:
    """What the pre-flight found: problems block the start, notes only inform."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ok: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _check_readable_file(path: Path, what: str, report: Report) -> bool:
    if not path.exists():
        report.problems.append(f"{what} {path} does not exist")
        return False
    if not path.is_file():
        report.problems.append(f"{what} {path} is not a file")
        return False
    if not os.access(path, os.R_OK):
        report.problems.append(f"{what} {path} is not readable by this user")
        return False
    return True


def _check_secret_file(path: Path, what: str, report: Report) -> bool:
    """A secret must be a readable file that no other user can read or write."""
    if not _check_readable_file(path, what, report):
        return False
    mode = _mode(path)
    good = True
    if mode & 0o077:
        report.problems.append(
            f"{what} {path} has permissions {mode:04o}: other users can reach it; run "
            f"`chmod 600 {path}` and consider it exposed if it was shared"
        )
        good = False
    if hasattr(os, "getuid") and path.stat().st_uid != os.getuid():
        report.problems.append(
            f"{what} {path} belongs to another user; the SuperNode's user must own it"
        )
        good = False
    return good


def _check_state_dir(state_dir: str, report: Report) -> None:
    if not state_dir:
        report.problems.append(
            "no state-dir in the node config: the site's privacy ledger would live only in "
            "the SuperNode's memory and restart from zero with it; give a folder this "
            "SuperNode alone writes to"
        )
        return
    path = Path(state_dir)
    if path.exists():
        if not path.is_dir():
            report.problems.append(f"state-dir {path} exists and is not a folder")
            return
        try:
            fd, tmp = tempfile.mkstemp(dir=path, prefix=".preflight-")
            os.close(fd)
            os.unlink(tmp)
        except OSError as exc:
            report.problems.append(f"state-dir {path} is not writable: {exc.strerror or exc}")
            return
        if _mode(path) & 0o022:
            report.problems.append(
                f"state-dir {path} has permissions {_mode(path):04o}: other users could "
                f"replace the privacy ledger; run `chmod 700 {path}`"
            )
            return
        report.ok.append(f"state-dir {path} is writable by this user only")
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
        report.ok.append(f"state-dir {path} will be created (under {parent}, writable)")
        report.notes.append(f"create it owner-only now: mkdir -m 700 -p {path}")
    else:
        report.problems.append(f"state-dir {path} does not exist and cannot be created")


def _check_site_config(node: Mapping[str, ConfigValue], report: Report) -> None:
    from ..common.study import ConfigError, SiteConfig

    try:
        site = SiteConfig.from_node_config(dict(node))
    except ConfigError as exc:
        report.problems.append(str(exc))
        return
    if not site.dp:
        report.problems.append(
            "dp = false: this site would train without differential privacy, which is a "
            "benchmark baseline and never for a real study"
        )
    else:
        report.ok.append(f"privacy budget epsilon {site.epsilon:g}, delta {site.delta:g}")


def _check_threads(node: Mapping[str, ConfigValue], report: Report) -> None:
    """torch-threads as the ClientApp reads it (common/threads.py): a bad value there
    stops the site at its first round, so the pre-flight runs the same check."""
    from ..common.threads import NODE_KEY, site_threads

    if NODE_KEY not in node:
        return
    try:
        site_threads(dict(node))
    except ValueError as exc:
        report.problems.append(str(exc))


def _check_table(data: str, schema_path: str, report: Report) -> None:
    from ..common.schema import Schema, SchemaError
    from ..common.study import schema_fingerprint
    from ..common.table import TableCheckError, read_table

    if not _check_readable_file(Path(schema_path), "schema", report):
        schema = None
    else:
        try:
            schema = Schema.load(schema_path)
        except SchemaError as exc:
            report.problems.append(f"schema {schema_path}: {exc}")
            schema = None
    if schema is not None:
        report.ok.append(
            f"schema {schema.name!r}, fingerprint {schema_fingerprint(schema)} (the study's "
            "published schema must give the same; the coordinator can tell you its own)"
        )
    if not _check_readable_file(Path(data), "data file", report) or schema is None:
        return
    try:
        frame = read_table(data, schema)
    except TableCheckError as exc:
        # The details (row numbers, example values) are this site's own data: they are
        # printed here, at the site, and are exactly what the data manager needs.
        report.problems.extend(
            f"data file {data}: {problem}" for problem in exc.problems
        )
        return
    except (OSError, ValueError) as exc:
        report.problems.append(f"data file {data} cannot be read: {exc}")
        return
    report.ok.append(
        f"data file {data}: {len(frame)} rows, {len(frame.columns)} columns, matches the "
        "schema (the file was only read)"
    )


def _check_auth_key(path: Path, report: Report) -> None:
    from ..common.certs import CertError, load_auth_private_key, ssh_fingerprint

    if not _check_secret_file(path, "SuperNode private key", report):
        return
    try:
        key = load_auth_private_key(path)
    except CertError as exc:
        report.problems.append(str(exc))
        return
    from cryptography.hazmat.primitives import serialization

    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    report.ok.append(
        f"SuperNode key {path}: ECDSA {key.curve.name}, owner-only; the coordinator must "
        f"have registered the public key with fingerprint {ssh_fingerprint(line)}"
    )


def _check_ca(path: Path, report: Report) -> None:
    from ..common.certs import CertError, load_ca_certificate

    if not _check_readable_file(path, "CA certificate", report):
        return
    try:
        cert = load_ca_certificate(path)
    except CertError as exc:
        report.problems.append(str(exc))
        return
    report.ok.append(
        f"CA certificate {path}: {cert.subject.rfc4514_string()}, valid until "
        f"{cert.not_valid_after_utc:%Y-%m-%d} (public: no need to keep it secret)"
    )


def _check_masks(node: Mapping[str, ConfigValue], report: Report) -> None:
    """A masked-sum site's roster: its key, the other sites' keys, its honest-sites."""
    peers = str(node.get("peer-keys", ""))
    if not peers:
        return
    from ..common.encryption.keys import KeySetupError
    from ..common.encryption.masks import load_roster

    key_dir = str(node.get("key-dir", ""))
    if not key_dir:
        report.problems.append("peer-keys needs key-dir: this site's own key pair (fedsynth "
                               "keys site-init) agrees each pair's masks")
        return
    try:
        roster = load_roster(str(node.get("site-name", "")) or "this-site", key_dir, peers)
    except KeySetupError as exc:
        report.problems.append(str(exc))
        return
    honest = node.get(HONEST_SITES, 1)  # the node config key, as the replies name it
    if isinstance(honest, int) and honest > roster.size:
        report.problems.append(f"honest-sites = {honest} but peer-keys lists {roster.size - 1} "
                               "other sites: trust cannot reach more sites than the study has")
    listed = ", ".join(f"{n} {fp}" for n, fp in roster.fingerprints().items())
    report.ok.append(f"masked sums: {roster.size - 1} other sites' keys parse; check each "
                     f"fingerprint with its site: {listed}")


def _check_encryption(node: Mapping[str, ConfigValue], study_id: str, report: Report) -> None:
    _check_masks(node, report)
    given = {k: str(node[k]) for k in ENCRYPTION_KEYS if str(node.get(k, ""))}
    if not given or (set(given) == {"key-dir"} and str(node.get("peer-keys", ""))):
        return  # no CKKS keys, or the key pair of a masked-sum site only
    missing = [k for k in ENCRYPTION_KEYS if k not in given]
    if missing:
        report.problems.append(
            f"encryption key files are incomplete: {', '.join(missing)} missing (an "
            "encrypted study needs key-dir, holder-public-key and wrapped-context; a "
            "masked-sum study, key-dir and peer-keys)"
        )
    from ..common.encryption.keys import (
        PRIVATE_KEY_FILE,
        KeySetupError,
        load_private_key,
        load_public_key,
        unwrap_secret_context,
    )

    checks_ok = True
    if "key-dir" in given:
        key_dir = Path(given["key-dir"])
        private = key_dir / PRIVATE_KEY_FILE if key_dir.is_dir() else key_dir
        if _check_secret_file(private, "encryption private key", report):
            try:
                load_private_key(private)
            except KeySetupError as exc:
                report.problems.append(str(exc))
                checks_ok = False
        else:
            checks_ok = False
    if "holder-public-key" in given:
        holder = Path(given["holder-public-key"])
        if _check_readable_file(holder, "key holder's public key", report):
            try:
                load_public_key(holder)
            except KeySetupError as exc:
                report.problems.append(str(exc))
                checks_ok = False
        else:
            checks_ok = False
    if "wrapped-context" in given:
        checks_ok &= _check_readable_file(
            Path(given["wrapped-context"]), "wrapped context", report
        )
    if missing or not checks_ok:
        return
    if not study_id:
        report.ok.append("encryption key files exist and parse")
        report.notes.append(
            "pass --study-id to also open the wrapped context (as the first round will)"
        )
        return
    try:
        unwrap_secret_context(
            study_id, given["key-dir"], given["holder-public-key"], given["wrapped-context"]
        )
    except KeySetupError as exc:
        report.problems.append(str(exc))
        return
    report.ok.append(f"the wrapped CKKS context opens with this site's key for {study_id!r}")


def _check_superlink(address: str, report: Report) -> None:
    if not address:
        report.problems.append("no --superlink: ask the coordinator for the SuperLink's HOST:PORT")
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        report.problems.append(
            f"--superlink {address!r} is not HOST:PORT (the coordinator gives you both)"
        )


# --------------------------------------------------------------------------- command


@dataclass
class PreflightInput:
    """Everything the pre-flight checks: the node config and the SuperNode's options."""

    node: dict[str, ConfigValue]
    superlink: str = ""
    ca_cert: str = ""
    auth_key: str = ""
    runtime_port: int | None = None
    insecure: bool = False
    study_id: str = ""


def absolute_node_config(node: Mapping[str, ConfigValue]) -> dict[str, ConfigValue]:
    """Paths made absolute: the ClientApp runs in a process whose folder is not ours."""
    out = dict(node)
    for key in ("data-path", "schema-path", "state-dir", *ENCRYPTION_KEYS, "peer-keys"):
        value = out.get(key)
        if isinstance(value, str) and value:
            out[key] = str(Path(value).expanduser().resolve())
    return out


def supernode_command(inp: PreflightInput) -> list[str]:
    """The ``flower-supernode`` command line for these checked settings."""
    cmd = ["flower-supernode", "--superlink", inp.superlink]
    if inp.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(Path(inp.ca_cert).resolve())]
    if inp.auth_key:
        cmd += ["--auth-supernode-private-key", str(Path(inp.auth_key).resolve())]
    # The site runs its own warm ClientApp runtime (client/runtime.py), not a cold
    # ClientApp process per message.
    cmd += ["--isolation", "process"]
    if inp.runtime_port is not None:
        cmd += ["--port", str(inp.runtime_port)]
    cmd += ["--node-config", node_config_arg(absolute_node_config(inp.node))]
    return cmd


def runtime_command(inp: PreflightInput) -> list[str]:
    """The ``fedsynth site-runtime`` command line beside the SuperNode's (same user)."""
    state = absolute_node_config(inp.node).get("state-dir")
    folder = Path(str(state)).parent if state else Path.cwd()
    port = inp.runtime_port if inp.runtime_port is not None else FLOWER_RUNTIME_PORT
    return ["fedsynth", "site-runtime", "--runtime-dir", str(folder / "clientapp-runtime"),
            "--runtime-api-address", f"127.0.0.1:{port}", "--insecure"]


def run_preflight(inp: PreflightInput) -> Report:
    """Every check, each independent of the others' outcome, so all problems show at once."""
    report = Report()
    node = inp.node
    unknown = sorted(set(node) - set(NODE_KEYS))
    if unknown:
        report.notes.append(f"node config keys fedsynth does not read: {', '.join(unknown)}")
    for key in ("data-path", "schema-path"):
        if not str(node.get(key, "")):
            report.problems.append(f"node config lacks {key}")
    _check_site_config(node, report)
    _check_threads(node, report)
    if "reproducible-noise-seed" in node:
        report.problems.append(
            "reproducible-noise-seed is set: it makes this site's DP noise replayable by "
            "anyone who learns the seed, so nothing the site sends would be a DP release; "
            "remove it (it is for tests and benchmarks only, and the ClientApp refuses it)"
        )
    if str(node.get("data-path", "")) and str(node.get("schema-path", "")):
        _check_table(str(node["data-path"]), str(node["schema-path"]), report)
    _check_state_dir(str(node.get("state-dir", "")), report)
    _check_superlink(inp.superlink, report)
    if inp.insecure:
        report.notes.append(
            "--insecure: no TLS; the link to the coordinator would be readable by anyone on "
            "the way (loopback tests only)"
        )
    elif not inp.ca_cert:
        report.problems.append(
            "no --ca-cert: the SuperNode needs the study CA certificate (ca.crt from the "
            "coordinator) to check it talks to the real SuperLink"
        )
    else:
        _check_ca(Path(inp.ca_cert), report)
    if inp.auth_key:
        _check_auth_key(Path(inp.auth_key), report)
    elif not inp.insecure:
        report.notes.append(
            "no --auth-key: a SuperLink with SuperNode authentication (the default for "
            "fedsynth studies) will refuse this SuperNode"
        )
    _check_encryption(node, inp.study_id, report)
    return report


def _port(text: str) -> int:
    """A TCP port, 1 to 65535: any other number went into both printed command lines,
    and the SuperNode and the site runtime then failed to bind or to meet."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"a port is a whole number from 1 to 65535, got "
                                         f"{text!r}")
    return port


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsynth preflight",
        description=(
            "Check a site's setup (table, schema, budget, state folder, keys) with the "
            "values its SuperNode will get, list every problem, and print the "
            "flower-supernode command to run when there is none."
        ),
    )
    parser.add_argument(
        "--node-config", default="",
        help="the exact --node-config string the SuperNode will get; the options below "
        "add to or override its keys",
    )
    parser.add_argument("--data", help="node config data-path: this site's table")
    parser.add_argument("--schema", help="node config schema-path: the study's schema")
    parser.add_argument("--site-name", help="node config site-name")
    parser.add_argument("--epsilon", type=float, help="node config epsilon (this site's budget)")
    parser.add_argument("--delta", type=float, help="node config delta")
    parser.add_argument("--noise-multiplier", type=float, help="node config noise-multiplier")
    parser.add_argument("--state-dir", help="node config state-dir (the privacy ledger)")
    parser.add_argument("--key-dir", help="node config key-dir (encrypted studies)")
    parser.add_argument("--holder-public-key", help="node config holder-public-key")
    parser.add_argument("--wrapped-context", help="node config wrapped-context")
    parser.add_argument("--validation-scores", choices=("none", "quality", "all"),
                        help="node config validation-scores: what this site sends when the "
                        "coordinator asks for federated validation (not DP; default none)")
    parser.add_argument("--study-id", default="", help="to open the wrapped context")
    parser.add_argument("--superlink", default="",
                        help="the coordinator's SuperLink HOST:PORT (the coordinator gives it)")
    parser.add_argument("--ca-cert", default="", help="the study CA certificate (ca.crt)")
    parser.add_argument("--auth-key", default="",
                        help="this site's SuperNode private key (auth.key)")
    parser.add_argument("--runtime-port", type=_port,
                        help="the SuperNode's local Runtime API port (default: Flower's 9094)")
    parser.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only)")
    return parser


def preflight_command(argv: Sequence[str]) -> int:
    """``fedsynth preflight``: 0 when the site may start, 1 on problems, 2 on bad usage."""
    parser = _build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        node = parse_node_config(args.node_config) if args.node_config else {}
    except ValueError as exc:
        print(f"fedsynth preflight: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # each node config key has the flag of the same name (--data and --schema aside)
    renamed = {"data-path": "data", "schema-path": "schema"}
    flags = {key: getattr(args, renamed.get(key, key).replace("-", "_"), None)
             for key in NODE_KEYS}
    node.update({k: v for k, v in flags.items() if v is not None})
    inp = PreflightInput(
        node=node,
        superlink=args.superlink,
        ca_cert=args.ca_cert,
        auth_key=args.auth_key,
        runtime_port=args.runtime_port,
        insecure=args.insecure,
        study_id=args.study_id,
    )
    report = run_preflight(inp)
    name = node.get("site-name") or Path(str(node.get("data-path", "?"))).stem
    print(f"fedsynth preflight for site {name!r}:")
    for line in report.ok:
        print(f"  ok       {line}")
    for line in report.notes:
        print(f"  note     {line}")
    for line in report.problems:
        print(f"  PROBLEM  {line}")
    if not report.passed:
        print(f"{len(report.problems)} problem(s): fix them and run the pre-flight again; "
              "nothing was changed.")
        return EXIT_PROBLEMS
    try:
        command = supernode_command(inp)
        runtime = runtime_command(inp)
    except ValueError as exc:
        print(f"  PROBLEM  {exc}")
        return EXIT_PROBLEMS
    print("All checks passed. Start this site's ClientApp runtime and its SuperNode, as "
          "this user (docs/deployment.md):")
    print(f"  {shlex.join(runtime)}")
    print(f"  {shlex.join(command)}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(preflight_command(sys.argv[1:]))
