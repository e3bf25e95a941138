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
    """Poisson batches (q = 0.05 of 40 rows: many steps have 0-2 rows) in every mode:
    same steps, same ledger, same weights at the end of the round."""
    schema, data = encoded["mimic3_demo"]
    runs = {mode: one_step("tvae", schema, data, mode, 0.05) for mode in MODES}
    (_, ref_state, ref_ledger, ref_steps, expected) = runs["hooks"]
    assert ref_steps == expected == 20 and ref_ledger == [(0.7, 0.05, 20)]
    for mode in MODES:
        _, state, ledger, steps, _ = runs[mode]
        assert ledger == ref_ledger and steps == ref_steps, mode
        for key, value in state.items():
            assert torch.allclose(value, ref_state[key], rtol=0, atol=1e-5), (mode, key)


def test_pick_mode_takes_bookkeeping_where_it_applies():
    """Book-keeping wherever every trainable layer has an exact per-sample formula (all
    bundled generators); the ghost/hooks crossover only for a module it cannot clip."""
    small = torch.nn.Linear(10, 10)  # 110 parameters
    assert pick_mode(small, 10) == pick_mode(small, 1e9) == "bookkeeping"
    for name in GENERATORS:
        schema = load_site_frames("heart_disease")[0]
        assert pick_mode(get_generator(name)(schema).private_module(), 1) == "bookkeeping"
    odd = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.PReLU())  # 111 parameters
    assert pick_mode(odd, 10) == "hooks"
    assert pick_mode(odd, GHOST_CROSSOVER / 111 + 1) == "ghost"
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


# ------------------------------------------------- book-keeping beyond the generators

class _Mixed(torch.nn.Module):
    """Layers the bundled generators do not have: a LayerNorm (Opacus' grad sampler), a
    linear layer called twice per sample, one on a sequence, and a frozen bias."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(width, 12)
        self.norm = torch.nn.LayerNorm(12)
        self.shared = torch.nn.Linear(12, 12)
        self.seq = torch.nn.Linear(4, 3)
        self.out = torch.nn.Linear(12 + 9, 1)
        self.out.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.inp(x)))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))  # the same layer twice
        s = self.seq(h[:, :12].reshape(-1, 3, 4)).reshape(len(x), 9)  # 3 steps per sample
        return self.out(torch.cat([h, s], 1)).squeeze(1)


def test_bookkeeping_clips_like_opacus_hooks_beyond_linear_layers(encoded):
    """On real heart rows, a module with a LayerNorm, a layer used twice, a sequence
    input and a frozen parameter: book-keeping's clipped sum equals Opacus' per-sample
    clipping (GradSampleModule + DPOptimizer without noise), whichever samples clip."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from fedsynth.common.privacy.bookkeeping import BookKeeping

    _, data = encoded["heart_disease"]
    x = torch.as_tensor(data[:50], dtype=torch.float32)
    clip = 4.5  # per-sample norms here are 3.8-5.6
    torch.manual_seed(0)
    net = _Mixed(x.shape[1])

    def losses(module: torch.nn.Module) -> torch.Tensor:
        return (module(x) - 1.0).pow(2)

    wrapped = GradSampleModule(net, loss_reduction="sum", strict=True)
    opt = DPOptimizer(torch.optim.SGD(wrapped.parameters(), lr=0.0), noise_multiplier=0.0,
                      max_grad_norm=clip, expected_batch_size=1, loss_reduction="sum")
    losses(wrapped).sum().backward()
    norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1)
                         for p in net.parameters() if p.requires_grad]).norm(dim=0)
    assert (norms > clip).any() and (norms < clip).any()  # some samples clipped, some not
    opt.pre_step()
    reference = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    wrapped._close()
    for p in net.parameters():
        p.grad = None

    keeper = BookKeeping(net, clip)
    with keeper.recording():
        loss = losses(net)
    net(x)  # a forward outside recording does not enter the clip
    keeper.clip_into_grad(loss)
    keeper.remove_hooks()
    assert net.out.bias.grad is None  # frozen: untouched
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, reference[name], rtol=1e-5, atol=1e-6), name


def test_bookkeeping_refuses_layers_it_cannot_clip():
    from fedsynth.common.privacy.bookkeeping import BookKeeping

    for odd, name in ((torch.nn.PReLU(), "PReLU"), (torch.nn.BatchNorm1d(4), "BatchNorm1d")):
        with pytest.raises(ValueError, match=rf"1 \({name}\).*mode='hooks'"):
            BookKeeping(torch.nn.Sequential(torch.nn.Linear(4, 4), odd), 1.0)
    tied = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    tied[1].weight = tied[0].weight  # one parameter in two layers
    with pytest.raises(ValueError, match=r"0 \(Linear\), 1 \(Linear\)"):
        BookKeeping(tied, 1.0)
    assert pick_mode(tied, 10) == "hooks"


def test_bookkeeping_refuses_an_output_changed_in_place():
    """A ReLU(inplace=True) after a linear layer overwrites the output it kept: its
    gradient would not be the layer's, so the clip would be wrong; refused, not run."""
    from fedsynth.common.privacy.bookkeeping import BookKeeping

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(inplace=True),
                              torch.nn.Linear(4, 1))
    keeper = BookKeeping(net, 1.0)
    with keeper.recording():
        losses = net(torch.randn(5, 4)).squeeze(1)
    with pytest.raises(ValueError, match="modified in place.*inplace=False"):
        keeper.clip_into_grad(losses)
    net[1].inplace = False
    with keeper.recording():
        losses = net(torch.randn(5, 4)).squeeze(1)
    keeper.clip_into_grad(losses)
    assert all(p.grad is not None for p in net.parameters())
