"""The tables of results.md from the JSON rows of ``benchmark_speed.py modes``:
each cell the median over the before/after pairs, with the range.

    python benchmarks/speed-s3/tables.py   (prints Markdown, writes results.csv)
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent


def load(name: str) -> list[dict]:
    return json.loads((HERE / name).read_text())


def key(row: dict) -> tuple:
    return row["dataset"], row["generator"], row["q"]


def main() -> None:
    runs = sorted(p.stem.split("-")[-1] for p in HERE.glob("modes-before-*.json"))
    before = {r: {key(x): x for x in load(f"modes-before-{r}.json")} for r in runs}
    after = {r: {key(x): x for x in load(f"modes-after-{r}.json")} for r in runs}
    out = []
    for k, first in after[runs[0]].items():
        row = {"dataset": k[0], "generator": k[1], "q": k[2],
               "samples_x_params": first["samples_x_params"],
               "before_picked": before[runs[0]][k]["picked"], "after_picked": first["picked"]}
        for r in runs:
            b, a = before[r][k], after[r][k]
            row[f"before_wall_{r}"] = b["picked_over_plain"]
            row[f"before_cpu_{r}"] = b["picked_cpu_over_plain"]
            row[f"after_wall_{r}"] = a["picked_over_plain"]
            row[f"after_cpu_{r}"] = a["picked_cpu_over_plain"]
            for m in ("hooks", "ghost"):
                row[f"after_{m}_wall_{r}"] = a[f"{m}_over_plain"]
            row[f"noise_{r}"] = a["noise_over_plain"]
            row[f"plain_ms_{r}"] = 1000 * a["plain_s"]
        out.append(row)
    with (HERE / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(out[0]))
        writer.writeheader()
        writer.writerows(out)

    def cell(row: dict, field: str, bold: bool = False) -> str:
        """Median over the runs (range); bold when the median is at most 2x."""
        vals = sorted(row[f"{field}_{r}"] for r in runs)
        mid = statistics.median(vals)
        text = f"{mid:.2f} ({vals[0]:.2f}-{vals[-1]:.2f})"
        return f"**{text}**" if bold and mid <= 2.0 else text

    print("| dataset | generator | q | samples x params | before: mode "
          "| before: DP / no-DP, wall | before: CPU | after: mode | after: DP / no-DP, wall "
          "| after: CPU | after: hooks, wall | after: ghost, wall | noise alone / no-DP (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in out:
        dataset = row["dataset"].replace("_disease", "").replace("3_demo", "")
        print(f"| {dataset} | {row['generator']} "
              f"| {row['q']:g} | {row['samples_x_params'] / 1e6:.2f}M | {row['before_picked']} "
              f"| {cell(row, 'before_wall', True)} | {cell(row, 'before_cpu', True)} "
              f"| {row['after_picked']} "
              f"| {cell(row, 'after_wall', True)} | {cell(row, 'after_cpu', True)} "
              f"| {cell(row, 'after_hooks_wall')} | {cell(row, 'after_ghost_wall')} "
              f"| {cell(row, 'noise')} |")


if __name__ == "__main__":
    main()
