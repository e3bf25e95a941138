"""A site's warm ClientApp runtime and the coordinator's prompt reply loop.

What a deployed round saves must not cost a guarantee: the runtime takes a task only
from the site's own user, runs it only against the site's own SuperNode, hands the
task its caller's streams and exit code, and each task's DP draws are its own (a fork
must not replay a secret). The coordinator's loop returns what Flower's
``send_and_receive`` returns, sooner, with the same timeout. The whole path (SuperNode
with ``--isolation process``, runtime, Flower's SuperExec and ClientApp) runs in
``tests/test_deployment.py``.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedsynth.client import runtime
from fedsynth.client.runtime import RuntimeOptions, RuntimeRefusal, task_argv
from fedsynth.server.prompt_grid import ask
from tests.flower_support import task_identity

ADDRESS = "127.0.0.1:9101"


def _opts(tmp_path: Path) -> RuntimeOptions:
    return RuntimeOptions(ADDRESS, tmp_path / "runtime")


# --------------------------------------------------------------------------- requests


def test_a_task_runs_against_the_sites_own_supernode_only(tmp_path: Path) -> None:
    opts = _opts(tmp_path)
    flower = ["--runtime-api-address", ADDRESS, "--token", "t0k", "--insecure",
              "--parent-pid", "123"]
    assert task_argv(flower, opts) == ["flwr-clientapp", "--runtime-api-address", ADDRESS,
                                       "--token", "t0k", "--insecure", "--parent-pid", "123"]
    # TLS is the runtime's setting, never the caller's
    tls = RuntimeOptions(ADDRESS, opts.folder, insecure=False, root_certificates="/ca.crt")
    assert task_argv(flower, tls)[-4:] == ["--root-certificates", "/ca.crt",
                                           "--parent-pid", "123"]
    refused = {
        "another SuperNode": ["--runtime-api-address", "10.0.0.9:9101", "--token", "t"],
        "no token": ["--runtime-api-address", ADDRESS],
        "dependency installation": ["--runtime-api-address", ADDRESS, "--token", "t",
                                    "--allow-runtime-dependency-installation"],
        "a token from a file": ["--runtime-api-address", ADDRESS, "--token-file", "/x"],
        "a bad pid": ["--runtime-api-address", ADDRESS, "--token", "t", "--parent-pid", "1;"],
    }
    for what, argv in refused.items():
        with pytest.raises(RuntimeRefusal):
            task_argv(argv, opts)
            pytest.fail(what)


_SERVER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from fedsynth.client import runtime
    opts = runtime.RuntimeOptions({address!r}, Path({folder!r}))
    def fake_task(argv, fds):  # stands for Flower's flwr-clientapp in the fork
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        print("task:", " ".join(argv), flush=True)
        print("stderr of the task", file=sys.stderr, flush=True)
        return 7
    runtime.run_task = fake_task
    if os.environ.get("OTHER_USER"):
        runtime.peer_uid = lambda conn: os.getuid() + 1
    runtime.prepare(opts)
    listener = runtime.listen(opts.socket_path)
    print("ready", flush=True)
    listener.settimeout(30)
    for _ in range(int(sys.argv[1])):
        conn, _ = listener.accept()
        pid = runtime.dispatch(conn, listener, opts)
        if pid:
            os.waitpid(pid, 0)
""")


def _serve(tmp_path: Path, tasks: int, **env: str) -> tuple[subprocess.Popen[str], Path]:
    opts = _opts(tmp_path)
    script = _SERVER.format(address=ADDRESS, folder=str(opts.folder))
    server = subprocess.Popen([sys.executable, "-c", script, str(tasks)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **env})
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "ready", server.stderr.read()  # type: ignore[union-attr]
    return server, opts.folder / "bin" / runtime.HANDOVER


def test_handover_passes_streams_and_exit_code_through_an_owner_only_socket(
    tmp_path: Path,
) -> None:
    server, handover = _serve(tmp_path, 3)
    try:
        folder = handover.parent.parent
        sock = folder / runtime.SOCKET
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(handover.stat().st_mode) == 0o700
        done = subprocess.run([str(handover), "--runtime-api-address", ADDRESS,
                               "--token", "abc", "--insecure", "--parent-pid", "42"],
                              capture_output=True, text=True, timeout=60)
        # the task wrote to the hand-over's own stdout/stderr and its code came back
        assert done.returncode == 7, done.stderr
        assert (f"task: flwr-clientapp --runtime-api-address {ADDRESS} --token abc "
                "--insecure --parent-pid 42") in done.stdout
        assert "stderr of the task" in done.stderr
        # a task for another Runtime API is refused, with the reason, and nothing runs
        done = subprocess.run([str(handover), "--runtime-api-address", "127.0.0.1:1",
                               "--token", "abc"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and "task:" not in done.stdout
        assert f"serves {ADDRESS!r} only" in done.stderr
        # a second runtime may not take over a folder that is being served
        with pytest.raises(RuntimeRefusal, match="another runtime serves it"):
            runtime.prepare(_opts(tmp_path))
        assert sock.exists()
    finally:
        server.wait(timeout=60)


def test_a_caller_of_another_user_is_refused(tmp_path: Path) -> None:
    server, handover = _serve(tmp_path, 1, OTHER_USER="1")
    try:
        done = subprocess.run([str(handover), "--runtime-api-address", ADDRESS,
                               "--token", "abc"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and "task:" not in done.stdout
        assert "another user" in done.stderr
    finally:
        server.wait(timeout=60)


def test_a_runtime_dir_without_parent_is_one_clear_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # re-executes
    done = subprocess.run(
        [sys.executable, "-m", "fedsynth.client.runtime", "--runtime-dir",
         str(tmp_path / "nope" / "runtime"), "--runtime-api-address", ADDRESS, "--insecure"],
        capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert "--runtime-dir" in done.stderr and "does not exist" in done.stderr
    assert not (tmp_path / "nope").exists()


def test_forked_tasks_draw_their_own_secret_noise() -> None:
    """Two tasks forked from one warm runtime must not share a DP draw."""
    script = textwrap.dedent("""
        import os
        from fedsynth.client import runtime
        from fedsynth.common.privacy.randomness import DPRandomness
        runtime.preload()
        draws = []
        for _ in range(2):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                g = DPRandomness.secret().torch("gradient-noise")
                import torch
                os.write(w, repr(torch.randn(4, generator=g).tolist()).encode())
                os._exit(0)
            os.close(w)
            os.waitpid(pid, 0)
            draws.append(os.read(r, 4096).decode())
        print(draws[0] != draws[1], len(set(draws)))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.stdout.split() == ["True", "2"], done.stderr


# --------------------------------------------------------------------------- prompt grid


class SlowGrid(Grid):
    """Replies become available ``delay`` s after they are pushed (one never answers)."""

    def __init__(self, delay: float, silent: int | None = None) -> None:
        self.delay, self.silent = delay, silent
        self.sent: dict[str, float] = {}
        self.pulls = 0

    def set_run(self, run: object) -> None:
        raise NotImplementedError

    @property
    def run(self) -> object:
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return [1, 2, 3]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for i, msg in enumerate(messages):
            mid = f"m{i}"
            if msg.metadata.dst_node_id != self.silent:
                self.sent[mid] = time.monotonic()
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        now, out = time.monotonic(), []
        for mid in list(message_ids):
            if mid in self.sent and now - self.sent[mid] >= self.delay:
                reply = Message(RecordDict(), dst_node_id=0, message_type="train")
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                out.append(reply)
                del self.sent[mid]
        return out

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        raise NotImplementedError


def _messages(n: int = 3) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=i + 1, message_type="train") for i in range(n)]


@pytest.fixture()
def _flower_task() -> Iterable[None]:
    with task_identity():  # Flower's Message needs a task's identity to be built
        yield


@pytest.mark.usefixtures("_flower_task")
def test_replies_are_collected_promptly_with_flowers_timeout_semantics() -> None:
    grid = SlowGrid(delay=0.3)
    start = time.monotonic()
    replies = ask(grid, _messages(), timeout=None)
    waited = time.monotonic() - start
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert 0.3 <= waited < 0.9  # Flower's deployed grid would answer after 3 s
    # a site that never answers: the timeout ends the wait with the replies that came
    grid = SlowGrid(delay=0.1, silent=2)
    start = time.monotonic()
    replies = ask(grid, _messages(), timeout=1.5)
    waited = time.monotonic() - start
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m2"]
    assert 1.5 <= waited < 2.0
    assert grid.pulls <= 12  # backs off: 1.5 s of waiting, not a busy loop
