"""One real Flower simulation (Ray), real Opacus, real hospital data, end to end.

Kept to a single simulation: the engine takes seconds to start. Two hospitals, three
rounds, a small model; one hospital fixes its own noise so that its budget runs out
mid-study, which must stop it and not the study.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from opacus.accountants import RDPAccountant

from fedsynth.common.generators import Generator
from fedsynth.common.schema import Schema
from fedsynth.common.study import StudyConfig
from fedsynth.common.table import conform
from fedsynth.simulations.simulate import SimulationOptions, simulate

# Ray, the deployment engine or a whole study: the slow tier (pytest -m 'not slow').
pytestmark = pytest.mark.slow


ROUNDS = 3


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("study")
    opts = SimulationOptions(
        engine="ray",  # the one test of Flower's Ray engine end to end (default: inprocess)
        sites=("cleveland", "switzerland"),
        epsilon=3.0,
        site_noise={"switzerland": 0.8},
        site_epsilon={"switzerland": 6.5},
        study=StudyConfig(
            num_server_rounds=ROUNDS,
            local_epochs=1,
            sample_rate=0.1,
            generator_params={"hidden": 16, "latent": 4},
            output_dir=str(out),
            n_synthetic=300,
            federated_validation=True,
            # switzerland's fixed noise 0.8 and budget 6.5 are set so that its budget
            # runs out after its first round at this grid share (at the default 0.5 the
            # grid and one round would not fit: it would never train)
            grid_share=0.2,
        ),
    )
    return simulate(opts), out


def test_rounds_and_sites(study) -> None:
    summary, _ = study
    assert summary["rounds_completed"] == ROUNDS
    included = [[s["site"] for s in r["sites"] if s["status"] == "trained"]
                for r in summary["rounds"]]
    assert all("cleveland" in inc for inc in included)
    swiss = [next(s for s in r["sites"] if s["site"] == "switzerland") for r in summary["rounds"]]
    statuses = [s["status"] for s in swiss]
    assert statuses[0] == "trained" and statuses[-1] == "budget-exhausted"
    assert summary["sites"]["switzerland"]["epsilon"] <= 6.5
    assert summary["sites"]["cleveland"]["rounds_trained"] == ROUNDS


def test_reported_epsilon_is_the_whole_study(study) -> None:
    summary, _ = study
    cle = [next(s for s in r["sites"] if s["site"] == "cleveland") for r in summary["rounds"]]
    eps = [s["epsilon"] for s in cle]
    assert eps == sorted(eps) and eps[-1] <= 3.0
    # recompute from the public plan: the grid and the count release + R x (10 steps +
    # 1 loss query)
    from fedsynth.client.site import noise_for
    from fedsynth.common.quantile_grid import grid_noise_for
    from fedsynth.common.study import SiteConfig

    cfg = summary["sites_config"][0]
    site, plan = SiteConfig.from_node_config(cfg), StudyConfig.from_flat(summary["study"])
    sigma = noise_for(site, plan)
    # and the quantile-grid release before round 1 (docs/privacy.md)
    grid = grid_noise_for(site.epsilon, site.delta, plan.grid_share)
    one = RDPAccountant()
    one.history = [(grid, 1.0, 1), (10.0, 1.0, 1), (sigma, 0.1, ROUNDS * 11)]
    assert eps[-1] == pytest.approx(one.get_epsilon(delta=1e-5), abs=1e-6)
    fresh = RDPAccountant()
    fresh.history = [(sigma, 0.1, 11)]
    assert eps[-1] > fresh.get_epsilon(delta=1e-5) + 0.5


def test_outputs(study, heart_schema: Schema) -> None:
    summary, out = study
    for name in ("synthetic.csv", "model.fsg", "summary.json", "report.html", "checkpoint.fsg"):
        assert (out / name).is_file(), name
    syn = pd.read_csv(out / "synthetic.csv")
    assert len(syn) == 300
    model = Generator.load(out / "model.fsg")
    conform(model.sample(50, seed=3), heart_schema)
    saved = json.loads((out / "validation.json").read_text())
    head = saved["validation"]["headline"]
    assert 0.0 <= head["fidelity"] <= 1.0
    assert head["trtr_auroc"] > 0.75  # train-on-real on this split
    assert "tstr_auroc" in head and "dcr_share_closer_to_train" in head
    assert saved["rows"]["holdout"] > 0
    assert Generator.read_meta(out / "checkpoint.fsg")["round"] == ROUNDS


def test_federated_validation_after_the_study(study) -> None:
    """Each site scored the released table against its own rows and sent scores only."""
    summary, out = study
    fed = summary["federated_validation"]
    assert fed["left_out"] == [] and fed["written"]
    payload = json.loads((out / "federated_validation.json").read_text())
    assert set(payload["weights"]) == {"cleveland", "switzerland"}
    figures = {f["metric"]: f for f in payload["figures"]}
    # in a study in clear a site cannot check the model is the release, so it never
    # sends the per-patient screens, even at validation-scores = "all"
    assert "exact_copies" not in figures and "dcr_min" not in figures
    ks = [f for name, f in figures.items() if name.startswith("ks[")]
    assert ks and all(f["combines"] in ("exact", "approximate", "bound") for f in ks)
