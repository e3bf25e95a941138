"""What distributed noise would buy: the central-equivalent epsilon of a federated sum.

Today every site adds the whole noise its budget needs, so the sum of S sites' releases
carries S times one release's variance. If each site added 1/h of that variance
(h: the sites, itself included, that it trusts not to collude with the coordinator)
and only the sum were ever readable, the sum of S sites would carry S/h times it. Under
the RDP accountant a composition of Gaussian releases is a single Gaussian of the same
total zCDP, so the sum is exactly one central release at the epsilon of a Gaussian with
sqrt(S/h) times the noise multiplier that spends the per-site budget. This prints that
epsilon (rdp, delta 1e-5) for the bundled studies' site counts.

Usage: python equivalent_epsilon.py [EPSILONS, e.g. 1,3] [SITE_COUNTS, e.g. 4,6,18]
"""

import sys
import warnings

from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy.optimize import brentq

warnings.simplefilter("ignore")
ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(12, 256))
DELTA = 1e-5


def epsilon(z: float) -> float:
    rdp = compute_rdp(q=1.0, noise_multiplier=z, steps=1, orders=ORDERS)
    return float(get_privacy_spent(orders=ORDERS, rdp=rdp, delta=DELTA)[0])


def central_equivalent(per_site: float, sites: int, honest: int) -> float:
    z = brentq(lambda v: epsilon(v) - per_site, 0.05, 100.0)
    return epsilon(z * (sites / honest) ** 0.5)


if __name__ == "__main__":
    eps = [float(e) for e in (sys.argv[1] if len(sys.argv) > 1 else "1,3").split(",")]
    counts = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "4,6,18").split(",")]
    print("per-site eps | sites S | h honest sites -> central-equivalent epsilon of the sum")
    for e in eps:
        for s in counts:
            hs = sorted({h for h in (1, 2, 3, 4, 6, 9, 18) if h <= s} | {s})
            row = ", ".join(f"h={h}: {central_equivalent(e, s, h):.3f}" for h in hs)
            print(f"{e:g} | {s} | {row}")
