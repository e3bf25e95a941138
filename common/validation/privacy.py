"""Privacy: is a synthetic patient closer to a training patient than a new patient is?

A synthetic row that sits on top of a training row may be a copy of that patient. But
"close" means nothing alone: in a small table with many categorical columns real
patients are close to each other too. So every figure here is set beside the same
figure for real held-out patients, who were never trained on: a synthetic row should be
no closer to the training rows than a new patient is (the holdout-based view of
Platzer and Reutterer, 2021, "Holdout-based empirical assessment of mixed-type synthetic
data", Front. Big Data 4:679939).

All distances are Gower distances on the schema's public bounds (``data.gower``).
"""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln
from sklearn.metrics import roc_auc_score

from .context import Context
from .metric import MetricValue, metric

AREA = "privacy"

#: Distances closer than this are equal (Gower sums of floats).
TIE = 1e-12
#: Random halvings of the holdout averaged for the references that need a third table.
REFERENCE_SPLITS = 5
#: DCR share (closer to train than to holdout) above which the screen fails; ideal 0.5.
DCR_SHARE_THRESHOLD = 0.60
#: Exact copies of training rows may exceed the holdout's rate by this share.
EXACT_COPY_MARGIN = 0.01
#: Largest share of synthetic rows closer to train than the holdout's 5th percentile.
CLOSE_SHARE_THRESHOLD = 0.10
#: Membership-inference AUROC above which the attack counts as succeeding; ideal 0.5.
MIA_THRESHOLD = 0.60


def _p_none(n: int, k: np.ndarray, m: int) -> np.ndarray:
    """P(a uniform m-subset of n rows contains none of k marked rows) = C(n-k, m)/C(n, m)."""
    k = np.asarray(k, dtype=float)
    ok = n - k >= m
    safe = np.where(ok, n - k, m)
    logp = gammaln(safe + 1) - gammaln(safe - m + 1) - gammaln(n + 1) + gammaln(n - m + 1)
    return np.where(ok, np.exp(logp), 0.0)


def share_closer_to_train(d_train: np.ndarray, d_holdout: np.ndarray) -> float:
    """Share of candidate rows closer to a same-size training subsample than to the holdout.

    ``d_train`` (candidates x train) and ``d_holdout`` (candidates x holdout) are
    distances. The training subsample has as many rows as the holdout, so a candidate
    drawn from the population is equally likely to be closer to either: ideal 0.5.
    Instead of drawing one subsample (a noisy figure), this is the exact expectation
    over all subsamples: a candidate is closer to the subsample when it contains one of
    the k training rows nearer than the holdout's nearest, which happens with probability
    1 - C(n-k, m)/C(n, m); ties count one half.
    """
    n, m = d_train.shape[1], min(d_holdout.shape[1], d_train.shape[1])
    nearest_holdout = d_holdout.min(axis=1, keepdims=True)
    k_lt = (d_train < nearest_holdout - TIE).sum(axis=1)
    k_le = (d_train <= nearest_holdout + TIE).sum(axis=1)
    none_lt, none_le = _p_none(n, k_lt, m), _p_none(n, k_le, m)
    return float(np.mean((1.0 - none_lt) + 0.5 * (none_lt - none_le)))


def nndr(d_train: np.ndarray) -> np.ndarray:
    """Nearest / second-nearest training distance per candidate (0 = on one record)."""
    two = np.partition(d_train, 1, axis=1)[:, :2]
    d1, d2 = two[:, 0], two[:, 1]
    return np.where(d2 > TIE, d1 / np.where(d2 > TIE, d2, 1.0), np.where(d1 > TIE, 0.0, 1.0))


def membership_auroc(d_members: np.ndarray, d_nonmembers: np.ndarray) -> float:
    """AUROC of the distance-to-closest-released-record attack.

    A record is guessed to be a training member the closer it is to its nearest released
    (synthetic) row (Chen et al., 2020, "GAN-Leaks", ACM CCS, the full black-box
    attack). Inputs: members x released and non-members x released distances.
    """
    scores = -np.concatenate([d_members.min(axis=1), d_nonmembers.min(axis=1)])
    labels = np.concatenate([np.ones(d_members.shape[0]), np.zeros(d_nonmembers.shape[0])])
    return float(roc_auc_score(labels, scores))


def _halves(ctx: Context, purpose: str) -> list[tuple[np.ndarray, np.ndarray]]:
    n = ctx.holdout.n
    rng = ctx.rng(purpose)
    out = []
    for _ in range(REFERENCE_SPLITS):
        perm = rng.permutation(n)
        out.append((perm[: n // 2], perm[n // 2 :]))
    return out


def _quantiles(values: np.ndarray) -> list[float]:
    """Percentiles 0, 5, ..., 100: enough to draw a distribution in the report."""
    return [float(q) for q in np.quantile(values, np.linspace(0.0, 1.0, 21))]


def dcr_share(ctx: Context) -> MetricValue:
    """The distance-to-closest-record screen of issue 2 with its holdout reference.

    Reference: half of the holdout plays the synthetic table, the other half the
    holdout (averaged over random halvings) - new patients score about 0.5.
    """
    value = share_closer_to_train(
        ctx.distances("synthetic", "train"), ctx.distances("synthetic", "holdout")
    )
    d_ht, d_hh = ctx.distances("holdout", "train"), ctx.self_distances("holdout")
    refs = [share_closer_to_train(d_ht[a], d_hh[np.ix_(a, b)]) for a, b in _halves(ctx, "dcr")]
    return metric(
        "dcr_share_closer_to_train",
        AREA,
        value,
        "lower",
        "share of synthetic rows closer to a same-size train subsample than to the holdout"
        " (ideal 0.5)",
        reference=float(np.mean(refs)),
        threshold=DCR_SHARE_THRESHOLD,
    )


def run(ctx: Context) -> list[MetricValue]:
    """Copies, distances, ratios and a membership-inference attack, each with reference."""
    d_st = ctx.distances("synthetic", "train")
    d_ht = ctx.distances("holdout", "train")
    dcr_syn, dcr_hold = d_st.min(axis=1), d_ht.min(axis=1)
    copies = float(np.mean(dcr_syn <= TIE))
    copies_ref = float(np.mean(dcr_hold <= TIE))
    p5 = float(np.quantile(dcr_hold, 0.05))
    close = float(np.mean(dcr_syn < p5 - TIE)) if p5 > TIE else copies
    nn_syn, nn_hold = nndr(d_st), nndr(d_ht)

    mia = membership_auroc(d_st.T, ctx.distances("synthetic", "holdout").T)
    d_hh = ctx.self_distances("holdout")
    mia_ref = float(
        np.mean(
            [
                membership_auroc(d_ht.T[:, a], d_hh[np.ix_(b, a)])
                for a, b in _halves(ctx, "membership")
            ]
        )
    )
    out = [
        dcr_share(ctx),
        metric(
            "exact_copies",
            AREA,
            copies,
            "lower",
            "share of synthetic rows identical to a training row (all columns)",
            reference=copies_ref,
            threshold=copies_ref + EXACT_COPY_MARGIN,
            details={"count": int(np.sum(dcr_syn <= TIE))},
        ),
        metric(
            "dcr_share_below_holdout_p5",
            AREA,
            close,
            "lower",
            "share of synthetic rows closer to train than 95% of new patients are (ideal 0.05)",
            reference=0.05,
            threshold=CLOSE_SHARE_THRESHOLD,
            details={"holdout_p5": p5},
        ),
        metric(
            "dcr_p5",
            AREA,
            float(np.quantile(dcr_syn, 0.05)),
            "higher",
            "5th percentile of the Gower distance to the closest training row",
            reference=p5,
            details={
                "median": float(np.median(dcr_syn)),
                "holdout_median": float(np.median(dcr_hold)),
                "quantiles": _quantiles(dcr_syn),
                "holdout_quantiles": _quantiles(dcr_hold),
            },
        ),
        metric(
            "nndr_p5",
            AREA,
            float(np.quantile(nn_syn, 0.05)),
            "higher",
            "5th percentile of nearest / second-nearest training distance (0 = on one record)",
            reference=float(np.quantile(nn_hold, 0.05)),
            details={
                "median": float(np.median(nn_syn)),
                "holdout_median": float(np.median(nn_hold)),
            },
        ),
        metric(
            "membership_inference_auroc",
            AREA,
            mia,
            "lower",
            "AUROC of guessing training membership from distance to the closest synthetic row"
            " (ideal 0.5)",
            reference=mia_ref,
            threshold=MIA_THRESHOLD,
        ),
    ]
    python = ctx.options.get("anonymeter_python")
    if python:
        from .anonymeter_runner import anonymeter_metrics

        out.extend(anonymeter_metrics(ctx, str(python)))
    return out


def run_screen(ctx: Context) -> list[MetricValue]:
    """Only the DCR screen (cheap), for callers that want the first validation alone."""
    return [dcr_share(ctx)]
