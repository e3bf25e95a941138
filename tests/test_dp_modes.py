"""Opacus' clipping modes are one mechanism: same clipped, noised update, same ledger.

The trainer picks hooks or ghost clipping for speed (``trainer.pick_mode``). That is
only allowed if the choice changes nothing a site releases: with the noise fixed
(``DPRandomness.reproducible``), one DP-SGD step of every generator must produce the
same noisy gradient, the same weights and the same ledger entries in every mode, on
real rows (heart and the 1,241 codes of the MIMIC-III demo).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsynth.common.encoding import TabularEncoder
from fedsynth.common.generators import get_generator
from fedsynth.common.privacy import DPSettings, PrivacyLedger, train_round
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.privacy.trainer import GHOST_CROSSOVER, MODES, pick_mode
from fedsynth.simulations.datasets import load_site_frames

GENERATORS = ("tvae", "ctgan", "ddpm")
SMALL = {"tvae": {"hidden": 32, "latent": 8},
         "ctgan": {"d_hidden": 32, "g_hidden": 32, "fake_batch": 16},
         "ddpm": {"hidden": 32}}


@pytest.fixture(scope="module")
def encoded() -> dict[str, tuple]:
    out = {}
    for name, rows in (("heart_disease", 120), ("mimic3_demo", 40)):
        schema, frames = load_site_frames(name)
        frame = next(iter(frames.values())).head(rows)
        out[name] = (schema, TabularEncoder(schema).encode(frame))
    return out


def one_step(generator: str, schema, data: np.ndarray, mode: str, sample_rate: float):
    """One DP-SGD step in ``mode``: the noisy gradient, the new weights, the ledger."""
    torch.set_num_threads(1)
    model = get_generator(generator)(schema, seed=3, **SMALL[generator])
    seen: list[list[torch.Tensor]] = []
    after = model.after_private_step

    def record(private: torch.nn.Module) -> None:  # runs right after the noisy step
        seen.append([p.grad.detach().clone() for p in model.private_module().parameters()])
        after(private)

    model.after_private_step = record  # type: ignore[method-assign]
    ledger = PrivacyLedger()
    stats = train_round(model, data, epochs=1, sample_rate=sample_rate,
                        dp=DPSettings(noise_multiplier=0.7, max_grad_norm=0.5),
                        ledger=ledger, randomness=DPRandomness.reproducible(11, "mode-test"),
                        mode=mode)
    state = model.private_module().state_dict()
    steps = int(round(1 / sample_rate))
    weights = {k: v.clone() for k, v in state.items()}
    return seen[:1], weights, list(ledger.history), stats.steps, steps


@pytest.mark.parametrize("dataset", ["heart_disease", "mimic3_demo"])
@pytest.mark.parametrize("generator", GENERATORS)
def test_every_mode_releases_the_same_step(encoded, generator, dataset):
    schema, data = encoded[dataset]
    sample_rate = 1.0  # one step: the whole update is one clipped, noised sum
    runs = {mode: one_step(generator, schema, data, mode, sample_rate) for mode in MODES}
    ref_grads, ref_state, ref_ledger, ref_steps, _ = runs["hooks"]
    assert ref_steps == 1 and ref_ledger == [(0.7, 1.0, 1)]
    # the noise is larger than the clipped sum's error, so agreement means same noise
    noise_scale = max(float(g.abs().max()) for g in ref_grads[0])
    assert noise_scale > 0
    for mode, (grads, state, ledger, steps, _) in runs.items():
        assert ledger == ref_ledger and steps == ref_steps, mode
        for g, r in zip(grads[0], ref_grads[0], strict=True):
            # each noisy gradient entry agrees to float rounding (1e-5 of the largest)
            assert torch.allclose(g, r, rtol=0, atol=1e-5 * noise_scale), mode
        for key, value in state.items():
            assert torch.allclose(value, ref_state[key], rtol=0, atol=1e-6), (mode, key)


def test_modes_agree_on_empty_and_sampled_batches(encoded):
    """Poisson batches (q = 0.05 of 25 rows: many steps have 0-2 rows) in both modes:
    same steps, same ledger, same weights at the end of the round."""
    schema, data = encoded["mimic3_demo"]
    runs = {mode: one_step("tvae", schema, data, mode, 0.05) for mode in MODES}
    (_, ref_state, ref_ledger, ref_steps, expected) = runs["hooks"]
    assert ref_steps == expected == 20 and ref_ledger == [(0.7, 0.05, 20)]
    _, state, ledger, steps, _ = runs["ghost"]
    assert ledger == ref_ledger and steps == ref_steps
    for key, value in state.items():
        assert torch.allclose(value, ref_state[key], rtol=0, atol=1e-5), key


def test_pick_mode_follows_the_crossover():
    small = torch.nn.Linear(10, 10)  # 110 parameters
    assert pick_mode(small, 10) == "hooks"
    assert pick_mode(small, GHOST_CROSSOVER / 110 + 1) == "ghost"
    with pytest.raises(ValueError, match="mode must be"):
        train_round(get_generator("tvae").__new__(get_generator("tvae")), np.zeros((2, 2)),
                    epochs=1, sample_rate=1.0, dp=None, ledger=None,
                    randomness=DPRandomness.reproducible(0), mode="functorch")


def test_a_sites_accounting_does_not_depend_on_the_mode(monkeypatch, heart_schema,
                                                        heart_schema_path, heart_files):
    """Two rounds of a real site (calibrated noise, count release, DP-SGD steps, loss
    report), once forced to hooks and once to ghost clipping: the same noise multiplier,
    steps, ledger entries and reported epsilon, and the same noisy update."""
    from fedsynth.client.site import SiteState, train_site
    from fedsynth.common.privacy import trainer
    from fedsynth.common.study import SiteConfig, StudyConfig, schema_fingerprint

    site = SiteConfig("cleveland", str(heart_files["cleveland"]), str(heart_schema_path),
                      epsilon=3.0, delta=1e-5, reproducible_noise_seed=5)
    study = StudyConfig(num_server_rounds=2, local_epochs=2, sample_rate=0.5,
                        generator_params={"hidden": 16, "latent": 4})
    start = get_generator("tvae")(heart_schema, seed=0, hidden=16, latent=4).state_dict()
    runs = {}
    for mode in MODES:
        monkeypatch.setattr(trainer, "pick_mode", lambda *a, mode=mode: mode)
        state, replies = SiteState(), []
        for r in (1, 2):
            replies.append(train_site(site, study, schema_fingerprint(heart_schema), start,
                                      state, r))
        runs[mode] = (replies, list(state.ledger.history))
    (hooks, hooks_ledger), (ghost, ghost_ledger) = runs["hooks"], runs["ghost"]
    assert ghost_ledger == hooks_ledger and len(hooks_ledger) >= 2
    for h, g in zip(hooks, ghost, strict=True):
        assert h.status == g.status == "trained"
        for key in ("noise-multiplier", "steps", "epsilon", "num-examples"):
            assert g.metrics[key] == h.metrics[key], key
        for key, value in h.arrays.items():
            np.testing.assert_allclose(g.arrays[key], value, rtol=0, atol=1e-4, err_msg=key)
