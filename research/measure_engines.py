"""The default study on each engine, alternated in one session: wall time and memory.

    python research/measure_engines.py --pairs 3 --out /tmp/engines

Runs ``fedsynth simulate`` (the default heart-disease study) as a child process, once
per engine per pair, alternating which engine goes first, and samples every 0.2 s the
resident memory of the whole process tree (Ray's GCS, raylet and workers included).
Prints one line per run and the medians; why: the in-process engine is the default
because of these figures, which should be re-measured when either engine changes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_rss_mb(root: int) -> tuple[float, int]:
    """Resident memory (MB) and process count of ``root`` and all its descendants."""
    tree, todo, total, count = _children(), [root], 0.0, 0
    while todo:
        pid = todo.pop()
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += float(line.split()[1]) / 1024
                    count += 1
        except OSError:
            pass
        todo += tree.get(pid, [])
    return total, count


def run(engine: str, out: Path) -> tuple[float, float, int, int]:
    cmd = [str(Path(sys.executable).with_name("fedsynth")), "simulate", "--engine", engine,
           "--out", str(out), "--force"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    peak, procs = 0.0, 0
    while proc.poll() is None:
        mb, n = tree_rss_mb(proc.pid)
        peak, procs = max(peak, mb), max(procs, n)
        time.sleep(0.2)
    return time.perf_counter() - start, peak, procs, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", default="engine-measure")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"inprocess": [], "ray": []}
    peaks: dict[str, list[float]] = {"inprocess": [], "ray": []}
    for i in range(args.pairs):
        order = ("inprocess", "ray") if i % 2 == 0 else ("ray", "inprocess")
        for engine in order:
            seconds, peak, procs, code = run(engine, Path(args.out) / engine)
            times[engine].append(seconds)
            peaks[engine].append(peak)
            print(f"pair {i + 1} {engine:9s} {seconds:6.1f} s  peak {peak:6.0f} MB over "
                  f"{procs} processes  exit {code}", flush=True)
    med = {e: statistics.median(v) for e, v in times.items()}
    for e in times:
        print(f"median {e:9s} {med[e]:6.1f} s  peak {statistics.median(peaks[e]):6.0f} MB")
    print(f"ray / inprocess wall time: {med['ray'] / med['inprocess']:.2f}")


if __name__ == "__main__":
    main()
