"""Clustering utility: do the same groups of patients appear in synthetic data?

Patient subgroups (phenotypes) are a common use of a cohort. k-means with the number of
clusters that suits the real training data best (highest silhouette for k in
``K_RANGE``) is fitted on real training rows and, separately, on synthetic rows. Both
models then assign the real holdout patients; the adjusted Rand index (Hubert and
Arabie, 1985) of the two assignments says whether the synthetic data yields the same
grouping of real patients. The silhouette (Rousseeuw, 1987) of each model on its own
data says whether the groups are as well separated as in real data.

Rows are put on public bounds (``data.public_matrix``); scikit-learn does the rest.
Reference: the model fitted on the holdout in place of the synthetic one.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, silhouette_score

from .context import Context
from .data import public_matrix
from .metric import MetricValue, metric

AREA = "clustering"

#: Numbers of clusters tried on the real training data.
K_RANGE = range(2, 6)
#: Adjusted Rand index at or above which the grouping counts as reproduced (a fresh real
#: sample scores about 0.45-0.7 on the heart-disease and AMLSG data: k-means is not stable).
ARI_THRESHOLD = 0.4


def _kmeans(x: np.ndarray, k: int, seed: int) -> KMeans:
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x)


def _silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    if len(np.unique(labels)) < 2 or len(np.unique(labels)) >= len(labels):
        return math.nan
    return float(silhouette_score(x, labels))


def run(ctx: Context) -> list[MetricValue]:
    """ARI on the holdout of train- vs synthetic-fitted k-means, and the silhouette gap."""
    x = {k: public_matrix(ctx.table(k), ctx.schema) for k in ("train", "holdout", "synthetic")}
    if min(len(v) for v in x.values()) <= max(K_RANGE):
        return []
    fits = {k: _kmeans(x["train"], k, ctx.seed) for k in K_RANGE}
    sil = {k: _silhouette(x["train"], m.labels_) for k, m in fits.items()}
    best = max(sil, key=lambda k: sil[k] if math.isfinite(sil[k]) else -1.0)
    real = fits[best]
    syn = _kmeans(x["synthetic"], best, ctx.seed)
    hold = _kmeans(x["holdout"], best, ctx.seed)
    on_holdout = real.predict(x["holdout"])
    ari = float(adjusted_rand_score(on_holdout, syn.predict(x["holdout"])))
    ari_ref = float(adjusted_rand_score(on_holdout, hold.labels_))
    s_syn = _silhouette(x["synthetic"], syn.labels_)
    s_hold = _silhouette(x["holdout"], hold.labels_)
    return [
        metric(
            "kmeans_ari",
            AREA,
            ari,
            "higher",
            f"adjusted Rand index on the holdout of k-means (k={best}) fitted on synthetic vs"
            " on real data",
            reference=ari_ref,
            threshold=ARI_THRESHOLD,
            details={"k": best},
        ),
        metric(
            "silhouette_gap",
            AREA,
            abs(s_syn - sil[best]),
            "lower",
            "|silhouette of k-means on synthetic - on real training data|",
            reference=abs(s_hold - sil[best]),
            details={"real": sil[best], "synthetic": s_syn, "holdout": s_hold, "k": best},
        ),
    ]
