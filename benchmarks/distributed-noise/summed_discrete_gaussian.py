"""Is a sum of discrete Gaussians charged correctly as one Gaussian? Measured, exactly.

OpenDP draws a count release's noise as a discrete Gaussian N_Z(0, s^2). If h sites each
added N_Z(0, s^2) and only the sum were readable, the sum would not be a discrete
Gaussian (the family is not closed under addition; Kairouz, Liu and Steinke, ICML 2021,
bound the difference). Here the difference is computed, not bounded: the pmf of the sum
by exact convolution (tails beyond 60 s dropped, below 1e-300), then the Renyi
divergence D_alpha(Z + 1 || Z) of a one-count shift, divided by the Gaussian's
alpha / (2 h s^2) that a ledger would charge. A ratio of 1 means the ledger's charge is
exact; above 1, it would under-charge.

Usage: python summed_discrete_gaussian.py
"""

import numpy as np
from scipy.special import logsumexp


def discrete_gaussian(s: float, k: int) -> np.ndarray:
    x = np.arange(-k, k + 1)
    lp = -(x**2) / (2 * s * s)
    return np.exp(lp - logsumexp(lp))


def summed_log_pmf(s: float, h: int) -> np.ndarray:
    p = discrete_gaussian(s, int(60 * s) + 10)
    q = p.copy()
    for _ in range(h - 1):
        q = np.convolve(q, p)
    return np.log(np.clip(q, 1e-300, None))


def shift_divergence(log_q: np.ndarray, alpha: float) -> float:
    """D_alpha(Z + 1 || Z) on the common support."""
    p, q = log_q[:-1], log_q[1:]
    keep = (p > -690) & (q > -690)
    return float(logsumexp(alpha * p[keep] + (1 - alpha) * q[keep]) / (alpha - 1))


ORDERS = (1.5, 2, 4, 8, 16, 32, 64, 128, 256)

if __name__ == "__main__":
    print("per-site std s | sites h | D_alpha / (alpha / (2 h s^2)) at alpha = 2, 8, 32")
    for s in (0.5, 0.75, 1.0, 2.0, 5.0):
        for h in (2, 4, 6, 18):
            lq = summed_log_pmf(s, h)
            ratios = [shift_divergence(lq, a) / (a / (2 * h * s * s)) for a in (2, 8, 32)]
            print(f"{s:g} | {h} | " + ", ".join(f"{r:.6f}" for r in ratios))
    worst = max(shift_divergence(lq, a) / (a / (2 * h * s * s))
                for s in (1.0, 1.5, 3.0) for h in (2, 3, 4, 6, 9, 18)
                for lq in [summed_log_pmf(s, h)] for a in ORDERS)
    print(f"largest ratio, s in 1, 1.5, 3; h in 2-18; alpha in {ORDERS}: {worst:.10f}")
