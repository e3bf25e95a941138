"""The one place that draws a release's Gaussian noise: exact sampling in secret mode.

A release (a marginal, a code histogram, a selection score, the count or grid
histogram, the loss report) is an exact statistic plus Gaussian noise. Drawn naively
in floating point (``numpy``'s ziggurat or torch's Box-Muller, added to the statistic
and rounded) the result is not the Gaussian mechanism the ledger charges: the set of
floats a noisy value can take depends on the exact value it was added to, so a value
can rule one neighbouring dataset out (Mironov 2012, "On significance of the least
significant bits for differential privacy"; Jin et al. 2022, "Are we there yet?
Timing and floating-point attacks on differential privacy systems").

In secret mode every release's noise is therefore drawn by OpenDP's
``make_gaussian`` (zCDP), which samples exactly, from the operating system's
randomness, with no floating-point arithmetic on the secret:

- ``integral=True`` (counts: marginals, the outcome split, the code histogram, the
  count and grid histograms): the exact vector is cast to int64 and OpenDP adds the
  *discrete* Gaussian (Canonne, Kamath, Steinke 2020); every output is an integer,
  whatever the input.
- ``integral=False`` (weighted pair and link counts, selection scores, the loss
  report): OpenDP rounds the input to a 2^k lattice and adds a discrete Gaussian on
  that lattice, the rounding accounted in its proof (its privacy map at L2 distance
  Delta is Delta^2 / (2 std^2), as the ledger charges).

Which of the two a release uses is a property of the *release kind*, set by its code,
never read from the values: a choice made on whether this table's vector happens to
be integral would itself be a data-dependent output support (a weighted pair count
is integral exactly when no patient carries a fractional weight).

Only OpenDP's ``contrib`` feature is enabled: its proofs are written, not yet vetted
by OpenDP's committee. ``idealized-numerics`` (formerly ``floating-point``), which marks
components whose proofs assume ideal real arithmetic, is neither needed nor enabled.

In reproducible mode (tests and benchmarks, labelled "not a DP release") the noise is
numpy's seeded ``normal``, exactly the draw of earlier versions, so runs that compare
reproducible noise value for value are unchanged.

DP-SGD's per-step gradient noise is not drawn here: it keeps Opacus' hardening
(``secure_noise.py``); at ~10^5 values a step the exact sampler would take seconds per
step (docs/privacy.md gives the figure).
"""

from __future__ import annotations

import functools

import numpy as np

# not ``opendp.prelude``: it imports OpenDP's scikit-learn extras (1.3 s, and
# scikit-learn into a site's training process; tests/test_site_speed.py)
from opendp.domains import atom_domain, vector_domain
from opendp.measurements import make_gaussian
from opendp.metrics import l2_distance
from opendp.mod import Measurement, enable_features

enable_features("contrib")

#: Integral exact vectors must be below this in absolute value (int64, and exactly
#: representable as a float64 so the cast loses nothing).
_INTEGRAL_LIMIT = 2.0**53


@functools.lru_cache(maxsize=256)
def exact_gaussian(std: float, integral: bool) -> Measurement:
    """OpenDP's Gaussian measurement on vectors (int64 or float64) at this std.

    The input metric is L2 distance in float64 for both, so the privacy map takes any
    sensitivity (sqrt(bound) for the code histogram); the sampled distribution does not
    depend on the metric."""
    atom = atom_domain(T="i64") if integral else atom_domain(T=float, nan=False)
    return make_gaussian(vector_domain(atom), l2_distance(T=float), scale=float(std))


class ReleaseNoise:
    """A release's noise source: ``add`` is the only way a release adds Gaussian noise.

    ``rng`` is the stream's numpy generator (secret-seeded in secret mode): a release
    uses it for its other random choices (the code histogram's subsampling of each
    patient's codes) and, in reproducible mode only, for the noise itself.
    """

    def __init__(self, rng: np.random.Generator, *, exact: bool) -> None:
        self.rng = rng
        self.exact = exact

    @classmethod
    def reproducible(cls, rng: np.random.Generator) -> ReleaseNoise:
        """Seeded numpy noise: for tests and benchmarks only, not a DP release."""
        return cls(rng, exact=False)

    def add(self, values: np.ndarray, std: float, *, integral: bool) -> np.ndarray:
        """``values`` plus N(0, std^2) per entry (float64, same shape).

        ``integral`` says the release kind's exact vector is counts (integers by
        construction); in secret mode it then gets the discrete Gaussian and every
        output is an integer. A non-integral vector declared integral is a bug: error.
        """
        values = np.asarray(values, dtype=float)
        if not self.exact:
            return values + self.rng.normal(0.0, std, size=values.shape)
        if not (np.isfinite(std) and std >= 0):
            raise ValueError(f"a release's noise std must be finite and >= 0, not {std!r}")
        if not np.all(np.isfinite(values)):
            raise ValueError("a release's exact statistic is not finite")
        if not values.size:
            return values.copy()
        flat = values.ravel()
        if integral:
            if np.any(flat != np.round(flat)) or np.any(np.abs(flat) >= _INTEGRAL_LIMIT):
                raise ValueError("a count release's exact vector is not integral")
            noisy = exact_gaussian(float(std), True)(flat.astype(np.int64).tolist())
        else:
            noisy = exact_gaussian(float(std), False)(flat.tolist())
        return np.asarray(noisy, dtype=float).reshape(values.shape)
