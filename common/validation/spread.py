"""Each numeric column's spread, real against synthetic, for the report.

A generator can match every mean and still draw patients who are all alike: its
numeric columns collapse towards their means (issue 14 found synthetic standard
deviations at 16-60% of the real ones). Marginal tests average that away and the
histograms hide it among a dozen panels, so the report shows it in one figure: per
numeric column, the real and the synthetic 5-25-50-75-95% quantiles as box-and-whisker
bars on the column's public range, with the ratio of standard deviations beside them.
A ratio far from 1 (outside ``GOOD_RATIO``) is drawn in red.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..schema import Schema
from .data import Table

#: A synthetic/real standard-deviation ratio in this range counts as the same spread.
GOOD_RATIO = (0.8, 1.25)

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)

REAL, SYNTHETIC = "#1f77b4", "#ff7f0e"


@dataclass(frozen=True)
class Spread:
    """One numeric column's spread in the real and the synthetic table."""

    column: str
    real_std: float
    synthetic_std: float
    real_quantiles: tuple[float, ...]
    synthetic_quantiles: tuple[float, ...]

    @property
    def ratio(self) -> float:
        """Synthetic over real standard deviation (NaN when the real one is 0 or unknown)."""
        if not (self.real_std > 0) or not math.isfinite(self.synthetic_std):
            return math.nan
        return self.synthetic_std / self.real_std

    @property
    def good(self) -> bool:
        return GOOD_RATIO[0] <= self.ratio <= GOOD_RATIO[1]


def _summary(values: np.ndarray) -> tuple[float, tuple[float, ...]]:
    obs = values[np.isfinite(values)]
    if obs.size < 2:
        return math.nan, tuple(math.nan for _ in QUANTILES)
    return float(np.std(obs, ddof=1)), tuple(float(q) for q in np.quantile(obs, QUANTILES))


def spreads(real: Table, synthetic: Table, schema: Schema) -> list[Spread]:
    """The spread of every numeric column (missing values left out), schema order."""
    out = []
    for column in schema.columns:
        if not column.is_numeric:
            continue
        r_std, r_q = _summary(real.numeric[column.name])
        s_std, s_q = _summary(synthetic.numeric[column.name])
        out.append(Spread(column.name, r_std, s_std, r_q, s_q))
    return out


def spread_plot(real: Table, synthetic: Table, schema: Schema) -> str:
    """The figure as an embedded PNG plus a one-line legend (HTML); "" without numerics."""
    rows = spreads(real, synthetic, schema)
    if not rows:
        return ""
    fig = Figure(figsize=(8.0, 0.55 * len(rows) + 1.0))
    ax = fig.subplots()
    for i, row in enumerate(rows):
        column = schema.column(row.column)
        lo, hi = float(column.min), float(column.max)  # type: ignore[arg-type]
        # the y axis is inverted (first column on top): real above synthetic
        for offset, q, colour in ((-0.17, row.real_quantiles, REAL),
                                  (0.17, row.synthetic_quantiles, SYNTHETIC)):
            if not all(math.isfinite(v) for v in q):
                continue
            x = [(v - lo) / (hi - lo) for v in q]
            y = i + offset
            ax.plot([x[0], x[4]], [y, y], color=colour, lw=1)
            ax.barh(y, x[3] - x[1], left=x[1], height=0.28, color=colour, alpha=0.6)
            ax.plot([x[2], x[2]], [y - 0.14, y + 0.14], color="black", lw=1.2)
        ratio = row.ratio
        text = f"sd ratio {ratio:.2f}" if math.isfinite(ratio) else "sd ratio –"
        ax.text(1.02, i, text, va="center", fontsize=8,
                color="#2e7d32" if row.good else "#c62828", transform=ax.get_yaxis_transform())
    ax.set_yticks(range(len(rows)), [r.column for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("position on the column's public range (0 = min, 1 = max)", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.legend(handles=[Patch(color=REAL, alpha=0.6, label="real"),
                       Patch(color=SYNTHETIC, alpha=0.6, label="synthetic")],
              fontsize=8, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    note = (
        "Boxes: 25-75% quantiles, whiskers: 5-95%, bar: median; real (blue) above "
        f"synthetic (orange). A standard-deviation ratio outside {GOOD_RATIO[0]:g}-"
        f"{GOOD_RATIO[1]:g} (red) means the synthetic column is narrower or wider than "
        "the real one."
    )
    return (f'<img alt="numeric spread, real vs synthetic" src="data:image/png;base64,{data}">'
            f'<p class="note">{html.escape(note)}</p>')
