"""A site's long-lived ClientApp runtime: torch, Opacus and fedsynth imported once.

Flower 1.41 runs every message a site receives in a new ``flwr-clientapp`` process,
in both of the SuperNode's isolation modes: its SuperExec asks the SuperNode's local
Runtime API for a task, gets a one-time token and starts ``flwr-clientapp --token T``,
which serves that one message and exits. fedsynth's ClientApp needs torch and Opacus,
whose import took 3-4 s on an idle machine and 12-17 s on a loaded one: most of a
deployed round (docs/deployment.md, "What a round costs").

This module is the site's ClientApp runtime for ``flower-supernode --isolation
process``, in which the site, not the SuperNode, runs the SuperExec. It

1. imports torch, Opacus, Flower's ClientApp runner and fedsynth's ClientApp once;
2. listens on a Unix socket in its own folder (``--runtime-dir``, 0700; socket 0600;
   every caller's user id checked with ``SO_PEERCRED``): nothing listens on a network
   port, and only processes of the site's own user can reach it;
3. starts Flower's own ``flower-superexec`` against the site's SuperNode, with a
   hand-over script named ``flwr-clientapp`` first on that SuperExec's ``PATH``;
4. for each task, the hand-over script passes its arguments and its standard streams
   over the socket; the runtime checks them (the token; the Runtime API address must be
   this site's own SuperNode; no runtime dependency installation) and forks a child
   that runs Flower's ``flwr-clientapp`` entry point with that token, exactly as the
   process Flower would have started, only with everything already imported.

Each task still runs in its own process (a fork of the warm one), so nothing a round
leaves in memory reaches the next: a site's DP draws come from ``DPRandomness.secret()``
(the OS CSPRNG, read at each draw, not at import), Python's ``random`` is reseeded in a
forked child, and the runtime itself never runs a torch operation, holds no rows and
keeps no state; the ClientApp's state stays where Flower keeps it (the SuperNode's
``context.state``) and the site's ``state-dir``. Flower is not patched: the SuperNode,
SuperExec and ClientApp code that runs is Flower's, started through its public commands.

Run it next to the SuperNode, as the same user::

    flower-supernode ... --isolation process --port 9101
    fedsynth site-runtime --runtime-dir DIR --runtime-api-address 127.0.0.1:9101 --insecure
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import FedsynthError
from ..common.protocol import SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S

SOCKET = "runtime.sock"
HANDOVER = "flwr-clientapp"  # the name Flower's SuperExec starts a ClientApp task by
THREADS_ENV = "OMP_NUM_THREADS"  # numpy/scikit-learn thread pools: 1 unless the site sets it
ERROR_PREFIX = "error: "

# The hand-over script Flower's SuperExec starts instead of a cold ``flwr-clientapp``.
# Standard library only, run with -I -S: it starts in milliseconds and reads nothing
# from the environment. It passes its arguments and standard streams to the runtime,
# forwards SIGTERM/SIGINT to the task's process and exits with the task's exit code.
_HANDOVER_SCRIPT = '''#!{python} -IS
"""Written by fedsynth.client.runtime: hands a Flower ClientApp task to the site's
warm runtime over {socket}. Do not edit; it is rewritten when the runtime starts."""
import json, os, signal, socket, sys

def main():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.chdir({folder!r})  # by name: a socket's full path may not pass 107 bytes
        sock.connect({name!r})
    except OSError as exc:
        sys.stderr.write("fedsynth site runtime not reachable at {socket}: %s; "
                         "start `fedsynth site-runtime` (docs/deployment.md)\\n" % exc)
        return 1
    request = (json.dumps({{"argv": sys.argv[1:]}}) + "\\n").encode()
    try:
        socket.send_fds(sock, [request], [0, 1, 2])
    except OSError:
        pass  # refused before it read the request: its reason is still to be read
    reader = sock.makefile("rb")
    first = reader.readline().decode().strip()
    if not first.isdigit():
        sys.stderr.write("fedsynth site runtime refused the task: %s\\n" % first)
        return 1
    pid = int(first)

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except OSError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = reader.readline().decode().strip()
    return int(code) if code.lstrip("-").isdigit() else 1

sys.exit(main())
'''


class RuntimeRefusal(FedsynthError):
    """A request the runtime refuses, or a setup it cannot run with (message says why)."""


@dataclass(frozen=True)
class RuntimeOptions:
    """Where the site's SuperNode is and how to reach it; where the runtime lives."""

    runtime_api_address: str
    folder: Path  # owner-only: the socket and the hand-over script
    insecure: bool = True
    root_certificates: str | None = None
    # Flower's SuperExec authentication: the SuperNode then hands tasks only to a
    # SuperExec holding the same secret (flower-supernode --superexec-auth-secret-file).
    superexec_secret: str | None = None

    @property
    def socket_path(self) -> Path:
        return self.folder / SOCKET

    def tls_args(self) -> list[str]:
        if self.root_certificates:
            return ["--root-certificates", self.root_certificates]
        return ["--insecure"]


def preload() -> None:
    """Import what every task needs, once, without running any of it.

    No torch operation runs here: a forked child then starts its own thread pools with
    the count its site configured (``torch-threads``), never inheriting a live one.
    """
    # torch imports its compiler stack (torch._dynamo) on an optimizer's first
    # construction: 1.2 s idle, most of a small round's first run in a fresh process.
    import opacus  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401
    from flwr.supernode.cli import flwr_clientapp  # noqa: F401

    from . import app  # noqa: F401  (fedsynth's ClientApp: generators, trainer, DP)


def prepare(opts: RuntimeOptions) -> Path:
    """The runtime's owner-only folder with a fresh hand-over script; returns its bin."""
    if not opts.folder.parent.is_dir():
        raise RuntimeRefusal(f"--runtime-dir {opts.folder}: its parent folder does not "
                             "exist; give a folder in one of the site's own folders")
    opts.folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(opts.folder, 0o700)
    if serving(opts.folder):
        raise RuntimeRefusal(f"--runtime-dir {opts.folder}: another runtime serves it; "
                             "stop that one first, or give each SuperNode its own folder")
    with contextlib.suppress(FileNotFoundError):
        opts.socket_path.unlink()  # a runtime that died left it; nothing is using it
    bin_dir = opts.folder / "bin"
    bin_dir.mkdir(mode=0o700, exist_ok=True)
    script = bin_dir / HANDOVER
    script.write_text(_HANDOVER_SCRIPT.format(
        python=sys.executable, socket=str(opts.socket_path),
        folder=str(opts.folder), name=SOCKET))
    os.chmod(script, 0o700)
    return bin_dir


def serving(folder: Path) -> bool:
    """Whether a runtime answers on the socket in ``folder`` (then it must not be taken)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = os.getcwd()
    try:
        os.chdir(folder)
        probe.connect(SOCKET)
    except OSError:
        return False
    else:
        return True
    finally:
        os.chdir(cwd)
        probe.close()


def listen(path: Path) -> socket.socket:
    """A Unix socket only this user may connect to (0600 from the moment it exists)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old, cwd = os.umask(0o177), os.getcwd()
    try:  # bound by its name inside its folder: a socket's full path may not pass 107 bytes
        os.chdir(path.parent)
        listener.bind(path.name)
    finally:
        os.chdir(cwd)
        os.umask(old)
    listener.listen(16)
    listener.settimeout(0.5)
    return listener


def task_argv(argv: Sequence[str], opts: RuntimeOptions) -> list[str]:
    """The ``flwr-clientapp`` arguments the runtime runs for a hand-over's ``argv``.

    Only the task's token and its parent's pid are taken from the request; where to
    connect and how is the runtime's own setting, so a caller cannot point a task at
    another Runtime API. Anything unexpected is refused, with its name.
    """
    args = list(argv)
    taken: dict[str, str] = {}
    while args:
        flag = args.pop(0)
        if flag == "--insecure":
            continue
        if flag not in ("--token", "--parent-pid", "--runtime-api-address",
                        "--root-certificates") or not args:
            raise RuntimeRefusal(f"unexpected flwr-clientapp argument {flag!r}")
        taken[flag] = args.pop(0)
    address = taken.get("--runtime-api-address")
    if address != opts.runtime_api_address:
        raise RuntimeRefusal(f"task for Runtime API {address!r}; this runtime serves "
                            f"{opts.runtime_api_address!r} only")
    token = taken.get("--token", "").strip()
    if not token:
        raise RuntimeRefusal("task without --token")
    out = ["flwr-clientapp", "--runtime-api-address", opts.runtime_api_address,
           "--token", token, *opts.tls_args()]
    parent = taken.get("--parent-pid")
    if parent is not None:
        if not parent.isdigit():
            raise RuntimeRefusal(f"--parent-pid {parent!r} is not a process id")
        out += ["--parent-pid", parent]
    return out


def peer_uid(conn: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (Linux)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def read_request(conn: socket.socket) -> tuple[list[str], list[int]]:
    """The hand-over's arguments and the standard streams it passed."""
    data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 3)
    while data and not data.endswith(b"\n"):
        more = conn.recv(65536)
        if not more:
            break
        data += more
    try:
        argv = json.loads(data.decode())["argv"]
    except (ValueError, KeyError, TypeError):
        for fd in fds:
            os.close(fd)
        raise RuntimeRefusal("malformed request") from None
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise RuntimeRefusal("malformed request")
    return argv, fds


def run_task(argv: list[str], fds: list[int]) -> int:
    """In the forked task process: Flower's ``flwr-clientapp`` with the caller's streams."""
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = argv
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    try:
        flwr_clientapp()
        return 0
    except SystemExit as done:  # how Flower's entry point ends, success or not
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException:  # noqa: BLE001 - a task's crash must not reach the runtime
        traceback.print_exc()
        return 1


def supervise(conn: socket.socket, argv: list[str], fds: list[int]) -> None:
    """In a forked supervisor: fork the task, tell the hand-over its pid, then its code."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        conn.close()
        code = run_task(argv, fds)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    for fd in fds:
        os.close(fd)
    with contextlib.suppress(OSError):  # the hand-over may be gone; the task runs on
        conn.sendall(f"{pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    with contextlib.suppress(OSError):
        conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    os._exit(0)


def dispatch(conn: socket.socket, listener: socket.socket, opts: RuntimeOptions) -> int | None:
    """Answer one connection: refuse it with a reason, or fork its supervisor."""
    conn.settimeout(10.0)
    fds: list[int] = []
    try:
        if peer_uid(conn) != os.getuid():
            raise RuntimeRefusal("caller runs as another user")
        argv, fds = read_request(conn)
        argv = task_argv(argv, opts)
    except (RuntimeRefusal, OSError) as exc:
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(OSError):
            conn.sendall(f"{ERROR_PREFIX}{exc}\n".encode())
        conn.close()
        print(f"fedsynth site runtime: refused a task: {exc}", file=sys.stderr, flush=True)
        return None
    pid = os.fork()
    if pid == 0:  # never returns: a supervisor must not fall back into the accept loop
        try:
            listener.close()
            conn.settimeout(None)
            supervise(conn, argv, fds)
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)
    conn.close()
    return pid


def superexec_command(opts: RuntimeOptions) -> list[str]:
    """Flower's own SuperExec, pointed at this site's SuperNode; it dies with us."""
    exe = Path(sys.executable).parent / "flower-superexec"
    cmd = [str(exe) if exe.is_file() else "flower-superexec",
           "--runtime-api-address", opts.runtime_api_address, *opts.tls_args(),
           "--parent-pid", str(os.getpid())]
    if opts.superexec_secret:
        cmd += ["--superexec-auth-secret-file", opts.superexec_secret]
    return cmd


def serve(opts: RuntimeOptions) -> int:
    """Run the runtime until SIGTERM/SIGINT, or until its SuperExec ends."""
    if opts.superexec_secret and not Path(opts.superexec_secret).is_file():
        raise RuntimeRefusal(f"--superexec-auth-secret-file {opts.superexec_secret} is not "
                             "a file: give the file the SuperNode was started with")
    bin_dir = prepare(opts)
    preload()
    listener = listen(opts.socket_path)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    env.setdefault(SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S)
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    superexec = subprocess.Popen(superexec_command(opts), env=env, stdin=subprocess.DEVNULL)
    print(f"fedsynth site runtime ready: {opts.socket_path} (SuperExec pid {superexec.pid}, "
          f"{THREADS_ENV}={os.environ.get(THREADS_ENV, '')})", flush=True)
    children: set[int] = set()
    try:
        while not stopping and superexec.poll() is None:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                pass
            else:
                pid = dispatch(conn, listener, opts)
                if pid is not None:
                    children.add(pid)
            for pid in list(children):
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        children.discard(pid)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            opts.socket_path.unlink()
        if superexec.poll() is None:
            superexec.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                superexec.wait(timeout=10)
    return 0 if stopping else (superexec.returncode or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """``fedsynth site-runtime``: a site's warm ClientApp runtime (see the module doc)."""
    parser = argparse.ArgumentParser(
        prog="fedsynth site-runtime",
        description="A site's long-lived ClientApp runtime for `flower-supernode "
        "--isolation process`: imports torch, Opacus and the ClientApp once and runs "
        "each task in a fork of itself (docs/deployment.md).")
    parser.add_argument("--runtime-dir", required=True, type=Path,
                        help="the runtime's own folder (made owner-only, 0700): its socket "
                        "and hand-over script, e.g. beside the site's state-dir")
    parser.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's Runtime API, e.g. 127.0.0.1:9101 "
                        "(flower-supernode --port)")
    tls = parser.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true",
                     help="the Runtime API has no TLS (the SuperNode's default, loopback)")
    tls.add_argument("--root-certificates",
                     help="CA of the Runtime API's certificate (flower-supernode "
                     "--ssl-certfile)")
    parser.add_argument("--superexec-auth-secret-file",
                        help="the secret file the SuperNode was given with the same "
                        "option: only a SuperExec holding it gets the site's tasks")
    args = parser.parse_args(argv)
    if THREADS_ENV not in os.environ:
        # numpy's BLAS sizes its thread pool when it is first imported (already done by
        # now) and every task is a fork of this process: start again with one thread,
        # unless the site chose otherwise (docs/deployment.md, "Threads").
        os.environ[THREADS_ENV] = "1"
        cli = list(sys.argv[1:] if argv is None else argv)
        os.execv(sys.executable, [sys.executable, "-m", "fedsynth.client.runtime", *cli])
    secret = args.superexec_auth_secret_file
    opts = RuntimeOptions(args.runtime_api_address, args.runtime_dir.resolve(),
                          insecure=bool(args.insecure),
                          root_certificates=args.root_certificates,
                          superexec_secret=str(Path(secret).resolve()) if secret else None)
    try:
        return serve(opts)
    except RuntimeRefusal as exc:
        print(f"fedsynth site-runtime: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
