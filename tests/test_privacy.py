"""Per-site privacy accounting across rounds, with real Opacus and real data.

The bug this rules out: an accountant made anew every round reports the per-round
epsilon, which understates what a site has spent over the study.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedsynth.client.site import BUDGET_EXHAUSTED, TRAINED, SiteState, train_site
from fedsynth.common.generators import TVAE
from fedsynth.common.privacy import PrivacyLedger, RoundPlan, calibrate_noise, plan_history
from fedsynth.common.schema import Schema
from fedsynth.common.study import SiteConfig, StudyConfig, schema_fingerprint

ROUNDS = 3


@pytest.fixture(scope="module")
def study() -> StudyConfig:
    # grid_share 0: these rounds call the site's training directly, with no quantile-grid
    # release before them, so the calibration must not keep budget for one (with the
    # default share kept back, a fourth round would still fit)
    return StudyConfig(num_server_rounds=ROUNDS, local_epochs=1, sample_rate=0.1,
                       generator_params={"hidden": 16, "latent": 4}, count_noise=10.0,
                       grid_share=0.0)


def run_rounds(site: SiteConfig, study: StudyConfig, schema: Schema, rounds: int,
               state: SiteState) -> list:
    model = TVAE(schema, seed=0, hidden=16, latent=4)
    replies = []
    for r in range(1, rounds + 1):
        reply = train_site(site, study, schema_fingerprint(schema), model.state_dict(), state, r)
        if reply.arrays is not None:
            model.load_state_dict(reply.arrays)
        replies.append(reply)
    return replies


def test_epsilon_composes_over_rounds(heart_schema, heart_schema_path, heart_files, study):
    site = SiteConfig("cleveland", str(heart_files["cleveland"]), str(heart_schema_path),
                      epsilon=3.0, delta=1e-5)
    state = SiteState()
    replies = run_rounds(site, study, heart_schema, ROUNDS + 1, state)
    assert [r.status for r in replies] == [TRAINED] * ROUNDS + [BUDGET_EXHAUSTED]

    sigma = replies[0].metrics["noise-multiplier"]
    steps = int(replies[0].metrics["steps"])
    assert steps == 10  # 1 epoch / q = 0.1, whatever the site's size
    one = RDPAccountant()  # a single accountant for the whole study
    one.history = [(study.count_noise, 1.0, 1), (sigma, 0.1, ROUNDS * (steps + 1))]
    expected = one.get_epsilon(delta=1e-5)
    reported = replies[ROUNDS - 1].metrics["epsilon"]
    assert reported == pytest.approx(expected, abs=1e-6)
    assert reported <= 3.0

    per_round = RDPAccountant()  # what a fresh accountant each round would say
    per_round.history = [(sigma, 0.1, steps + 1)]
    assert reported - per_round.get_epsilon(delta=1e-5) > 0.5
    eps = [r.metrics["epsilon"] for r in replies[:ROUNDS]]
    assert eps == sorted(eps) and len(set(eps)) == ROUNDS
    # the row count is released once per study, with noise, and charged
    assert sum(1 for h in state.ledger.history if h[1] == 1.0) == 1
    # ... as a noisy histogram of the outcome (the TVAE's condition): the same release,
    # L2 sensitivity 1; the model's condition frequencies are that histogram, normalised
    assert state.histogram is not None and state.histogram.shape == (5,)
    assert state.noisy_count == max(1.0, float(round(state.histogram.sum())))
    hist = np.clip(state.histogram, 0.0, None)
    np.testing.assert_allclose(replies[ROUNDS - 1].arrays["cond.freq"], hist / hist.sum(),
                               rtol=1e-5)


def test_ledger_survives_a_restart(heart_schema, heart_schema_path, heart_files, study,
                                   tmp_path: Path):
    site = SiteConfig("va", str(heart_files["va"]), str(heart_schema_path), epsilon=3.0,
                      state_dir=str(tmp_path))
    state = SiteState()
    run_rounds(site, study, heart_schema, 2, state)
    path = tmp_path / "ledger.json"
    state.save(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again = SiteState.from_record(__import__("json").loads(path.read_text()))
    assert again.ledger.history == state.ledger.history
    assert again.noisy_count == state.noisy_count
    replies = run_rounds(site, study, heart_schema, 2, again)
    assert [r.status for r in replies] == [TRAINED, BUDGET_EXHAUSTED]


def test_calibration_spends_the_budget_and_no_more() -> None:
    plan = RoundPlan(sample_rate=0.1, epochs=2)
    for eps in (1.0, 3.0, 10.0):
        sigma = calibrate_noise(eps, 1e-5, plan, rounds=10, count_noise=10.0)
        spent = plan_history(sigma, plan, 10, 10.0).epsilon(1e-5)
        assert eps * 0.97 < spent <= eps


def test_fixed_noise_site_stops_at_its_budget(heart_schema, heart_schema_path, heart_files,
                                              study):
    site = SiteConfig("switzerland", str(heart_files["switzerland"]), str(heart_schema_path),
                      epsilon=6.5, noise_multiplier=0.8)
    state = SiteState()
    replies = run_rounds(site, study, heart_schema, ROUNDS, state)
    trained = [r for r in replies if r.status == TRAINED]
    assert 0 < len(trained) < ROUNDS
    assert all(r.status == BUDGET_EXHAUSTED for r in replies[len(trained):])
    assert state.ledger.epsilon(1e-5) <= 6.5


def test_ledger_record_round_trip() -> None:
    led = PrivacyLedger("rdp")
    led.record(1.1, 0.1, 5)
    led.record(1.1, 0.1, 5)
    led.record(10.0, 1.0, 1)
    assert led.history == [(1.1, 0.1, 10), (10.0, 1.0, 1)]
    assert PrivacyLedger.from_record(led.to_record()).history == led.history


# -- the one privacy plan ----------------------------------------------------------------


def test_an_infeasible_budget_fails_before_anything_runs(tmp_path) -> None:
    """--epsilon 0.2 at the defaults: one message with the smallest feasible epsilon,
    a non-zero exit and no output folder."""
    from fedsynth.cli import main
    from fedsynth.common.errors import BudgetError
    from fedsynth.common.privacy.plan import PrivacyPlan
    from fedsynth.common.study import StudyConfig

    plan = PrivacyPlan.from_study(StudyConfig())
    smallest = plan.smallest_epsilon(1e-5)
    assert plan.floor_epsilon(1e-5) == pytest.approx(0.375, abs=0.01)
    assert plan.floor_epsilon(1e-5) <= smallest
    with pytest.raises(BudgetError, match=f"smallest feasible epsilon is {smallest:.3f}"):
        plan.check(0.2, 1e-5)
    plan.check(smallest * 1.05, 1e-5)  # just above it: feasible, with a lot of noise
    sigma = plan.noise_for(smallest * 1.05, 1e-5)
    assert plan.ledger(sigma).epsilon(1e-5) <= smallest * 1.05
    out = tmp_path / "out"
    assert main(["simulate", "--epsilon", "0.2", "--out", str(out)]) != 0
    assert not out.exists()


def test_steps_per_round_are_the_samplers_batches(heart_schema, heart_files) -> None:
    """The accountant, the coordinator's update bounds and Opacus' sampler agree on the
    number of steps in a round (it was int(1/q) in one place and ceil(1/q) in another)."""
    from fedsynth.common.privacy.plan import steps_per_round
    from fedsynth.common.privacy.randomness import DPRandomness
    from fedsynth.common.privacy.trainer import poisson_loader

    data = np.zeros((303, 3))
    for q in (1.0, 0.3, 0.1, 0.07):
        loader = poisson_loader(data, q, DPRandomness.secret().torch("sampler"))
        assert len(list(loader)) == steps_per_round(q) == RoundPlan(q, 1).steps
