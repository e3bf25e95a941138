"""Every release's Gaussian is drawn by one sampler (``release_noise.py``): OpenDP's
exact one in secret mode, within the ledger's charge, and no other Gaussian draw on a
release path."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp

from fedsynth.common import quantile_grid
from fedsynth.common.generators.marginal.code_pairs import pair_units
from fedsynth.common.generators.marginal.discretize import discretizer_for
from fedsynth.common.generators.marginal.measure import noisy_marginals, noisy_scores
from fedsynth.common.privacy import PrivacyLedger
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.privacy.release_noise import ReleaseNoise, exact_gaussian
from fedsynth.common.table import read_table

ROOT = Path(__file__).resolve().parents[1]

#: Gaussian draws allowed outside the release sampler, and why none is a release.
ALLOWED = {
    "common/privacy/release_noise.py": {"normal"},  # the reproducible (test) branch
    "common/privacy/secure_noise.py": {"normal"},  # DP-SGD's per-step noise (Opacus')
    # noise flooding of a decrypted aggregate against CKKS key recovery: the aggregate
    # is already DP (post-processing); this hides CKKS's decryption error, not a patient
    "common/encryption/ckks.py": {"normal"},
    # the networks' own noise (reparameterisation, diffusion, latent draws): inside
    # DP-SGD's training or sampling from a released model, never added to a statistic
    "common/generators/tvae.py": {"randn", "randn_like"},
    "common/generators/ctgan.py": {"randn"},
    "common/generators/diffusion.py": {"randn", "randn_like"},
}
GAUSSIAN_CALLS = {"normal", "normal_", "standard_normal", "randn", "randn_like", "gauss",
                  "normalvariate", "multivariate_normal"}


def _gaussian_calls(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = (node.func.attr if isinstance(node.func, ast.Attribute)
                    else node.func.id if isinstance(node.func, ast.Name) else "")
            if name in GAUSSIAN_CALLS:
                found.add(name)
    return found


def test_no_gaussian_draw_outside_the_release_sampler():
    """A release that adds ``rng.normal`` (numpy, torch) to an exact statistic again
    would be found here: every Gaussian call in the package is in the allow-list, with
    its reason, and the allow-list has no stale entry."""
    seen: dict[str, set[str]] = {}
    for folder in ("common", "client", "server"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            calls = _gaussian_calls(path)
            if calls:
                seen[str(path.relative_to(ROOT))] = calls
    stray = {p: c - ALLOWED.get(p, set()) for p, c in seen.items()}
    assert not {p: c for p, c in stray.items() if c}, stray
    assert set(ALLOWED) == set(seen), "an allow-list entry no longer draws a Gaussian"


def _ledger_rdp(history: list[tuple[float, float, int]]) -> np.ndarray:
    """The RDP curve the site's ledger charges (Opacus' accountant, as ``epsilon``)."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    ledger = PrivacyLedger("rdp", [])
    for h in history:
        ledger.record(*h)
    return sum(np.asarray(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders))
               for s, q, n in ledger.history)


def _release_kinds(heart_schema):
    """(kind, [(L2 sensitivity, noise std, integral)] drawn, the ledger's record).

    The sensitivities are the one-patient moves ``test_release_sensitivity.py``
    measures; the stds and records are the ones the release code uses."""
    s = 2.5
    changed = len(quantile_grid.numeric_columns(heart_schema)) + len(
        quantile_grid.heap_columns(heart_schema))
    return [
        ("count release", [(1.0, s, True)], [(s, 1.0, 1)]),
        ("grid release", [(math.sqrt(changed), quantile_grid.cell_std(heart_schema, s), True)],
         [(s, 1.0, 1)]),
        ("marginals (5 cliques)", [(1.0, s, True)] * 5, [(s, 1.0, 5)]),
        ("outcome split (3 cliques)", [(1.0, s, True)] * 3, [(s, 1.0, 3)]),
        ("code histogram, bound 8", [(math.sqrt(8), s, True)], [(s, 1.0, 8)]),
        ("code pairs, bound 6", [(math.sqrt(pair_units(6)), s, False)],
         [(s, 1.0, pair_units(6))]),
        ("event links, bound 4", [(2.0, s, False)], [(s, 1.0, 4)]),
        ("selection scores (15)", [(math.sqrt(15), s, False)], [(s, 1.0, 15)]),
        ("loss report at q = 1", [(math.sqrt(2), s * math.sqrt(2), False)], [(s, 1.0, 1)]),
    ]


def test_each_release_kind_is_within_its_ledger_charge(heart_schema):
    """OpenDP's privacy map (rho-zCDP at the release's L2 sensitivity) is the Gaussian
    RDP curve alpha * rho; it must lie on or below the curve the ledger charges at every
    order. OpenDP rounds its map upwards, so equality holds to a few ulps."""
    orders = np.asarray(RDPAccountant.DEFAULT_ALPHAS)
    for kind, draws, record in _release_kinds(heart_schema):
        rho = sum(exact_gaussian(std, integral).map(delta) for delta, std, integral in draws)
        charged = _ledger_rdp(record)
        assert np.all(orders * rho <= charged * (1 + 1e-12)), kind
        assert np.all(orders * rho >= charged * (1 - 1e-12)), kind  # not over-charged


def test_integer_release_support_is_the_integers_and_spread_is_sigma():
    """The discrete Gaussian on counts: every output is an integer whatever the count
    (so the set of reachable outputs cannot tell count from count + 1), centred on the
    count with std sigma. 20 000 draws: the sample std's standard error is
    sigma / sqrt(2n) = 0.5%, the mean's sigma / sqrt(n) = 0.7% of sigma; the bounds are
    six standard errors."""
    sigma, n = 3.0, 20_000
    noise = DPRandomness.secret().release("count-release")
    for count in (0.0, 1.0, 1234.0):
        out = noise.add(np.full(n, count), sigma, integral=True)
        assert np.all(out == np.round(out))
        assert abs(out.mean() - count) < 6 * sigma / math.sqrt(n)
        assert abs(out.std() / sigma - 1) < 6 / math.sqrt(2 * n)


def test_float_release_spread_is_sigma():
    """The lattice Gaussian on floats (scores, weighted counts): centred, std sigma
    (5 000 draws, six standard errors)."""
    sigma, n = 0.7, 5_000
    out = DPRandomness.secret().release("measurement").add(np.full(n, 0.3), sigma,
                                                           integral=False)
    assert abs(out.mean() - 0.3) < 6 * sigma / math.sqrt(n)
    assert abs(out.std() / sigma - 1) < 6 / math.sqrt(2 * n)


def test_a_count_release_with_a_fraction_is_refused():
    noise = DPRandomness.secret().release("measurement")
    with pytest.raises(ValueError, match="not integral"):
        noise.add(np.array([1.0, 2.5]), 1.0, integral=True)
    with pytest.raises(ValueError, match="not finite"):
        noise.add(np.array([np.nan]), 1.0, integral=False)


def test_reproducible_mode_is_the_seeded_numpy_draw():
    """Tests and benchmarks compare reproducible noise value for value: unchanged."""
    exact = np.arange(6, dtype=float)
    a = DPRandomness.reproducible(7, "r1").release("measurement")
    b = DPRandomness.reproducible(7, "r1").numpy("measurement")
    assert not a.exact
    np.testing.assert_array_equal(a.add(exact, 2.0, integral=True),
                                  exact + b.normal(0.0, 2.0, size=6))
    assert DPRandomness.secret().release("measurement").exact


def test_a_secret_marginal_release_on_heart_is_opendps(heart_schema, heart_files):
    """A site's real marginal and score releases in secret mode: the counts come back
    integers (the discrete Gaussian; numpy's noise never gives one), the scores not."""
    table = read_table(heart_files["cleveland"], heart_schema)
    disc = discretizer_for(heart_schema, 6, "")
    cells = disc.encode(table)
    cliques = [(disc.names[0],), (disc.names[1], disc.names[2])]
    noise = DPRandomness.secret().release("measurement")
    parts = noisy_marginals(cells, disc.names, disc.shape, cliques, 4.0, noise)
    assert all(np.all(p == np.round(p)) for p in parts)
    assert abs(parts[0].sum() - len(table)) < 8 * 4.0 * math.sqrt(parts[0].size)
    model = [np.full(p.size, 1.0 / p.size) for p in parts]
    scores = noisy_scores(cells, disc.names, disc.shape, cliques, model, float(len(table)),
                          4.0, noise)
    assert scores.shape == (2,) and not np.all(scores == np.round(scores))


def test_a_secret_release_needs_no_idealized_numerics():
    """Only ``contrib`` is on: OpenDP's features for proofs that assume ideal reals
    (``idealized-numerics``, formerly ``floating-point``) or trust the caller
    (``honest-but-curious``) are off, and the measurements still build."""
    from opendp.mod import GLOBAL_FEATURES

    assert "contrib" in GLOBAL_FEATURES
    assert not {"idealized-numerics", "floating-point", "honest-but-curious"} & GLOBAL_FEATURES


@pytest.mark.slow
def test_a_heart_marginal_study_draws_every_release_by_opendp_at_the_planned_charge(
        tmp_path, monkeypatch, heart_schema):
    """A small federated marginal study on heart (real ServerApp and ClientApp, secret
    noise): every Gaussian a site added went through OpenDP, and each site's ledger is
    the plan's, to the release, so its epsilon is what it was with numpy's noise."""
    from fedsynth.client.site import SiteState
    from fedsynth.common.generators import get_generator
    from fedsynth.common.generators.marginal.plan import calibrate, planned_ledger
    from fedsynth.common.privacy import release_noise
    from tests.test_marginal import SMALL, _federated

    draws: list[tuple[bool, bool, bool]] = []
    add = release_noise.ReleaseNoise.add

    def spy(self, values, std, *, integral):
        out = add(self, values, std, integral=integral)
        draws.append((self.exact, integral, bool(np.all(out == np.round(out)))))
        return out

    monkeypatch.setattr(release_noise.ReleaseNoise, "add", spy)
    _, grid, _, _ = _federated(tmp_path, secure=False)
    assert draws and all(exact for exact, _, _ in draws)
    assert all(whole for _, integral, whole in draws if integral)
    plan = get_generator("marginal")(heart_schema, **SMALL).plan()
    planned = planned_ledger(plan, calibrate(plan, 3.0, 1e-5))
    for ctx in grid._grid.contexts.values():
        ledger = SiteState.from_record(dict(ctx.state["fedsynth-site"])).ledger
        assert ledger.history == planned.history
        assert 2.99 <= ledger.epsilon(1e-5) <= 3.0


def _finer_than_count_one(y: np.ndarray) -> np.ndarray:
    """The attacker's test: is ``y`` not a multiple of 2^-53?

    ``fl(1 + s)`` is always a multiple of 2^-53 (for |y| < 1 by Sterbenz's lemma the
    sum is exact and s's ulp is >= 2^-53; above, y's own ulp is), whereas ``fl(0 + s) =
    s``, numpy's ``sigma * z``, has finer bits whenever |s| < 1/2. A hit proves the
    cell's count was 0, not 1: an infinite privacy loss (Mironov 2012's observation,
    for the Gaussian)."""
    scaled = y * 2.0**53
    return scaled != np.round(scaled)


def test_the_low_bits_attack_on_a_zero_cell_works_on_numpy_noise_not_on_opendps(
        heart_schema, heart_files):
    """A coordinator reading a site's marginal in clear asks whether a cell's count is
    0 or 1 (is there a patient with this rare combination?). On numpy's noise (the old
    release path, kept as the reproducible draw) the test above answers "0" with
    certainty for ~3% of the empty cells at the heart plan's measure sigma at epsilon 3
    (8.05) and never errs on a count-1 cell; with OpenDP's discrete Gaussian every
    output is an integer and the test never fires. 60 releases of three 2-way
    marginals on Cleveland; the bound for numpy (0.5% of the empty cells) is loose
    against the expected ~3% (hundreds of hits)."""
    table = read_table(heart_files["cleveland"], heart_schema)
    disc = discretizer_for(heart_schema, 6, "")
    cells = disc.encode(table)
    names = disc.names
    cliques = [(names[0], names[3]), (names[0], names[4]), (names[3], names[4])]
    exact = np.concatenate(noisy_marginals(cells, names, disc.shape, cliques, 0.0,
                                           ReleaseNoise.reproducible(np.random.default_rng(0))))
    zero, one = exact == 0, exact == 1
    assert zero.sum() >= 10 and one.sum() >= 5
    sigma, releases = 8.054, 60
    for name, make in (("numpy", lambda i: ReleaseNoise.reproducible(np.random.default_rng(i))),
                       ("opendp", lambda i: DPRandomness.secret().release("measurement"))):
        hits0 = hits1 = 0
        for i in range(releases):
            y = np.concatenate(noisy_marginals(cells, names, disc.shape, cliques, sigma,
                                               make(i)))
            hit = _finer_than_count_one(y)
            hits0, hits1 = hits0 + int(hit[zero].sum()), hits1 + int(hit[one].sum())
        assert hits1 == 0, name  # never wrong: a hit is proof
        if name == "numpy":
            assert hits0 >= 0.005 * releases * zero.sum(), (hits0, zero.sum())
        else:
            assert hits0 == 0


def test_every_marginal_release_kind_draws_in_secret_mode():
    """Each kind's declared domain fits its exact vector: the code histogram's counts
    come back integers; the weighted pair and link counts (fractional weights for a
    patient over the bound) take the float sampler."""
    from fedsynth.common.generators.marginal.code_pairs import noisy_pair_counts
    from fedsynth.common.generators.marginal.codes import noisy_code_histogram
    from fedsynth.common.generators.marginal.event_links import noisy_link_counts

    rng = np.random.default_rng(5)
    presence = (rng.random((200, 3)) < 0.5).astype(np.int64)
    noise = DPRandomness.secret().release("measurement")
    codes = noisy_code_histogram(presence, 2, 3.0, noise)
    assert codes.shape == (3,) and np.all(codes == np.round(codes))
    pairs = noisy_pair_counts(presence, {"x": 0, "y": 1, "z": 2}, [("x", "y"), ("x", "z")],
                              2, 3.0, noise)
    assert pairs.shape == (2,) and not np.all(pairs == np.round(pairs))
    cells = (rng.random((200, 3)) < 0.5).astype(np.int64)
    links = noisy_link_counts(cells, ["a", "b", "E"], {"a": 2, "b": 2, "E": 2},
                              [("a", "E"), ("b", "E")], 1, 3.0, noise)
    assert links.shape == (4,) and not np.all(links == np.round(links))
