"""The benchmark's outputs: results.csv, results.md (medians with their range), plots.

Every figure in results.md is a median over the seeds that ran, with the min-max range
beside it when there was more than one seed. The list of settings where a fedsynth
generator is behind a baseline is computed from the same medians, so the note that
closes the issue quotes what the table says.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..common.privacy.randomness import is_not_a_release

#: metric -> (column title, direction: +1 higher is better, -1 lower, 0 closer to 0.5)
SHOWN: dict[str, tuple[str, int]] = {
    "fidelity": ("fidelity", 1),
    "correlation_similarity": ("corr. sim.", 1),
    "contingency_similarity": ("conting. sim.", 1),
    "tstr_auroc": ("TSTR AUROC", 1),
    "cox_c_index": ("C-index", 1),
    "detection_auroc": ("detection AUROC", -1),
    "membership_inference_auroc": ("MIA AUROC", 0),
    "anonymeter_singling_out_risk": ("anon. singling out", -1),
    "anonymeter_linkability_risk": ("anon. linkability", -1),
    "anonymeter_inference_risk": ("anon. inference", -1),
}
COST: dict[str, str] = {
    "epsilon_max_site": "eps / site (max)",
    # distributed noise (masked sums): the worst case, every other site colluding
    "epsilon_alone_max_site": "eps / site if all others collude",
    "wall_s": "wall s",
    "peak_rss_mb": "peak RSS MB",
    "bytes_per_round": "bytes / round",
}
#: the pairwise and utility figures a generator must beat independent marginals on
JOINT = ("correlation_similarity", "contingency_similarity", "tstr_auroc", "cox_c_index")


def summarise(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Median, min and max of every numeric figure per setting (over seeds)."""
    frame = pd.DataFrame(rows)
    keys = ["setting", "kind", "generator", "dp", "epsilon_target", "secure", "site", "engine"]
    keys += ["privacy"] if "privacy" in frame else []  # results.csv before the column: none
    numeric = [c for c in (*SHOWN, *COST, "validation_s", "trtr_auroc") if c in frame]
    for c in numeric:
        frame[c] = pd.to_numeric(frame[c], errors="coerce")
    order = {k: i for i, k in enumerate(dict.fromkeys(frame["setting"]))}
    grouped = frame.groupby("setting", sort=False)
    out = grouped[keys[1:]].first()
    for c in numeric:
        out[c] = grouped[c].median()
        out[c + "_min"] = grouped[c].min()
        out[c + "_max"] = grouped[c].max()
    out["seeds"] = grouped["seed"].nunique()
    out = out.reset_index()
    return out.sort_values("setting", key=lambda s: s.map(order)).reset_index(drop=True)


def _cell(summary: pd.Series, key: str, digits: int = 3) -> str:
    value = summary.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if key == "bytes_per_round":
        text = f"{value / 2**20:.2f} MiB" if value >= 2**20 else f"{value / 1024:.0f} KiB"
        return text
    fmt = f"{{:.{digits}f}}" if key not in ("wall_s", "peak_rss_mb") else "{:.0f}"
    text = fmt.format(value)
    lo, hi = summary.get(key + "_min"), summary.get(key + "_max")
    if summary.get("seeds", 1) > 1 and lo is not None and hi is not None and hi > lo:
        text += f" [{fmt.format(lo)}-{fmt.format(hi)}]"
    return text


#: how much worse than a baseline's median counts as behind (MIA AUROC moves by a few
#: hundredths between seeds on a 185-row holdout; the other figures by less)
TOLERANCE = {"membership_inference_auroc": 0.03}


def _worse(a: float, b: float, key: str) -> bool:
    """Whether ``a`` is worse than ``b`` by more than the metric's tolerance."""
    tol = TOLERANCE.get(key, 0.01)
    direction = SHOWN[key][1]
    if direction > 0:
        return a < b - tol
    if direction < 0:
        return a > b + tol
    return abs(a - 0.5) > abs(b - 0.5) + tol


def behind_baselines(summary: pd.DataFrame) -> list[str]:
    """A table: for each baseline and figure, which fedsynth settings are behind it.

    Independent marginals are compared on the pairwise and utility figures only (what
    it is the bar for); the SDV baselines on every figure. The cell names the settings
    behind, or those not behind when that list is shorter.
    """
    base = summary[summary["kind"] == "baseline"]
    ours = summary[summary["kind"] != "baseline"]
    lines = [
        "| baseline | figure | baseline median | best fedsynth setting | behind |",
        "|---|---|---|---|---|",
    ]
    for _, b in base.iterrows():
        metrics = JOINT if b["generator"] == "independent" else tuple(SHOWN)
        for key in metrics:
            if key not in summary or not np.isfinite(b.get(key, np.nan)):
                continue
            scored = ours[np.isfinite(ours[key].astype(float))]
            if scored.empty:
                continue
            worse = [r["setting"] for _, r in scored.iterrows() if _worse(r[key], b[key], key)]
            if not worse:
                continue
            rank = (scored[key] if SHOWN[key][1] > 0 else -scored[key] if SHOWN[key][1] < 0
                    else -(scored[key] - 0.5).abs())
            best = scored.loc[rank.idxmax()]
            others = [s for s in scored["setting"] if s not in worse]
            if len(worse) == len(scored):
                cell = f"all {len(scored)}"
            elif len(others) < len(worse):
                cell = (f"{len(worse)} of {len(scored)}: all but "
                        + ", ".join(f"`{s}`" for s in others))
            else:
                cell = f"{len(worse)} of {len(scored)}: " + ", ".join(f"`{s}`" for s in worse)
            lines.append(
                f"| `{b['setting']}` | {SHOWN[key][0]} | {b[key]:.3f} | "
                f"`{best['setting']}` {best[key]:.3f} | {cell} |"
            )
    return lines if len(lines) > 2 else []


def release(label: Any) -> str:
    """A row's privacy label, short: what it is not ("reproducible noise: not a DP
    release", "no DP: not a DP release") without the list of sites, or "DP release"; "-"
    for a row of a results.csv written before the column."""
    if not isinstance(label, str) or not label:
        return "-"
    return label.split(" (")[0] if is_not_a_release(label) else "DP release"


def quality_title(summary: pd.DataFrame) -> str:
    """The quality-vs-epsilon plot's title, with the label of any federated DP row that
    is no DP release: a plotted epsilon from replayable noise is no guarantee."""
    title = "federated DP vs epsilon (thin lines: central no-DP; grey: baselines)"
    fed = summary[(summary["kind"] == "federated") & summary["dp"].astype(bool)]
    labels = [release(x) for x in fed.get("privacy", pd.Series([], dtype=object))]
    flagged = sorted({x for x in labels if is_not_a_release(x)})
    return title + "".join(f"\n{x}" for x in flagged)


def markdown(summary: pd.DataFrame, info: dict[str, Any]) -> str:
    shown = [k for k in SHOWN if k in summary and summary[k].notna().any()]
    cost = [k for k in COST if k in summary and summary[k].notna().any()]
    header = ["setting", "privacy", *[SHOWN[k][0] for k in shown], *[COST[k] for k in cost]]
    lines = [
        "# fedsynth benchmark",
        "",
        f"Command: `{info.get('command') or 'fedsynth benchmark'}`",
        "",
        f"Commit: `{info.get('commit')}`; wall time {info['seconds_total']:.0f} s "
        f"({info['seconds_total'] / 60:.1f} min) on {info['machine_start']['cpus']} CPUs "
        f"({info['machine_start']['processor']}), torch {info['machine_start']['torch']} "
        f"with {info['machine_start']['torch_threads']} thread(s); load average "
        f"{info['machine_start']['load_average']} at the start, "
        f"{info['machine_end']['load_average']} at the end (the machine was shared: "
        "timings are pessimistic).",
        "",
        _describe(info),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for _, row in summary.iterrows():
        cells = [f"`{row['setting']}`", release(row.get("privacy")),
                 *[_cell(row, k) for k in shown],
                 *[_cell(row, k, 2) for k in cost]]
        lines.append("| " + " | ".join(cells) + " |")
    trtr = summary["trtr_auroc"].dropna() if "trtr_auroc" in summary else pd.Series([])
    lines += [""]
    if len(trtr):
        lines.append(
            f"Reference: a classifier trained on the real training rows reaches AUROC "
            f"{float(trtr.median()):.3f} on the holdout (TRTR); detection AUROC 0.5 and "
            "MIA AUROC 0.5 are the ideal."
        )
    lines += [
        "", "## Where fedsynth is behind a baseline", "",
        "Medians compared; behind means worse by more than 0.01 (0.03 for MIA AUROC, "
        "which is judged by its distance from 0.5).", "",
    ]
    behind = behind_baselines(summary)
    lines += behind or ["- nowhere: every setting matches or beats every baseline's median"]
    checks = info.get("ray_check") or []
    if checks:
        lines += ["", "## In-process runs against the real `fedsynth simulate` (Ray)", ""]
        for c in checks:
            same = c["epsilon_sites_ray"] == c["epsilon_sites_inprocess"]
            lines.append(
                f"- `{c['setting']}`, seed {c['seed']}: the final generator weights of the "
                f"Ray study and the in-process study differ by at most "
                f"{c['max_abs_weight_difference']:.2e} (relative "
                f"{c['max_relative_weight_difference']:.2e}); epsilon per site "
                f"{'identical' if same else 'DIFFERENT'} ({json.dumps(c['epsilon_sites_ray'])}); "
                f"the Ray study took {c['ray_seconds_total']:.0f} s end to end."
            )
    lines += ["", "Columns: see docs/benchmark.md. Plots: " + ", ".join(
        f"`{p}`" for p in info.get("plots", [])) + "."]
    return "\n".join(lines) + "\n"


def _describe(info: dict[str, Any]) -> str:
    o = info["options"]
    sites = ", ".join(f"{k} {v}" for k, v in info["sites"].items())
    split = (f"Dirichlet split (alpha {o['dirichlet_alpha']})" if o["dirichlet_alpha"]
             else "the dataset's own sites")
    areas = "all areas" if not o["areas"] else ", ".join(o["areas"])
    seeds = o["seeds"]
    anon = "on" if o["anonymeter_python"] else "off"
    over = f"Median over {seeds} seeds, [min-max] in brackets" if seeds > 1 else "One seed"
    epochs = ("package default epochs" if o["baseline_epochs"] is None
              else f"{o['baseline_epochs']} epochs")
    if o.get("baseline_batch") == "rows":
        epochs += ("; the ctgan package's CTGAN with batches of at most the training rows "
                   "(--quick), not its default 500")
    alone = (f"at most {o['alone_sites']} sites alone, spread over the sizes (the "
             "smallest and the largest first). " if o.get("alone_sites")
             else "every site alone. ")
    return (
        f"Dataset {o['dataset']}, {split}: training rows per site {sites}; "
        f"{info['holdout_rows']} held-out rows score every setting. "
        f"{over}"
        f" (seeds {o['seed']}..{o['seed'] + seeds - 1}). Federated: {o['rounds']} rounds x "
        f"{o['local_epochs']} local epochs at sample rate {o['sample_rate']}; central and "
        f"site-alone runs: the same number of epochs ({o['rounds'] * o['local_epochs']}); "
        f"{alone}"
        f"DP delta {o['delta']}; central DP and site-alone epsilon {o['central_epsilon']}. "
        f"Baselines: {', '.join(o['baselines'])}"
        f" ({epochs}). "
        f"Validation areas: {areas}; anonymeter {anon}. "
        f"SDV: {info.get('sdv')}. Federated and site-alone settings ran in process "
        "(real ServerApp and ClientApp code, no Ray); peak memory is the process's peak "
        "RSS during training and sampling. "
        + ("DP noise: reproducible from the seed (--reproducible-noise): "
           "reproducible noise: not a DP release; the run repeats byte for byte."
           if o.get("reproducible_noise") else
           "DP noise: secret (the OS CSPRNG, as a real site draws it): two runs of the "
           "same seeds differ by the DP noise and the draws of training.")
    )


def plots(summary: pd.DataFrame, out: Path) -> list[str]:
    """Quality against epsilon per generator, and wall time per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    utility = "tstr_auroc" if summary["tstr_auroc"].notna().any() else "cox_c_index"
    fed = summary[(summary["kind"] == "federated") & summary["dp"].astype(bool)]
    base = summary[summary["kind"] == "baseline"]
    metrics = [m for m in ("fidelity", "correlation_similarity", utility, "detection_auroc")
               if m in summary and summary[m].notna().any()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    axes = np.atleast_1d(axes)
    colours = dict(zip(summary["generator"].unique(), plt.cm.tab10.colors, strict=False))
    for ax, metric in zip(axes, metrics, strict=True):
        for (gen, secure), part in fed.groupby(["generator", "secure"]):
            part = part.sort_values("epsilon_target")
            ax.plot(part["epsilon_target"], part[metric], marker="o" if not secure else "x",
                    linestyle="-" if not secure else ":", color=colours[gen],
                    label=f"{gen} federated{' ckks' if secure else ''}")
        for _, r in summary[(summary["kind"] == "central") & ~summary["dp"].astype(bool)
                            ].iterrows():
            ax.axhline(r[metric], color=colours[r["generator"]], linewidth=0.8, alpha=0.6)
        for i, (_, r) in enumerate(base.iterrows()):
            ax.axhline(r[metric], color="grey", linestyle=["--", "-.", ":", (0, (1, 3))][i % 4],
                       linewidth=1.0, label=f"{r['generator']}")
        ax.set_xscale("log")
        ax.set_xlabel("epsilon per site")
        ax.set_title(SHOWN[metric][0])
    axes[0].legend(fontsize=6, loc="best")
    fig.suptitle(quality_title(summary), fontsize=9)
    fig.tight_layout()
    path = out / "quality_vs_epsilon.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path.name)

    fig, ax = plt.subplots(figsize=(7, 0.22 * len(summary) + 1.2))
    ax.barh(summary["setting"], summary["wall_s"],
            color=[colours.get(g, "grey") for g in summary["generator"]])
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=6)
    ax.set_xlabel("wall seconds (training + sampling)")
    fig.tight_layout()
    path = out / "wall_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path.name)
    return written


def rerender(out: Path) -> list[Path]:
    """Rewrite results.md and the plots from results.csv and run.json in ``out``."""
    with (out / "results.csv").open() as fh:
        rows: list[dict[str, Any]] = list(csv.DictReader(fh))
    for row in rows:
        for key in ("dp", "secure"):
            row[key] = str(row[key]) == "True"
        row["epsilon_target"] = float(row["epsilon_target"]) if row["epsilon_target"] else None
    info = json.loads((out / "run.json").read_text())
    return write_outputs(rows, info, out)


def write_outputs(rows: list[dict[str, Any]], info: dict[str, Any], out: Path) -> list[Path]:
    """results.csv (every seed), results.md (medians), the plots."""
    csv_path = out / "results.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows)
    info["plots"] = plots(summary, out)
    md = out / "results.md"
    md.write_text(markdown(summary, info))
    return [csv_path, md, *(out / p for p in info["plots"])]


if __name__ == "__main__":
    import sys

    for folder in sys.argv[1:]:
        print("\n".join(str(p) for p in rerender(Path(folder))))
