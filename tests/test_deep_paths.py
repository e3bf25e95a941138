"""The deep generators' direct paths and ddpm's loss multiplicity (issue 14).

- ddpm averages each row's loss over several draws of its timestep and noise, feeding
  the copies to the denoiser as [rows, k, features]: a row's clipped gradient must
  still be that row's alone (Opacus' per-sample gradients and ghost norms equal a
  one-row-at-a-time backward), and the point of it, a less noisy per-row loss, must
  show.
- The TVAE on a survival table (TCGA-BRCA, real rows) is conditioned on the event,
  hides the time from its encoder and gives the time a direct linear path from the
  row's other columns, trained by DP-SGD with the rest; the synthetic rows keep what a
  Cox model needs to rank real patients.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index
from opacus import GradSampleModule
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleModuleFastGradientClipping,
)

from fedsynth.common.generators import TVAE, get_generator
from fedsynth.common.privacy import DPSettings, PrivacyLedger, train_round
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.simulations.benchmark import BenchmarkOptions, prepare_seed
from fedsynth.simulations.datasets import load_site_frames


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _row_grads(model, rows: torch.Tensor) -> torch.Tensor:
    """Each row's gradient by its own backward pass (same draws: same torch seed)."""
    out = []
    for i in range(rows.shape[0]):
        model.denoiser.zero_grad()
        torch.manual_seed(7)
        model.per_sample_loss(model.denoiser, rows)[i].backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in model.denoiser.parameters()]))
    return torch.stack(out)


def test_ddpm_copies_keep_each_rows_gradient_its_own():
    schema, frames = load_site_frames("heart_disease")
    model = get_generator("ddpm")(schema, seed=0, multiplicity=3)
    rows = torch.tensor(model.encoder.encode(next(iter(frames.values())).head(5)))
    ref = _row_grads(model, rows)
    wrapped = GradSampleModule(model.denoiser, loss_reduction="sum", strict=True)
    torch.manual_seed(7)
    model.per_sample_loss(wrapped, rows).sum().backward()
    hooks = torch.cat([p.grad_sample.reshape(5, -1) for p in model.denoiser.parameters()], 1)
    wrapped._close()
    assert torch.allclose(hooks, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    ghost = GradSampleModuleFastGradientClipping(
        model.denoiser, loss_reduction="sum", strict=True, max_grad_norm=1.0,
        use_ghost_clipping=True)
    torch.manual_seed(7)
    model.per_sample_loss(ghost, rows).sum().backward()
    assert torch.allclose(ghost.get_norm_sample(), ref.norm(dim=1), rtol=1e-4)


def test_ddpm_multiplicity_makes_each_rows_loss_less_noisy():
    schema, frames = load_site_frames("heart_disease")
    rows = None
    spread = {}
    for k in (1, 8):
        model = get_generator("ddpm")(schema, seed=0, multiplicity=k)
        if rows is None:
            rows = torch.tensor(model.encoder.encode(next(iter(frames.values())).head(20)))
        with torch.no_grad():
            draws = torch.stack([model.per_sample_loss(model.denoiser, rows) for _ in range(30)])
        spread[k] = float(draws.std(dim=0).mean())
    # the mean of 8 independent draws: std / sqrt(8) = 0.35 of one draw's
    assert spread[8] < 0.5 * spread[1]


def test_tvae_on_a_survival_table_reads_the_event_and_hides_the_time():
    schema, frames = load_site_frames("tcga_brca")
    model = TVAE(schema, seed=0)
    assert schema.outcome is None and model.cond_column == "E"
    time_skip = model.net.time_skip
    assert time_skip is not None
    assert any(p is time_skip.weight for p in model.private_module().parameters())
    # one map per event value, each reading every column but the time
    assert time_skip.weight.shape == (1, 2 * len(model.net.time_inputs))
    assert model.encoder.block("T", "numeric").start not in model.net.time_inputs.tolist()
    rows = torch.tensor(model.encoder.encode(next(iter(frames.values())).head(8)))
    slot = model.encoder.block("T", "numeric").start
    moved = rows.clone()
    moved[:, slot] = -rows[:, slot]
    torch.manual_seed(0)
    _, mu, logvar, _ = model.net(rows)
    torch.manual_seed(0)
    _, mu2, logvar2, _ = model.net(moved)
    assert torch.equal(mu, mu2) and torch.equal(logvar, logvar2)  # the encoder never sees T
    # heart disease has no survival time: no time path, the encoder reads every column
    heart, _ = load_site_frames("heart_disease")
    assert TVAE(heart, seed=0).net.time_skip is None


def test_tvae_time_path_is_trained_under_dp_and_read_at_sampling():
    schema, frames = load_site_frames("tcga_brca")
    model = TVAE(schema, seed=0)
    data = model.encoder.encode(pd.concat(frames.values(), ignore_index=True))
    train_round(model, data, epochs=2, sample_rate=0.5,
                dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0),
                ledger=PrivacyLedger(), randomness=DPRandomness.reproducible(1, "test"))
    assert float(model.net.time_skip.weight.detach().abs().sum()) > 0
    # at sampling the time reads the sampled row: a weight on age moves T with age
    with torch.no_grad():
        model.net.time_skip.weight.zero_()
        age = list(model.net.time_inputs.tolist()).index(
            model.encoder.block("age_at_index", "numeric").start)
        inputs = len(model.net.time_inputs)
        model.net.time_skip.weight[0, age] = 2.0  # the censored rows' map
        model.net.time_skip.weight[0, inputs + age] = 2.0  # the deaths' map
    synthetic = model.sample(600, seed=3)
    corr = np.corrcoef(synthetic["age_at_index"].astype(float),
                       np.log1p(synthetic["T"].astype(float)))[0, 1]
    assert corr > 0.3


def test_tvae_synthetic_tcga_ranks_real_patients(tmp_path: Path):
    """No DP, pooled training rows: a Cox model fitted on the synthetic rows ranks the
    real holdout far above chance (without the event condition and the time path the
    same fit gave 0.30-0.45: a time that follows the covariates but not the event ranks
    patients backwards, see docs/generators.md)."""
    data = prepare_seed(BenchmarkOptions(dataset="tcga_brca"), 0, tmp_path)
    train = data.train.drop(columns="site")
    hold = data.holdout.drop(columns="site").astype(float)
    model = TVAE(data.schema, seed=0)
    model.fit(train, epochs=200, sample_rate=1.0, randomness=DPRandomness.reproducible(0))
    synthetic = model.sample(len(train), seed=1).astype(float)
    keep = [c for c in synthetic.columns if synthetic[c].std() > 0]
    cox = CoxPHFitter(penalizer=0.01).fit(synthetic[keep], "T", "E")
    risk = cox.predict_partial_hazard(hold[cox.params_.index]).to_numpy()
    assert concordance_index(hold["T"], -risk, hold["E"]) > 0.65


def test_condition_gain_scales_with_the_columns_it_feeds_and_spares_numbers():
    """Half the categorical columns the condition feeds (heart 8, TCGA-BRCA 38), on the
    categorical slots only; a number given is used as is."""
    for dataset, gain in (("heart_disease", 4.0), ("tcga_brca", 19.0)):
        schema, _ = load_site_frames(dataset)
        model = TVAE(schema, seed=0)
        assert model.condition_gain() == gain
        slots = model.net.cond_gain
        numeric = [b.start for b in model.encoder.numeric_blocks]
        assert torch.all(slots[numeric] == 1.0)
        assert int((slots == gain).sum()) == model.encoder.dim - len(numeric)
    assert TVAE(schema, seed=0, condition_skip=2.5).condition_gain() == 2.5


@pytest.mark.slow
def test_condition_gain_keeps_the_event_link_of_a_small_site_under_dp(tmp_path: Path):
    """One TCGA-BRCA region alone (about 250 training rows, 14% events), DP at epsilon 3:
    with the condition's map at gain 1 the event's link to the covariates drowns in the
    noise and a Cox model fitted on the synthetic rows ranks the real holdout near
    chance (median C-index 0.56 over six noise seeds); the automatic gain (19 here) keeps
    it (0.63)."""
    data = prepare_seed(BenchmarkOptions(dataset="tcga_brca"), 0, tmp_path)
    train = data.site_train("northeast").drop(columns="site", errors="ignore")
    hold = data.holdout.drop(columns="site").astype(float)
    scores: dict[str, list[float]] = {"gain 1": [], "automatic": []}
    for seed in range(6):
        for name, gain in (("gain 1", 1.0), ("automatic", True)):
            model = TVAE(data.schema, seed=seed, condition_skip=gain)
            model.fit(train, epochs=200, sample_rate=1.0, epsilon=3.0,
                      randomness=DPRandomness.reproducible(seed))
            synthetic = model.sample(len(train), seed=1).astype(float)
            keep = [c for c in synthetic.columns if synthetic[c].std() > 0]
            cox = CoxPHFitter(penalizer=0.01).fit(synthetic[keep], "T", "E")
            risk = cox.predict_partial_hazard(hold[cox.params_.index]).to_numpy()
            scores[name].append(concordance_index(hold["T"], -risk, hold["E"]))
    plain, gained = (float(np.median(scores[k])) for k in ("gain 1", "automatic"))
    assert gained >= 0.60 and gained - plain >= 0.04, scores


def test_tvae_time_path_noise_does_not_set_the_times_level():
    """The time map reads each input's deviation from what the decoder expects for the
    event value, so a shift common to its weights (what DP noise on weights that act as
    a bias does) leaves the synthetic times' level in place; read raw, the same shift
    moves the deaths' median time by years."""
    schema, _ = load_site_frames("tcga_brca")

    def medians(model: TVAE) -> np.ndarray:
        rows = model.sample(2000, seed=1).astype(float)
        return np.array([rows["T"][rows["E"] == e].median() for e in (0, 1)])

    def shift_moves(model: TVAE) -> np.ndarray:
        before = medians(model)
        with torch.no_grad():
            model.net.time_skip.weight.add_(0.05)
        return np.abs(medians(model) - before)

    def loaded(model: TVAE) -> TVAE:  # its initial weights, sampled as a loaded state
        model.load_state_dict(model.state_dict())
        return model

    centred = shift_moves(loaded(TVAE(schema, seed=0)))
    raw = loaded(TVAE(schema, seed=0))
    raw.centre_time_path = lambda: None  # the map reads the raw row, as before
    moved = shift_moves(raw)
    assert np.all(centred < 100), centred  # days
    assert np.all(moved > 1000), moved
