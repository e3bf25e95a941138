"""The study's privacy figures and label count every release a site made.

A site's quantile-grid release (before round 1) is charged to its ledger like its
training. Before the twelfth session's audit the coordinator logged only training
replies, so a site that released its grid and then never trained (its budget spent,
a crash) was reported without that release: a masked study's "epsilon if all others
collude" understated, a DP site shown as "no DP", and a site without DP, whose exact
grid counts went into the published model, left out of the "not a DP release" label.
Real heart-disease rows, the real ServerApp and ClientApp code in process.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fedsynth.client.site import SiteState
from fedsynth.common import protocol as P
from fedsynth.common.generators import Generator
from fedsynth.common.study import SiteConfig, StudyConfig
from fedsynth.server.app import final_site_privacy
from fedsynth.server.rounds import RoundLog, SiteRound
from tests.flower_support import run_recorded

SITES = ("cleveland", "hungarian", "switzerland")


def _epsilon(history: list, delta: float = 1e-5) -> float:
    acc = RDPAccountant()
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta))


def _sites(tmp_path: Path, study: StudyConfig, **opts) -> list[SiteConfig]:
    from fedsynth.simulations.simulate import SimulationOptions, prepare_sites

    sites, _, _ = prepare_sites(SimulationOptions(sites=SITES, epsilon=3.0, study=study,
                                                  **opts), tmp_path)
    return sites


@pytest.mark.slow
def test_a_site_that_split_its_grid_and_then_stopped_is_reported_at_what_it_spent(tmp_path):
    """Masks, honest-sites 2; switzerland fixes its DP-SGD noise so low that no round
    fits its budget: it makes its split grid release and answers budget-exhausted
    ever after. Its epsilon and its epsilon should the others collude are what its
    ledger says (an independent accountant, to 1e-6), in the summary and the label."""
    from fedsynth.simulations.simulate import setup_mask_keys

    study = StudyConfig(generator="tvae", min_sites=2, num_server_rounds=2,
                        output_dir=str(tmp_path / "study"), n_synthetic=50,
                        secure_aggregation="masks", study_id="split-then-stop",
                        honest_sites=2, generator_params={"hidden": 16, "latent": 4})
    sites = _sites(tmp_path, study, site_noise={"switzerland": 0.3})
    sites = setup_mask_keys(tmp_path, sites, 2)
    outcome, grid = run_recorded(study, sites, "heart_disease")
    summary = json.loads((outcome.output_dir / "summary.json").read_text())
    state = SiteState.from_record(dict(grid._grid.contexts[3].state["fedsynth-site"]))
    assert [s.status for r in outcome.history for s in r.sites
            if s.site == "switzerland"] == [P.Status.BUDGET_EXHAUSTED] * 2
    assert state.ledger.history and state.shares  # its grid, split two ways
    swiss = summary["sites"]["switzerland"]
    assert swiss["epsilon"] == pytest.approx(_epsilon(state.ledger.history), abs=1e-6)
    alone = summary["secure_aggregation"]["epsilon_alone"]["switzerland"]
    assert alone == pytest.approx(_epsilon(state.alone_ledger().history), abs=1e-6)
    assert alone > swiss["epsilon"]
    assert "switzerland" in summary["privacy"]  # among the sites that split their noise
    assert [g["status"] for g in summary["grid_release"]] == [P.Status.GRID_RELEASED] * 3


@pytest.mark.slow
def test_a_site_without_dp_that_released_its_grid_makes_the_release_not_dp(
        tmp_path, monkeypatch):
    """Switzerland runs without DP and never trains after its grid release (its rows
    fail a check the grid did not need): its exact grid counts are in the published
    grid all the same, so the model and the summary must not say "DP release"; a DP
    site that stops the same way is reported at its grid's epsilon, not as "no DP"."""
    import fedsynth.client.app as client_app
    from fedsynth.client.site import status_metrics

    real = client_app.train_site

    def stops(site, study, schema_fp, arrays, state, *args, **kwargs):
        if site.name == "switzerland":
            return P.SiteReply(P.Status.INVALID_DATA, status_metrics(site, state),
                               problems=["the table changed on disk"])
        return real(site, study, schema_fp, arrays, state, *args, **kwargs)

    monkeypatch.setattr(client_app, "train_site", stops)
    for dp in (False, True):
        out = tmp_path / str(dp)
        study = StudyConfig(generator="tvae", min_sites=2, num_server_rounds=1,
                            output_dir=str(out / "study"), n_synthetic=50,
                            study_id=f"crash-{dp}",
                            generator_params={"hidden": 16, "latent": 4})
        sites = [replace(s, dp=dp) if s.name == "switzerland" else s
                 for s in _sites(out, study)]
        outcome, grid = run_recorded(study, sites, "heart_disease")
        summary = json.loads((outcome.output_dir / "summary.json").read_text())
        label = Generator.read_meta(outcome.output_dir / "model.fsg")["privacy"]
        state = SiteState.from_record(dict(grid._grid.contexts[3].state["fedsynth-site"]))
        assert state.grid_counts is not None  # its release is in the grid
        if not dp:
            assert "no DP" in summary["privacy"] and "no DP" in label
            assert "switzerland" in summary["privacy"]
        else:
            assert summary["privacy"] == label and "no DP" not in label
            assert summary["sites"]["switzerland"]["epsilon"] == pytest.approx(
                _epsilon(state.ledger.history), abs=1e-6)


def test_a_lower_epsilon_the_coordinator_refused_does_not_replace_the_figure():
    """Round 2's reply says 0.5 after round 1's 2.0; the coordinator's guard refused it
    (a ledger only grows). The summary keeps the larger figure."""
    history = [RoundLog(1, [SiteRound("a", P.Status.TRAINED, epsilon=2.0)]),
               RoundLog(2, [SiteRound("a", P.Status.REFUSED, epsilon=0.5,
                                      reason="lower than the 2 reported before")])]
    assert final_site_privacy(history)["a"]["epsilon"] == 2.0
    assert final_site_privacy(history)["a"]["last_status"] == P.Status.REFUSED
