"""One self-contained HTML report of a validation run, for people who will not read JSON.

A clinician or a data protection officer should see in one screen whether the synthetic
data is faithful, useful and private, with the thresholds spelled out, and then be able
to *look*: marginals real vs synthetic, correlation matrices side by side, distances to
the closest record. Everything is in one file (plots are PNGs embedded as base64), so
the report can be mailed or archived without its folder.

Plots use matplotlib's object-oriented API (``Figure``), never pyplot, so writing a
report neither opens windows nor leaks global figure state in a long-running server.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..privacy.randomness import is_not_a_release
from ..schema import Schema
from .codesets import ALPHA
from .data import MISSING, Table
from .fidelity import cramers_v, joint_counts, numeric_bins
from .metric import AREAS, MetricValue, ValidationResult
from .spread import spread_plot

if TYPE_CHECKING:
    from .federated import FederatedValidation

REAL_COLOUR = "#1f5f99"
SYN_COLOUR = "#e07b00"
STATUS = {True: ("pass", "#2e7d32"), False: ("fail", "#c62828"), None: ("not judged", "#8a8a8a")}

# Metrics whose name is also an area's: shown under another name so that "fidelity
# fails" is never ambiguous (the area, or its mean per-column metric?).
METRIC_DISPLAY = {"fidelity": "marginal_similarity"}

AREA_TITLES = {
    "fidelity": "Fidelity: do synthetic patients look like real ones?",
    "diversity": "Diversity and coverage: is all of the real population there, and no more?",
    "utility": "Utility: does a model trained on synthetic data work on real patients?",
    "survival": "Survival: does a survival analysis reach the same conclusions?",
    "causal": "Causal: does the synthetic table follow the study's causal graph?",
    "clustering": "Clustering: do the same patient groups appear?",
    "detection": "Detection: can a classifier tell synthetic from real patients?",
    "privacy": "Privacy: is a synthetic patient closer to a training patient than a new one is?",
}

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1200px;color:#222;line-height:1.4;padding:0 16px}
h1{font-size:26px;margin-bottom:4px}h2{font-size:20px;margin-top:36px;
border-bottom:2px solid #ddd;padding-bottom:4px}h3{font-size:16px;margin-top:22px}
.sub{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td.l,th.l,td.m{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{border-radius:8px;padding:10px 14px;color:#fff;min-width:150px;flex:1}
.card .a{font-size:15px;font-weight:600}.card .s{font-size:13px;opacity:.95}
.pill{display:inline-block;border-radius:10px;padding:0 8px;color:#fff;font-size:12px}
.head{display:flex;flex-wrap:wrap;gap:8px}.head div{background:#f4f6f8;border-radius:6px;
padding:6px 10px;font-size:13px}.head b{font-size:16px}
img{max-width:100%}.note{font-size:12px;color:#555}
figure{margin:10px 0 18px}figcaption{font-size:13px;color:#444;max-width:900px}
.verdict{border-radius:8px;padding:12px 16px;margin:12px 0;color:#fff}
.verdict h2{border:none;margin:0 0 6px;color:#fff}.verdict li{margin:3px 0}
.verdict .adv{opacity:.95;font-size:13px}
details.appendix{margin:10px 0}details.appendix summary{cursor:pointer;font-weight:600}
.release{border:3px solid #c62828;border-radius:8px;padding:10px 16px;margin:12px 0;
color:#c62828;background:#fff5f5}.release b{font-size:16px}
"""


# ---------------------------------------------------------------- small helpers


def _png(fig: Figure) -> str:
    """The figure as an inline PNG. Every plot calls ``tight_layout`` before this, so the
    margins are already trimmed: ``bbox_inches="tight"`` would draw the figure twice
    (once to measure, once to save) for a few pixels of white border."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def figure(plot_html: str, caption: str) -> str:
    """A plot with its caption (what it shows, how to read it); nothing if no plot."""
    if not plot_html:
        return ""
    return f"<figure>{plot_html}<figcaption>{caption}</figcaption></figure>"


def _name(metric_name: str) -> str:
    return METRIC_DISPLAY.get(metric_name, metric_name)


def _label(m: MetricValue) -> str:
    name = _name(m.name)
    return name if not m.columns else f"{name}[{', '.join(m.columns)}]"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        if not math.isfinite(float(value)):
            return "–"
        return f"{float(value):.{digits}f}"
    return html.escape(str(value))


def _pill(passed: bool | None) -> str:
    text, colour = STATUS[passed]
    return f'<span class="pill" style="background:{colour}">{text}</span>'


def _rule(m: MetricValue) -> str:
    if m.threshold is None:
        return "–"
    sign = "≥" if m.direction == "higher" else "≤"
    return f"{sign} {_fmt(m.threshold)}"


def _table(
    header: list[str], rows: Iterable[list[str]], left: int = 1, meaning: bool = False
) -> str:
    """An HTML table; the first ``left`` columns (and a trailing meaning) align left."""
    head = "".join(
        f'<th class="{"l" if i < left or (meaning and i == len(header) - 1) else ""}">'
        f"{html.escape(h)}</th>"
        for i, h in enumerate(header)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"l" if i < left else ("m" if i == len(row) - 1 and meaning else "")}">'
            f"{c}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _metric_table(metrics: list[MetricValue]) -> str:
    rows = [
        [
            html.escape(_label(m)),
            _fmt(m.value),
            _fmt(m.reference),
            "higher" if m.direction == "higher" else "lower",
            _rule(m),
            _pill(m.passed),
            html.escape(m.meaning + (f" ({m.note})" if m.note else "")),
        ]
        for m in metrics
    ]
    header = ["metric", "synthetic", "real reference", "better", "threshold", "", "meaning"]
    return _table(header, rows, meaning=True)


def _pivot(metrics: list[MetricValue]) -> str:
    """Per-column metrics as one table: a row per column, a column per metric."""
    names = list(dict.fromkeys(m.name for m in metrics))
    cols = list(dict.fromkeys(", ".join(m.columns or ()) for m in metrics))
    cell = {(", ".join(m.columns or ()), m.name): m for m in metrics}
    shown = [_name(n) for n in names]
    rows = []
    for c in cols:
        row = [html.escape(c)]
        for n in names:
            m = cell.get((c, n))
            ref = "" if m is None else f" <span class=note>({_fmt(m.reference)})</span>"
            row.append("" if m is None else _fmt(m.value) + ref)
        rows.append(row)
    return _table(["column(s)", *shown], rows)


# ---------------------------------------------------------------- plots


def _values(table: Table, schema: Schema, name: str) -> np.ndarray:
    column = schema.column(name)
    return table.numeric[name] if column.is_numeric else table.labels[name]


def marginal_plots(real: Table, synthetic: Table, schema: Schema, result: ValidationResult) -> str:
    """Real (training) vs synthetic distribution of every column on one grid.

    Code-set members are left out: their frequencies are one scatter plot
    (``codeset_plots``), not 54 (or 581) bar charts.
    """
    columns = [c for c in schema.columns if not c.group]
    if not columns:
        return ""
    ncols = 4
    nrows = math.ceil(len(columns) / ncols)
    fig = Figure(figsize=(4.0 * ncols, 2.9 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    fidelity = {(m.columns or ("",))[0]: m for m in result.metrics if m.name in ("ks", "tvd")}
    for ax, column in zip(axes, columns, strict=False):
        r, s = _values(real, schema, column.name), _values(synthetic, schema, column.name)
        if column.is_numeric:
            edges = numeric_bins(column)
            for values, colour, label in ((r, REAL_COLOUR, "real"), (s, SYN_COLOUR, "synthetic")):
                obs = np.clip(values[~np.isnan(values)], edges[0], edges[-1])
                ax.hist(
                    obs,
                    bins=edges,
                    density=True,
                    histtype="stepfilled",
                    alpha=0.35,
                    color=colour,
                    label=label,
                )
                ax.hist(obs, bins=edges, density=True, histtype="step", color=colour)
            miss = f"missing {np.isnan(r).mean():.0%} / {np.isnan(s).mean():.0%}"
            ax.set_xlabel(f"{column.unit or column.name}; {miss}", fontsize=8)
        else:
            labels = [str(c) for c in column.categories]
            extra = sorted((set(r) | set(s)) - set(labels) - {MISSING})
            labels += extra + ([MISSING] if (MISSING in set(r) | set(s)) else [])
            x = np.arange(len(labels))
            for offset, values, colour, label in (
                (-0.2, r, REAL_COLOUR, "real"),
                (0.2, s, SYN_COLOUR, "synthetic"),
            ):
                freq = [np.mean(values == lab) for lab in labels]
                ax.bar(x + offset, freq, width=0.4, color=colour, label=label)
            names = [column.label(lab) if lab != MISSING else "missing" for lab in labels]
            long = any(len(n) > 6 for n in names)
            ax.set_xticks(x, names, fontsize=7 if long else 8, rotation=30 if long else 0,
                          ha="right" if long else "center")
        m = fidelity.get(column.name)
        score = f" ({m.name.upper()} {m.value:.2f}, ref {m.reference:.2f})" if m else ""
        ax.set_title(f"{column.name}{score}", fontsize=10)
        ax.tick_params(labelsize=8)
    for ax in axes[len(columns) :]:
        ax.set_visible(False)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper right", ncols=2, fontsize=9,
               title="training patients vs generator")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _png(fig)


def _association_matrices(table: Table, schema: Schema) -> tuple[pd.DataFrame, pd.DataFrame]:
    numeric = [c.name for c in schema.columns if c.is_numeric]
    categorical = [c.name for c in schema.columns if c.is_categorical and not c.group]
    pearson = pd.DataFrame({n: table.numeric[n] for n in numeric}).corr(method="pearson")
    cramer = pd.DataFrame(np.eye(len(categorical)), index=categorical, columns=categorical)
    for i, a in enumerate(categorical):
        for b in categorical[i + 1 :]:
            (counts,) = joint_counts([(table.labels[a], table.labels[b])])
            cramer.loc[a, b] = cramer.loc[b, a] = cramers_v(counts)
    return pearson, cramer


def correlation_plots(real: Table, synthetic: Table, schema: Schema) -> str:
    """Pearson (numeric) and Cramer's V (categorical) matrices: real, synthetic, difference."""
    real_p, real_v = _association_matrices(real, schema)
    syn_p, syn_v = _association_matrices(synthetic, schema)
    rows = [
        ("Pearson correlation, numeric columns", real_p, syn_p, (-1.0, 1.0), "RdBu_r"),
        ("Cramer's V, categorical columns", real_v, syn_v, (0.0, 1.0), "Blues"),
    ]
    rows = [r for r in rows if r[1].shape[0] > 1]
    if not rows:
        return "<p>No column pairs to correlate.</p>"
    fig = Figure(figsize=(15, 4.6 * len(rows)))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for (title, r, s, limits, cmap), ax_row in zip(rows, axes, strict=True):
        diff = (s - r).abs()
        for ax, mat, name, lim, cm in (
            (ax_row[0], r, "real", limits, cmap),
            (ax_row[1], s, "synthetic", limits, cmap),
            (ax_row[2], diff, "|synthetic - real|", (0.0, 1.0), "Reds"),
        ):
            image = ax.imshow(mat.to_numpy(dtype=float), vmin=lim[0], vmax=lim[1], cmap=cm)
            ax.set_xticks(range(len(mat)), mat.columns, rotation=60, fontsize=8)
            ax.set_yticks(range(len(mat)), mat.index, fontsize=8)
            ax.set_title(f"{title}: {name}", fontsize=10)
            for (i, j), v in np.ndenumerate(mat.to_numpy(dtype=float)):
                if math.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _png(fig)


def _lor_matrix(codes: list[str], pairs: list[list[str]], lor: list[float]) -> np.ndarray:
    index = {c: i for i, c in enumerate(codes)}
    mat = np.full((len(codes), len(codes)), np.nan)
    for (a, b), v in zip(pairs, lor, strict=True):
        mat[index[a], index[b]] = mat[index[b], index[a]] = v
    return mat


def codeset_plots(result: ValidationResult) -> str:
    """Per code set: code frequencies and pair log odds ratios, real vs synthetic, and the
    co-occurrence heat maps (real holdout, synthetic) of the analysed codes."""
    parts = []
    for freq in [m for m in result.metrics if m.name == "code_frequency_correlation"]:
        group = (freq.columns or ("",))[0]
        lors = [
            m for m in result.metrics if m.name == "codeset_log_odds_diff" and m.columns == (group,)
        ]
        fig = Figure(figsize=(15, 4.6) if lors else (5, 4.6))
        axes = fig.subplots(1, 4 if lors else 1, squeeze=False)[0]
        real, syn = np.asarray(freq.details["real"]), np.asarray(freq.details["synthetic"])
        top = max(float(real.max(initial=0)), float(syn.max(initial=0)), 1e-3) * 1.05
        ax = axes[0]
        ax.plot([0, top], [0, top], color="#999", lw=1)
        ax.scatter(real, syn, s=14, color=SYN_COLOUR)
        for code, x, y in sorted(zip(freq.details["codes"], real, syn, strict=True),
                                 key=lambda t: -abs(t[1] - t[2]))[:5]:
            ax.annotate(code, (x, y), fontsize=7)
        ax.set_xlabel("frequency in real holdout")
        ax.set_ylabel("frequency in synthetic data")
        ax.set_title(f"{group}: code frequencies (r = {_fmt(freq.value, 2)})", fontsize=10)
        if lors:
            d = lors[0].details
            lr, ls = np.asarray(d["lor_holdout"]), np.asarray(d["lor_synthetic"])
            sig = np.asarray(d["q_holdout"]) < ALPHA
            flipped = sig & (np.sign(lr) != np.sign(ls))
            ax = axes[1]
            lim = float(np.nanmax(np.abs(np.concatenate([lr, ls])))) * 1.05 or 1.0
            ax.axhline(0, color="#bbb", lw=1)
            ax.axvline(0, color="#bbb", lw=1)
            ax.plot([-lim, lim], [-lim, lim], color="#999", lw=1)
            ax.scatter(lr[~sig], ls[~sig], s=8, color="#bbbbbb", label="not significant in real")
            ax.scatter(lr[sig], ls[sig], s=18, color=REAL_COLOUR, label="significant in real")
            ax.scatter(lr[flipped], ls[flipped], s=40, facecolors="none", edgecolors="#c62828",
                       linewidths=1.5, label="sign reversed")
            ax.set_xlabel("log odds ratio, real holdout")
            ax.set_ylabel("log odds ratio, synthetic")
            ax.set_title("code pairs: > 0 co-occur, < 0 exclusive", fontsize=10)
            ax.legend(fontsize=7)
            codes = list(d["codes_analysed"])
            short = [c.split("_", 1)[-1] for c in codes]
            for ax, key, name in ((axes[2], "lor_holdout", "real holdout"),
                                  (axes[3], "lor_synthetic", "synthetic")):
                mat = _lor_matrix(codes, d["pairs"], d[key])
                image = ax.imshow(mat, cmap="RdBu_r", vmin=-4, vmax=4)
                ax.set_xticks(range(len(codes)), short, rotation=90, fontsize=5)
                ax.set_yticks(range(len(codes)), short, fontsize=5)
                ax.set_title(f"log odds ratios, {name}", fontsize=10)
                fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        parts.append(_png(fig))
    return "".join(parts)


def dcr_plot(result: ValidationResult) -> str:
    """Distance to the closest training row: synthetic rows vs new (holdout) patients."""
    try:
        m = result.get("dcr_p5")
    except KeyError:
        return ""
    q_syn, q_hold = m.details.get("quantiles"), m.details.get("holdout_quantiles")
    if not q_syn or not q_hold:
        return ""
    share = np.linspace(0, 1, len(q_syn))
    fig = Figure(figsize=(6.5, 3.4))
    ax = fig.subplots()
    ax.plot(q_hold, share, color=REAL_COLOUR, label="real holdout patients (new patients)")
    ax.plot(q_syn, share, color=SYN_COLOUR, label="synthetic rows")
    ax.set_xlabel("Gower distance to the closest training patient")
    ax.set_ylabel("share of rows at or below")
    ax.set_title(
        "Distance to closest record (curves should overlap; orange left = too close)", fontsize=9
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def survival_plot(real: pd.DataFrame, synthetic: pd.DataFrame, survival: tuple[str, str]) -> str:
    """Kaplan-Meier curves of real training and synthetic patients (lifelines)."""
    from lifelines import KaplanMeierFitter

    time_col, event_col = survival
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    for frame, colour, label in ((real, REAL_COLOUR, "real"), (synthetic, SYN_COLOUR, "synthetic")):
        t = pd.to_numeric(frame[time_col], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        e = pd.to_numeric(frame[event_col], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        keep = np.isfinite(t) & np.isfinite(e)
        KaplanMeierFitter(label=label).fit(t[keep], e[keep] > 0).plot_survival_function(
            ax=ax, color=colour, ci_show=True
        )
    ax.set_xlabel(time_col)
    ax.set_ylabel("survival probability")
    ax.set_title("Kaplan-Meier curves, real vs synthetic", fontsize=10)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------- extra sections


def _flatten(rows: list[Any]) -> pd.DataFrame:
    """Rows of dicts, with one nested list of dicts exploded (e.g. rounds -> sites)."""
    flat: list[dict[str, Any]] = []
    for row in rows:
        if not isinstance(row, Mapping):
            flat.append({"value": row})
            continue
        scalars = {k: v for k, v in row.items() if not isinstance(v, list | dict)}
        nested = [
            v
            for v in row.values()
            if isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v)
        ]
        if nested:
            for inner in nested[0]:
                flat.append(
                    {
                        **scalars,
                        **{k: v for k, v in inner.items() if not isinstance(v, list | dict)},
                    }
                )
        else:
            flat.append(scalars)
    return pd.DataFrame(flat)


def _frame_html(frame: pd.DataFrame) -> str:
    rows = [[_fmt(v, 4) for v in row] for row in frame.itertuples(index=False)]
    return _table([str(c) for c in frame.columns], rows, left=len(frame.columns))


def _round_plot(frame: pd.DataFrame) -> str:
    """Numeric columns against 'round', one line per group (e.g. site), if present."""
    if "round" not in frame.columns:
        return ""
    numeric = [
        c
        for c in frame.columns
        if c != "round" and pd.api.types.is_numeric_dtype(frame[c]) and frame[c].notna().any()
    ]
    if not numeric:
        return ""
    groups = [c for c in frame.columns if frame[c].dtype == object and c not in ("reason",)]
    group = groups[0] if groups else None
    numeric = [c for c in numeric if frame[c].nunique(dropna=True) > 1]  # no flat lines
    if not numeric:
        return ""
    fig = Figure(figsize=(4.2 * len(numeric), 3.2))
    axes = np.atleast_1d(fig.subplots(1, len(numeric)))
    for ax, name in zip(axes, numeric, strict=True):
        parts = frame.groupby(group) if group else [("all", frame)]
        for key, part in parts:
            ax.plot(part["round"], part[name], marker="o", label=str(key))
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


LOSS_CAPTION = (
    "Each site's training loss per round, as the site released it: a differential privacy "
    "release, not the exact loss. The site takes one Poisson sample of its rows, clips "
    "each row's loss to the generator's bound, and adds Gaussian noise (standard deviation "
    "noise multiplier &times; &radic;2) to both the sum and the count; the query is "
    "charged to its budget. On small sites the noise dominates, so single values can be "
    "negative or jump: read the trend across rounds, not single points.")
EPSILON_CAPTION = (
    "Privacy spent by each site so far (epsilon at the site's delta, composed over every "
    "round by the site's own accountant). A site stops training before it would pass its "
    "budget.")


MAX_LEGEND_SITES = 12  # more sites than this: no legend (it would hide the plot)


def training_plots(rounds: list[Mapping[str, Any]]) -> str:
    """The DP loss and the epsilon of each site against the round, with captions."""
    frame = _flatten(list(rounds))
    if frame.empty or "round" not in frame.columns or "site" not in frame.columns:
        return ""
    parts = []
    for name, caption, ylabel in (("loss", LOSS_CAPTION, "DP-released loss"),
                                  ("epsilon", EPSILON_CAPTION, "epsilon spent")):
        if name not in frame.columns:
            continue
        values = pd.to_numeric(frame[name], errors="coerce")
        if name == "epsilon":
            values = values.where(values >= 0)  # -1: no DP
        if "status" in frame.columns:
            values = values.where(frame["status"] == "trained")
        if not values.notna().any():
            continue
        fig = Figure(figsize=(6.5, 3.4))
        ax = fig.subplots()
        for site, part in values.groupby(frame["site"]):
            ax.plot(frame.loc[part.index, "round"], part, marker="o", label=str(site))
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        many = frame["site"].nunique() > MAX_LEGEND_SITES
        if not many:
            ax.legend(fontsize=8, title="site", title_fontsize=8)
        fig.tight_layout()
        parts.append(figure(_png(fig), caption + (
            f" One line per site ({frame['site'].nunique()} sites, too many to name here; "
            "the privacy table lists them)." if many else "")))
    return "".join(parts)


def privacy_table(rows: list[Mapping[str, Any]]) -> str:
    """Each site's budget beside what it spent: site, spent, budget, delta, rounds, status."""
    split = any("epsilon_alone" in r for r in rows)  # distributed noise (masked sums)
    header = ["site", "epsilon spent", "epsilon budget", "delta", "rounds trained",
              "last status", "problems reported"]
    header += ["epsilon if all other sites collude"] if split else []
    body = [[html.escape(str(r.get("site"))), _fmt(r.get("epsilon_spent")),
             _fmt(r.get("epsilon_budget")), _fmt(r.get("delta"), 8).rstrip("0"),
             _fmt(r.get("rounds_trained")), html.escape(str(r.get("status") or "–")),
             html.escape("; ".join(r.get("problems") or []) or "none")]
            + ([_fmt(r.get("epsilon_alone", r.get("epsilon_spent")))] if split else [])
            for r in rows]
    return _table(header, body, left=1) + (
        '<p class="note">Epsilon is what each site\'s own accountant composed over the whole '
        "study; – means the site trained without DP (a baseline, not a release)."
        + (" Under distributed noise each site added a share of one common noise: its "
           "epsilon holds while the study's honest-sites do not collude with the "
           "coordinator, and the last column is what it spent should all the others "
           "(docs/privacy.md, \"Distributed noise\")." if split else "") + "</p>")


NOT_A_RELEASE_NOTE = (
    "The epsilon figures in this report are what each site's accountant composed for the "
    "noise it drew, but that noise can be replayed from a seed, or was never added: they "
    "are no guarantee. These outputs (synthetic table, model, this report) must not be "
    "published as a DP release (docs/privacy.md)."
)


def release_banner(label: str | None) -> str:
    """The study's privacy label, unmissable, when its outputs are no DP release.

    A reader who sees "epsilon 2.999 of 3" takes it for a guarantee; a run with
    replayable noise or without DP has the same figures and none, so the report says so
    at the top and again beside the privacy table. Nothing for a release.
    """
    if not is_not_a_release(label):
        return ""
    return (f'<div class="release"><b>{html.escape(label)}</b>'
            f'<p class="note">{NOT_A_RELEASE_NOTE}</p></div>')


def release_line(label: str | None) -> str:
    """The label beside the privacy table: the banner for no release, a plain line
    naming what kind of release it is otherwise (nothing if the caller has no label)."""
    if not label:
        return ""
    return release_banner(label) or (
        f'<p class="note">Release: {html.escape(label)}.</p>')


def _extra_html(value: Any) -> str:
    """Render a caller's section: figure, frame, mapping, list of rows or text."""
    if isinstance(value, Figure):
        return _png(value)
    if isinstance(value, pd.DataFrame):
        return _frame_html(value) + _round_plot(value)
    if isinstance(value, Mapping):
        if value and all(isinstance(v, Mapping) for v in value.values()):
            frame = pd.DataFrame.from_dict(dict(value), orient="index")
            frame.insert(0, "name", frame.index.astype(str))
            return _frame_html(frame.reset_index(drop=True))
        rows = [
            [
                html.escape(str(k)),
                _fmt(v, 4) if not isinstance(v, list | dict) else html.escape(str(v)),
            ]
            for k, v in value.items()
        ]
        return _table(["key", "value"], rows, left=2)
    if isinstance(value, list | tuple):
        frame = _flatten(list(value))
        return _frame_html(frame) + _round_plot(frame)
    return f"<p>{html.escape(str(value))}</p>"


# ---------------------------------------------------------------- the report

MARGINAL_CAPTION = (
    "Each column's distribution: blue, the real training patients; orange, the synthetic "
    "rows (histograms for numbers, bars for categories, with the share missing). The "
    "title gives the column's distance (KS or TVD, lower is better) and, as ref, the same "
    "distance for new real patients (held out): what a perfect generator would score.")
CORRELATION_CAPTION = (
    "How columns go together: Pearson correlation between numeric columns (top) and "
    "Cramer's V between categorical columns (bottom), for real training patients (left) "
    "and synthetic rows (middle); right, their absolute difference (white = the same).")
CODESET_CAPTION = (
    "Code sets: left, each code's frequency in the real holdout against the synthetic rows "
    "(on the diagonal = the same); then the log odds ratios of code pairs (blue points: "
    "pairs significant in real data; red rings: their sign reversed) and their matrices.")
SURVIVAL_CAPTION = (
    "Kaplan-Meier survival curves of real training patients (blue) and synthetic rows "
    "(orange), with 95% confidence bands: close curves mean the synthetic data tells the "
    "same survival story.")
DCR_CAPTION = (
    "Distance from each row to its closest training patient: orange, the synthetic rows; "
    "blue, new (held-out) real patients. Curves that overlap mean synthetic rows are no "
    "closer to the training patients than new patients are; orange to the left of blue "
    "means the generator memorised training patients.")


def _appendix_html(value: Any) -> str:
    """Raw material, readable: lists of rows as a table, mappings as key/value tables."""
    if isinstance(value, list | tuple):
        return _frame_html(_flatten(list(value)))
    return _extra_html(value)



def _tile_colour(result: ValidationResult, key: str) -> str:
    """A headline figure's colour: that of the check it comes from (grey: not judged, or
    a real reference such as TRTR)."""
    from .suite import HEADLINE

    name, is_reference = HEADLINE.get(key, (key, True))
    hits = [m for m in result.metrics if m.name == name
            and (m.columns is None or m.area in ("utility", "survival"))]
    if is_reference or not hits:
        return STATUS[None][1]
    return STATUS[hits[0].passed][1]


def verdict_section(result: ValidationResult, rounds: int | None = None,
                    generator: str | None = None) -> str:
    """The overall verdict with advice, first thing in the report."""
    from .verdict import verdict

    v = verdict(result, rounds=rounds, generator=generator)
    colour = STATUS[bool(v.passed)][1]
    items = []
    for a in v.areas:
        text, col = STATUS[a.passed]
        line = f'<li><span class="pill" style="background:#fff;color:{col}">{text}</span> ' \
            f"<b>{html.escape(a.area)}</b>"
        if a.failed:
            line += (f" &mdash; {len(a.failed)} of {a.checks} checks fail"
                     f'<div class="adv">What to do: {html.escape(a.advice)}</div>')
        items.append(line + "</li>")
    notes = "".join(f'<p class="adv">Note: {html.escape(n)}</p>' for n in v.notes)
    return (f'<div class="verdict" style="background:{colour}"><h2>Verdict: '
            f"{html.escape(v.headline)}</h2><ul>{''.join(items)}</ul>{notes}</div>")


def _summary(result: ValidationResult) -> str:
    cards = []
    for area in result.areas:
        status = result.area_status(area)
        text, colour = STATUS[status]
        judged = [m for m in result.by_area(area) if m.passed is not None]
        failed = [m for m in judged if m.passed is False]
        line = (
            f"{len(judged) - len(failed)} of {len(judged)} checks pass"
            if judged
            else ("descriptive only")
        )
        cards.append(
            f'<div class="card" style="background:{colour}"><div class="a">{area} (area): '
            f"{text}</div>"
            f'<div class="s">{line}</div></div>'
        )
    judged_rows = [
        [
            html.escape(m.area),
            html.escape(_label(m)),
            _fmt(m.value),
            _fmt(m.reference),
            _rule(m),
            _pill(m.passed),
            html.escape(m.meaning),
        ]
        for area in result.areas
        for m in result.by_area(area)
        if m.threshold is not None
    ]
    head = "".join(
        f'<div style="border-left:6px solid {_tile_colour(result, k)}">'
        f"{html.escape(_name(k).replace('_', ' '))}<br><b>{_fmt(v)}</b></div>"
        for k, v in result.headline().items()
    )
    return (
        '<div class="cards">'
        + "".join(cards)
        + "</div>"
        + f'<div class="head">{head}</div>'
        + "<h3>The checks behind the lights</h3>"
        + _table(
            ["area", "metric", "synthetic", "real reference", "threshold", "", "meaning"],
            judged_rows,
            left=2,
            meaning=True,
        )
        + '<p class="note">An area passes when every one of its judged metrics passes. The '
        "<i>real reference</i> is the same metric for real training patients in place of the "
        "synthetic ones: what a perfect generator scores on this data.</p>"
    )


MAX_OPEN_ROWS = 20  # a per-column table longer than this is folded (code sets: 54, 581)


def _area_section(area: str, result: ValidationResult) -> str:
    metrics = result.by_area(area)
    whole = [m for m in metrics if not m.columns]
    single = [m for m in metrics if m.columns and len(m.columns) == 1]
    pairs = [m for m in metrics if m.columns and len(m.columns) > 1]
    parts = []
    if whole:
        parts.append(_metric_table(whole))
    if single:
        if area == "utility":
            parts.append(_metric_table(single))
        else:
            title = "Per column: synthetic <span class=note>(real reference)</span>"
            n_cols = len({m.columns for m in single})
            if n_cols > MAX_OPEN_ROWS:  # a long table folds, as the column pairs do
                parts.append(f"<details><summary><b>{title}: {n_cols} columns</b></summary>"
                             + _pivot(single) + "</details>")
            else:
                parts.append(f"<h3>{title}</h3>")
                parts.append(_pivot(single))
    if pairs:
        parts.append(
            f"<details><summary><b>Column pairs ({len(pairs)} figures): synthetic "
            "<span class=note>(real reference)</span></b></summary>" + _pivot(pairs) + "</details>"
        )
    return "".join(parts)


def write_report(
    result: ValidationResult,
    path: str | Path,
    *,
    real_train: pd.DataFrame,
    synthetic: pd.DataFrame,
    schema: Schema,
    title: str = "fedsynth validation report",
    extra: Mapping[str, Any] | None = None,
    privacy: list[Mapping[str, Any]] | None = None,
    rounds: list[Mapping[str, Any]] | None = None,
    appendix: Mapping[str, Any] | None = None,
    generator: str | None = None,
    release: str | None = None,
) -> Path:
    """Write the HTML report of ``result`` to ``path`` and return the path.

    ``real_train`` and ``synthetic`` are drawn in the plots (the holdout stays out of
    the figures; its role is in the numbers). ``extra`` maps a section title to a
    figure, a DataFrame, a mapping (a table) or a list of rows (a table, plus a plot
    against ``round`` when the rows have one). ``privacy`` (a row per site: spent,
    budget, delta) and ``rounds`` (the per-round log) make the study's privacy table and
    training plots; ``appendix`` sections are shown folded at the end (raw logs,
    configuration); ``generator`` (the one that made ``synthetic``) names the next one
    to try in the verdict's advice; ``release`` (a study's ``privacy`` label, from
    summary.json or the model file) is shown beside the privacy table, and at the top
    when it says the outputs are no DP release. A new plot is one
    ``figure(_png(fig), caption)`` in ``body``.
    """
    path = Path(path)
    real = Table.from_frame(real_train, schema)
    syn = Table.from_frame(synthetic, schema)
    info = result.info
    rows = info.get("rows", {})
    target = info.get("target") or {}
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    sub = (
        # the real row counts are statistics of private rows: only the synthetic count
        f"schema <b>{html.escape(str(info.get('schema', schema.name)))}</b> · "
        f"{rows.get('synthetic', syn.n)} synthetic rows, scored against held-out real "
        "patients · "
        + (
            f"target {html.escape(str(target.get('column')))} in {target.get('positive')} · "
            if target
            else ""
        )
        + f"seed {info.get('seed', '?')} · {stamp}"
    )
    body = [
        f"<h1>{html.escape(title)}</h1><div class=sub>{sub}</div>",
        release_banner(release),
        verdict_section(result, rounds=len(rounds) if rounds else None, generator=generator),
        "<h2>Summary: the checks behind the verdict</h2>",
        _summary(result),
    ]
    for area in [a for a in AREAS if a in result.areas] + [
        a for a in result.areas if a not in AREAS
    ]:
        body.append(f"<h2>{html.escape(AREA_TITLES.get(area, area))}</h2>")
        if area == "fidelity":
            body.append("<h3>Marginals: real training vs synthetic</h3>")
            body.append(figure(marginal_plots(real, syn, schema, result), MARGINAL_CAPTION))
            body.append("<h3>Spread of each numeric column</h3>")
            body.append(spread_plot(real, syn, schema))
            body.append("<h3>Associations side by side</h3>")
            body.append(figure(correlation_plots(real, syn, schema), CORRELATION_CAPTION))
            if schema.codesets:
                body.append("<h3>Code sets: frequencies and co-occurrence</h3>")
                body.append(figure(codeset_plots(result), CODESET_CAPTION))
        if area == "survival" and info.get("survival"):
            body.append(figure(survival_plot(real_train, synthetic, tuple(info["survival"])),
                               SURVIVAL_CAPTION))
        if area == "privacy":
            body.append(figure(dcr_plot(result), DCR_CAPTION))
        body.append(_area_section(area, result))
    if privacy:
        body.append("<h2>Privacy spent per site</h2>")
        body.append(release_line(release))
        body.append(privacy_table(privacy))
    if rounds:
        body.append("<h2>Training, round by round</h2>")
        body.append(training_plots(rounds))
    for name, value in (extra or {}).items():
        body.append(f"<h2>{html.escape(str(name).replace('_', ' '))}</h2>")
        body.append(_extra_html(value))
    if appendix:
        body.append("<h2>Appendix</h2>")
        for name, value in appendix.items():
            body.append(f'<details class="appendix"><summary>{html.escape(str(name))}'
                        f"</summary>{_appendix_html(value)}</details>")
    timing = ", ".join(f"{k} {v:.2f} s" for k, v in result.seconds.items())
    body.append(
        f'<p class="note">Computed in {html.escape(timing)}. Metric definitions: '
        "docs/validation.md.</p>"
    )
    document = (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )
    path.write_text(document, encoding="utf-8")
    return path


FEDERATED_NOTE = (
    "Each site scored the synthetic table against its own rows and sent only these scores "
    "(and its DP row count). <b>exact</b>: the study figure equals the figure on the pooled "
    "rows. <b>approximate</b>: a mean over real rows, weighted by the sites' DP counts; "
    "the gap to the pooled figure is the count noise. <b>bound</b>: the weighted mean "
    "of the sites' distances, an upper bound of the pooled distance (a lower bound for a "
    "similarity), loose when sites differ: not an estimate, no threshold. <b>none</b>: "
    "the figure does not combine without pooling rows; per-site values only."
)


def write_federated_report(
    result: FederatedValidation, path: str | Path, *, title: str = "fedsynth federated validation"
) -> Path:
    """One self-contained HTML page of a federated validation: a row per figure with the
    study value, how it combines, each site's value and why (``federated.combine``)."""
    path = Path(path)
    sites = list(result.weights)
    rows = []
    for f in result.figures:
        rows.append(
            [
                html.escape(f.label),
                _fmt(f.value),
                html.escape(f.rule.exactness),
                *[_fmt(f.sites.get(s)) for s in sites],
                html.escape(f.rule.direction),
                html.escape(f.rule.meaning + (f" ({f.note})" if f.note else "")),
            ]
        )
    weights = ", ".join(f"{html.escape(s)} {w:.0f}" for s, w in result.weights.items())
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    why = _table(
        ["figure", "why it combines this way"],
        [[html.escape(f.label), html.escape(f.rule.why)] for f in result.figures],
        left=2,
    )
    document = (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><div class=sub>{len(sites)} sites · row weights "
        f"(DP counts): {weights} · {stamp}</div>"
        f'<p class="note">{FEDERATED_NOTE}</p>'
        + _table(
            ["figure", "study", "combines", *sites, "better", "meaning"],
            rows,
            meaning=True,
        )
        + "<h2>Why each figure combines as it does</h2>"
        + why
        + "</body></html>"
    )
    path.write_text(document, encoding="utf-8")
    return path
