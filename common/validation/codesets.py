"""Code sets (diagnoses, mutated genes): which codes occur, and which occur together.

A code set is a public code list stored as one 0/1 column per code (schema kind
``codeset``). Its clinical content is in two things a per-column score cannot see:
how often each code occurs, and which codes go together (NPM1 with DNMT3A in AML) or
exclude each other. So, per code set, real holdout against synthetic, with the real
training table in place of the synthetic one as the reference:

- **code frequency agreement**: Pearson correlation and mean absolute difference of the
  per-code frequencies over the whole public code list;
- **pairwise association**: for every pair of codes, the 2x2 table (both, first only,
  second only, neither) gives a log odds ratio (> 0 co-occurrence, < 0 mutual
  exclusivity) and Fisher's exact test (``scipy.stats.fisher_exact``, two-sided). A
  table with a zero cell gets 0.5 added to all four cells before the log odds ratio
  (the Haldane-Anscombe correction); Fisher's test uses the raw counts;
- **agreement in sign and significance**: among the pairs significant in the real data
  (Benjamini-Hochberg q < ``ALPHA`` over the code set's pairs), the share whose
  synthetic log odds ratio has the same sign, and the share also significant (same
  sign, q < ``ALPHA``) in the synthetic data. A pair significant with the same sign in
  both real samples (holdout and training) is a *robust* association: it gets its own
  check that the synthetic data keeps its direction.

Pairs are formed among the code set's ``MAX_CODES`` most frequent codes in the real
holdout that occur in at least ``MIN_CODE_ROWS`` holdout rows (and are absent from as
many): a rarer code has no testable association at this sample size, and 581 ICD-9
categories would make 168,000 pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ..schema import Schema
from .context import Context
from .data import Table
from .metric import MetricValue, metric

AREA = "fidelity"

#: Pseudo-count added to every cell of a 2x2 table with a zero cell (Haldane-Anscombe).
HALDANE = 0.5
#: False discovery rate at which a pair counts as significant (Benjamini-Hochberg).
ALPHA = 0.05
#: A code enters the pair analysis when present (and absent) in this many holdout rows.
MIN_CODE_ROWS = 5
#: At most this many codes (the most frequent in the holdout) form pairs.
MAX_CODES = 40
#: Sign agreement may fall this far below the real reference before the check fails.
SIGN_AGREEMENT_MARGIN = 0.10


def code_matrix(table: Table, schema: Schema, columns: list[str]) -> np.ndarray:
    """Rows x codes, 1 where the code is present (the column's second category)."""
    out = np.zeros((table.n, len(columns)), dtype=np.int64)
    for j, name in enumerate(columns):
        present = str(schema.column(name).categories[-1])
        out[:, j] = table.labels[name] == present
    return out


def frequencies(matrix: np.ndarray) -> np.ndarray:
    """Share of rows carrying each code (0 for an empty table)."""
    return matrix.mean(axis=0) if matrix.shape[0] else np.zeros(matrix.shape[1])


def pair_counts(matrix: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
    """2x2 counts per pair as rows (both, first only, second only, neither)."""
    if not pairs:
        return np.zeros((0, 4), dtype=np.int64)
    n = matrix.shape[0]
    co = matrix.T @ matrix
    totals = matrix.sum(axis=0)
    i = np.array([p[0] for p in pairs])
    j = np.array([p[1] for p in pairs])
    both = co[i, j]
    first, second = totals[i] - both, totals[j] - both
    return np.stack([both, first, second, n - both - first - second], axis=1)


def log_odds_ratio(cells: np.ndarray) -> np.ndarray:
    """log(a d / (b c)) per row of 2x2 counts; 0.5 added to all cells of a row with a zero."""
    cells = cells.astype(float)
    zero = (cells == 0).any(axis=1, keepdims=True)
    cells = np.where(zero, cells + HALDANE, cells)
    a, b, c, d = cells.T
    return np.log(a) + np.log(d) - np.log(b) - np.log(c)


def fisher_p(cells: np.ndarray) -> np.ndarray:
    """Two-sided Fisher exact test p-value per row of 2x2 counts (scipy)."""
    out = np.empty(len(cells))
    for k, (a, b, c, d) in enumerate(cells):
        out[k] = stats.fisher_exact([[a, b], [c, d]]).pvalue
    return out


@dataclass
class PairStats:
    """Association of every analysed pair in one table."""

    lor: np.ndarray
    p: np.ndarray
    q: np.ndarray

    @classmethod
    def of(cls, matrix: np.ndarray, pairs: list[tuple[int, int]]) -> PairStats:
        cells = pair_counts(matrix, pairs)
        p = fisher_p(cells)
        q = stats.false_discovery_control(p) if len(p) else p
        return cls(lor=log_odds_ratio(cells), p=p, q=q)

    @property
    def significant(self) -> np.ndarray:
        return self.q < ALPHA


def select_codes(holdout: np.ndarray) -> list[int]:
    """Indices of the codes that form pairs (see the module docstring), most frequent first."""
    present = holdout.sum(axis=0)
    n = holdout.shape[0]
    usable = np.flatnonzero((present >= MIN_CODE_ROWS) & (n - present >= MIN_CODE_ROWS))
    order = usable[np.argsort(-present[usable], kind="stable")]
    return [int(k) for k in order[:MAX_CODES]]


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.pearsonr(x, y).statistic)


def _agreement(real: PairStats, other: PairStats) -> tuple[float, float]:
    """(share same sign, share also significant with the same sign) of real-significant pairs."""
    sig = real.significant
    if not sig.any():
        return math.nan, math.nan
    same = np.sign(real.lor[sig]) == np.sign(other.lor[sig])
    both = same & other.significant[sig]
    return float(same.mean()), float(both.mean())


def codeset_metrics(ctx: Context, group: str, columns: list[str]) -> list[MetricValue]:
    """Every code-set figure of one code set; see the module docstring."""
    schema = ctx.schema
    keys = ("holdout", "synthetic", "train")
    mats = {k: code_matrix(ctx.table(k), schema, columns) for k in keys}
    freq = {k: frequencies(m) for k, m in mats.items()}
    codes = [c[len(_prefix(schema, group)):] for c in columns]
    used = np.flatnonzero((freq["holdout"] > 0) | (freq["synthetic"] > 0) | (freq["train"] > 0))
    out = [
        metric(
            "code_frequency_correlation",
            AREA,
            _corr(freq["holdout"], freq["synthetic"]),
            "higher",
            "Pearson correlation of the per-code frequencies over the public code list",
            columns=[group],
            reference=_corr(freq["holdout"], freq["train"]),
            details={
                "codes": [codes[k] for k in used],
                "real": freq["holdout"][used].tolist(),
                "synthetic": freq["synthetic"][used].tolist(),
                "train": freq["train"][used].tolist(),
            },
        ),
        metric(
            "code_frequency_mae",
            AREA,
            float(np.abs(freq["holdout"] - freq["synthetic"]).mean()),
            "lower",
            "mean absolute difference of the per-code frequencies over the public code list",
            columns=[group],
            reference=float(np.abs(freq["holdout"] - freq["train"]).mean()),
        ),
    ]
    chosen = select_codes(mats["holdout"])
    pairs = [(a, b) for i, a in enumerate(chosen) for b in chosen[i + 1 :]]
    if not pairs:
        note = (
            f"fewer than two codes occur in {MIN_CODE_ROWS} or more holdout rows: "
            "no pair can be tested"
        )
        for name in ("codeset_sign_agreement", "codeset_significance_agreement"):
            out.append(
                metric(name, AREA, math.nan, "higher", _MEANING[name], columns=[group], note=note)
            )
        return out
    st = {k: PairStats.of(m, pairs) for k, m in mats.items()}
    sign, signif = _agreement(st["holdout"], st["synthetic"])
    sign_ref, signif_ref = _agreement(st["holdout"], st["train"])
    no_sig = "no pair is significant in the real holdout" if math.isnan(sign) else ""
    threshold = None if math.isnan(sign_ref) else max(0.0, sign_ref - SIGN_AGREEMENT_MARGIN)
    names = [(columns[a], columns[b]) for a, b in pairs]
    out += [
        metric(
            "codeset_log_odds_diff",
            AREA,
            float(np.mean(np.abs(st["holdout"].lor - st["synthetic"].lor))),
            "lower",
            "mean |log odds ratio real - synthetic| over the analysed code pairs",
            columns=[group],
            reference=float(np.mean(np.abs(st["holdout"].lor - st["train"].lor))),
            details={
                "pairs": [list(p) for p in names],
                **{f"lor_{k}": s.lor.tolist() for k, s in st.items()},
                **{f"q_{k}": s.q.tolist() for k, s in st.items()},
                "codes_analysed": [columns[k] for k in chosen],
            },
        ),
        metric(
            "codeset_sign_agreement",
            AREA,
            sign,
            "higher",
            _MEANING["codeset_sign_agreement"],
            columns=[group],
            reference=sign_ref,
            threshold=threshold,
            note=no_sig,
            details={"significant_real_pairs": int(st["holdout"].significant.sum())},
        ),
        metric(
            "codeset_significance_agreement",
            AREA,
            signif,
            "higher",
            _MEANING["codeset_significance_agreement"],
            columns=[group],
            reference=signif_ref,
            note=no_sig,
        ),
    ]
    real, syn, train = st["holdout"], st["synthetic"], st["train"]
    for k in np.flatnonzero(real.significant):
        robust = bool(train.significant[k] and np.sign(train.lor[k]) == np.sign(real.lor[k]))
        out.append(
            metric(
                "codeset_pair_same_sign",
                AREA,
                float(np.sign(syn.lor[k]) == np.sign(real.lor[k])),
                "higher",
                "1 if this pair's association (co-occurrence > 0, exclusivity < 0) keeps its "
                "sign in synthetic data; judged when significant in both real samples",
                columns=list(names[k]),
                reference=float(np.sign(train.lor[k]) == np.sign(real.lor[k])),
                threshold=1.0 if robust else None,
                details={
                    "lor_real": real.lor[k],
                    "lor_synthetic": syn.lor[k],
                    "lor_train": train.lor[k],
                    "q_real": real.q[k],
                    "q_synthetic": syn.q[k],
                    "q_train": train.q[k],
                },
            )
        )
    return out


_MEANING = {
    "codeset_sign_agreement": "share of the code pairs significant in real data (BH q < 0.05) "
    "whose synthetic log odds ratio has the same sign",
    "codeset_significance_agreement": "share of the code pairs significant in real data that "
    "are also significant, with the same sign, in synthetic data",
}


def _prefix(schema: Schema, group: str) -> str:
    spec = schema.extra.get("_codesets", {}).get(group, {})
    return str(spec.get("prefix", f"{group}_"))


def run(ctx: Context) -> list[MetricValue]:
    """The code-set figures of every code set of the schema (none without code sets)."""
    out: list[MetricValue] = []
    for group, columns in ctx.schema.codesets.items():
        out.extend(codeset_metrics(ctx, group, columns))
    return out
