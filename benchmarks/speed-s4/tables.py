"""Tables of the fourth-pass drill session (drill.sh): medians, ratios and the timeline.

    python benchmarks/speed-s4/tables.py SESSION_OUT [CSV_NAME]

Reads SESSION_OUT/{before,after}-{simulated,deployed}-{0,1,2}/milestones.json (timeline.py)
and each run's summary.json; writes CSV_NAME (results.csv) next to this file and prints
the tables as markdown.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent


def _summary(run: Path) -> dict:
    """The run's summary, with its ``seconds_federated``: in summary.json for the runs
    recorded here, beside it (``timings.json`` or ``validation.json``) since it left
    the publishable summary."""
    found = next((run / "study").rglob("summary.json"))
    summary = json.loads(found.read_text())
    for name in ("timings.json", "validation.json"):
        if "seconds_federated" not in summary and (found.parent / name).is_file():
            beside = json.loads((found.parent / name).read_text())
            summary.setdefault("seconds_federated", beside.get("seconds_federated"))
    return summary


def _max(m: dict[str, float], suffix: str, prefix: str = "") -> float:
    return max(v for k, v in m.items() if k.endswith(suffix) and k.startswith(prefix))


def _min(m: dict[str, float], suffix: str) -> float:
    return min(v for k, v in m.items() if k.endswith(suffix))


def deployed_phases(m: dict[str, float]) -> dict[str, float]:
    """Seconds of each part of a deployed drill, from its milestones."""
    p: dict[str, float] = {}
    p["SuperLink started and listening"] = m["superlink listening"]
    p["all SuperNodes online (after start)"] = _max(m, "online", "supernode")
    p["all site runtimes ready (after start)"] = _max(m, "ready", "runtime")
    p["study submitted (after start)"] = m["run submitted"]
    first = _min(m, "msg1 pulled")
    p["first message (grid query) at a site (after start)"] = first
    ends = {}
    for n, name in ((1, "grid query"), (2, "round 1"), (3, "round 2")):
        start, end = _min(m, f"msg{n} pulled"), _max(m, f"msg{n} reply sent")
        ends[n] = end
        p[f"{name}: first pull to last reply sent"] = end - start
        sites = {k.split()[0] for k in m if k.endswith(f"msg{n} pulled")}
        pull = [m[f"{s} msg{n} objects in"] - m[f"{s} msg{n} pulled"] for s in sites]
        task = [m[f"{s} msg{n} reply ready"] - m[f"{s} msg{n} task started"] for s in sites]
        push = [m[f"{s} msg{n} reply sent"] - m[f"{s} msg{n} reply ready"] for s in sites]
        p[f"{name}: SuperNode pulls the message's objects (mean of sites)"] = statistics.mean(pull)
        p[f"{name}: task, fork to reply ready (mean of sites)"] = statistics.mean(task)
        p[f"{name}: reply found and pushed (mean of sites)"] = statistics.mean(push)
        if n > 1:
            p[f"{name}: last reply of the exchange before to first pull"] = start - ends[n - 1]
    p["after the last reply: outputs, flwr run ends, flwr ls, stop"] = m["command exit"] - ends[3]
    p["command"] = m["command exit"]
    return p


def simulated_phases(m: dict[str, float]) -> dict[str, float]:
    return {
        "start, imports, data, grid (to the first line)": m["first output (imports, data)"],
        "round 1 (to its line)": m["round 1 done"] - m["first output (imports, data)"],
        "round 2": m["round 2 done"] - m["round 1 done"],
        "validation and report": m["outputs written"] - m["validation starts"],
        "command": m["command exit"],
    }


def main() -> None:
    out = Path(sys.argv[1])
    csv_name = sys.argv[2] if len(sys.argv) > 2 else "results.csv"
    rows = []
    phases: dict[tuple[str, str], list[dict[str, float]]] = {}
    for run in sorted(out.glob("*-*-[0-9]")):
        tree, kind, i = run.name.split("-")
        marks = json.loads((run / "milestones.json").read_text())
        summary = _summary(run)
        eps = max(s["epsilon"] for s in summary["sites"].values())
        rows.append({"tree": tree, "kind": kind, "i": int(i),
                     "command_s": round(marks["command exit"], 2),
                     "federated_s": round(summary["seconds_federated"], 2),
                     "epsilon_max": round(eps, 4)})
        ph = deployed_phases(marks) if kind == "deployed" else simulated_phases(marks)
        phases.setdefault((tree, kind), []).append(ph)
    with (HERE / csv_name).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    def med(tree: str, kind: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["tree"] == tree and r["kind"] == kind)

    print("| median of 3 | simulated | deployed | deployed / simulated |")
    print("|---|---|---|---|")
    for key, what in (("federated_s", "federated training, 2 rounds"),
                      ("command_s", "the command, end to end")):
        for tree in ("before", "after"):
            s, d = med(tree, "simulated", key), med(tree, "deployed", key)
            print(f"| {tree}: {what} | {s:.2f} s | {d:.2f} s | **{d / s:.1f}x** |")
    print()
    for kind in ("deployed", "simulated"):
        print(f"| {kind}: median of 3, seconds | before | after |")
        print("|---|---|---|")
        keys = list(phases[("after", kind)][0])
        for key in keys:
            cells = [statistics.median(p[key] for p in phases[(t, kind)]) for t in ("before",
                                                                                     "after")]
            print(f"| {key} | {cells[0]:.2f} | {cells[1]:.2f} |")
        print()


if __name__ == "__main__":
    main()
