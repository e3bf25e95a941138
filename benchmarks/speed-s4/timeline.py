"""Where the deployment drill's wall time goes: a timeline from the processes' own logs.

Runs one drill command (deployed: ``python -m fedsynth.simulations.deploy``; simulated:
``fedsynth simulate``) with the drill's arguments, and while it runs reads every ``*.log``
file under its ``--out`` folder (the SuperLink's, each SuperNode's and site runtime's,
``flwr run``'s) and its own standard output every 20 ms, stamping each new line with the
seconds since the command started. Flower's own log lines carry whole seconds only; the
stamps here are within 20 ms. Then it prints the milestones (process starts and
readiness, each exchange at each site, the end) and writes every stamped line to
``OUT/timeline.jsonl`` and the milestones to ``OUT/milestones.json``.

    OMP_NUM_THREADS=1 python benchmarks/speed-s4/timeline.py deployed OUT [--python PY]
    OMP_NUM_THREADS=1 python benchmarks/speed-s4/timeline.py simulated OUT [--python PY]

``--python`` is the interpreter of the tree to measure (its ``fedsynth`` is used); with
``--pythonpath`` a frozen copy's package folder (``drill.sh`` of ``speed-s3``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

DRILL = ["--sites", "cleveland,hungarian,va", "--rounds", "2",
         "--generator-params", '{"hidden":16,"latent":4}']
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# (milestone, source file pattern, line pattern): the first line that matches.
DEPLOYED = [
    ("superlink started", r"superlink\.log", r"^\$ "),
    ("superlink listening", r"superlink\.log", r"Application startup complete"),
    ("runtime {site} started", r"sites/(?P<site>\w+)/runtime\.log", r"^\$ "),
    ("runtime {site} ready", r"sites/(?P<site>\w+)/runtime\.log", r"site runtime ready"),
    ("supernode {site} started", r"sites/(?P<site>\w+)/supernode\.log", r"^\$ "),
    ("supernode {site} online", r"sites/(?P<site>\w+)/supernode\.log", r"SuperNode ID"),
    ("deployment up", r"stdout", r"^Deployment up"),
    ("flwr run started", r"flwr-run\.log", r"Using SuperLink"),
    ("run submitted", r"flwr-run\.log", r"Successfully started run"),
    ("serverapp process", r"flwr-run\.log", r"Start `flwr-serverapp` process"),
    ("strategy starts (grid done)", r"flwr-run\.log", r"Starting \w+ strategy"),
    ("round 1 sent", r"flwr-run\.log", r"\[ROUND 1/"),
    ("round 1 aggregated", r"flwr-run\.log", r"aggregate_train: Received"),
    ("round 2 sent", r"flwr-run\.log", r"\[ROUND 2/"),
    ("serverapp finished", r"flwr-run\.log", r"ServerApp finished running"),
    ("flwr run log ends", r"flwr-run\.log", r"$^"),
]
SIMULATED = [
    ("first output (imports, data)", r"stdout", r"fedsynth study on"),
    ("round 1 done", r"stdout", r"^round 1:"),
    ("round 2 done", r"stdout", r"^round 2:"),
    ("validation starts", r"stdout", r"^validating"),
    ("outputs written", r"stdout", r"^wrote "),
]


class Tail:
    """New lines of every ``*.log`` under a folder, stamped at the poll that saw them."""

    def __init__(self, root: Path, t0: float) -> None:
        self.root, self.t0 = root, t0
        self.offsets: dict[Path, int] = {}
        self.partial: dict[Path, str] = {}
        self.lines: list[tuple[float, str, str]] = []

    def poll(self) -> None:
        now = time.monotonic() - self.t0
        for path in sorted(self.root.rglob("*.log")) if self.root.exists() else []:
            start = self.offsets.get(path, 0)
            try:
                with path.open("rb") as fh:
                    fh.seek(start)
                    data = fh.read()
            except OSError:
                continue
            if not data:
                continue
            self.offsets[path] = start + len(data)
            text = self.partial.pop(path, "") + data.decode(errors="replace")
            *done, rest = text.split("\n")
            if rest:
                self.partial[path] = rest
            rel = str(path.relative_to(self.root))
            self.lines += [(now, rel, ANSI.sub("", line)) for line in done]


def run(kind: str, out: Path, python: str, pythonpath: str | None) -> list[tuple[float, str, str]]:
    work = out / "study"
    shutil.rmtree(work, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    if kind == "deployed":
        cmd = [python, "-m", "fedsynth.simulations.deploy", *DRILL, "--out", str(work)]
    else:
        cmd = [python, "-c", "import sys; from fedsynth.cli import main; sys.exit(main())",
               "simulate", *DRILL, "--force", "--out", str(work)]
    t0 = time.monotonic()
    tail = Tail(work, t0)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            cwd=out, text=True, bufsize=1)
    stdout: list[tuple[float, str, str]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            stdout.append((time.monotonic() - t0, "stdout", ANSI.sub("", line.rstrip("\n"))))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        tail.poll()
        time.sleep(0.02)
    end = time.monotonic() - t0
    reader.join(timeout=5)
    tail.poll()
    lines = sorted(tail.lines + stdout, key=lambda x: x[0])
    lines.append((end, "stdout", f"<command exit {proc.returncode}>"))
    return lines


def milestones(lines: list[tuple[float, str, str]], kind: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for name, src, pat in DEPLOYED if kind == "deployed" else SIMULATED:
        for t, source, line in lines:
            m = re.search(src, source)
            if m and (re.search(pat, line) if pat != "$^" else True):
                key = name.format(**m.groupdict())
                if key not in found or pat == "$^":
                    found[key] = t  # "$^": the last line of that source
                if pat != "$^" and "{" not in name:
                    break
    found["command exit"] = lines[-1][0]
    if kind == "deployed":
        found.update(exchanges(lines))
    return dict(sorted(found.items(), key=lambda kv: kv[1]))


def exchanges(lines: list[tuple[float, str, str]]) -> dict[str, float]:
    """Each site's messages: when its SuperNode received one, its task started (the
    runtime's fork), and its SuperNode sent the reply."""
    out: dict[str, float] = {}
    count: dict[tuple[str, str], int] = {}
    for t, source, line in lines:
        m = re.search(r"sites/(\w+)/(supernode|runtime)\.log", source)
        if not m:
            continue
        site, what = m.groups()
        if what == "supernode":
            r = re.search(r"(Receiving|Received successfully|Sending|Sent successfully)", line)
        else:
            r = re.search(r"(Start `flwr-clientapp` process)", line)
            if r and "INFO:" in line:  # the same event logged twice (console + file)
                continue
        if not r:
            continue
        event = {"Receiving": "pulled", "Received successfully": "objects in",
                 "Sending": "reply ready", "Sent successfully": "reply sent"}.get(
                     r.group(1), "task started")
        n = count[(site, event)] = count.get((site, event), 0) + 1
        out[f"{site} msg{n} {event}"] = t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("deployed", "simulated"))
    ap.add_argument("out", type=Path)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--pythonpath")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = run(args.kind, args.out.resolve(), args.python, args.pythonpath)
    with (args.out / "timeline.jsonl").open("w") as fh:
        for t, source, line in lines:
            fh.write(json.dumps({"t": round(t, 3), "source": source, "line": line}) + "\n")
    marks = milestones(lines, args.kind)
    (args.out / "milestones.json").write_text(json.dumps(marks, indent=1))
    for name, t in marks.items():
        print(f"{t:7.2f}  {name}")


if __name__ == "__main__":
    main()
