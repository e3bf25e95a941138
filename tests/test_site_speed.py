"""What keeps a deployed round cheap, without changing what a round does.

Flower 1.41 starts a new ClientApp process per message, so what a round needs must be
quick to get in a fresh process: the encoded table comes from the site's state-dir
(keyed by the file's bytes), a training round does not import the validation suite,
and torch runs with the site's thread count.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedsynth.client import site as site_module
from fedsynth.client.site import ENCODED_PREFIX, load_encoded
from fedsynth.common.study import SiteConfig
from fedsynth.common.table import TableCheckError
from fedsynth.common.threads import ENV_VAR, NODE_KEY, site_threads, torch_threads


def test_encoded_table_is_kept_in_state_dir_by_file_hash(tmp_path, heart_schema,
                                                        heart_schema_path, heart_files,
                                                        monkeypatch):
    data = tmp_path / "site.csv"
    shutil.copy(heart_files["cleveland"], data)
    site = SiteConfig("cleveland", str(data), str(heart_schema_path),
                      state_dir=str(tmp_path / "state"))
    site_module._TABLES.clear()
    first = load_encoded(site, heart_schema)
    cached = list((tmp_path / "state").glob(f"{ENCODED_PREFIX}*.npy"))
    assert len(cached) == 1 and cached[0].stat().st_mode & 0o077 == 0  # owner-only

    # a new process (empty memory) reads the array, never the table
    site_module._TABLES.clear()
    monkeypatch.setattr(site_module, "read_table", lambda *a: pytest.fail("table re-read"))
    again = load_encoded(site, heart_schema)
    np.testing.assert_array_equal(first, again)
    monkeypatch.undo()

    # a changed file is a new key: checked and encoded again, the stale copy removed
    data.write_text("".join(heart_files["cleveland"].read_text().splitlines(True)[:50]))
    site_module._TABLES.clear()
    changed = load_encoded(site, heart_schema)
    assert changed.shape[0] == 50
    now = list((tmp_path / "state").glob(f"{ENCODED_PREFIX}*.npy"))
    assert len(now) == 1 and now != cached

    # a broken file is refused every time, and nothing is cached for it
    data.write_text(data.read_text().replace("63.0", "630.0", 1))
    site_module._TABLES.clear()
    with pytest.raises(TableCheckError):
        load_encoded(site, heart_schema)
    assert list((tmp_path / "state").glob(f"{ENCODED_PREFIX}*.npy")) == now


def test_a_training_round_does_not_import_the_validation_suite():
    code = ("import sys, fedsynth.client.app; "
            "print(any(m.startswith('fedsynth.common.validation') for m in sys.modules), "
            "'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.split() == ["False", "False"]


def test_site_threads_setting(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert site_threads({}) == 1
    monkeypatch.setenv(ENV_VAR, "1")
    assert site_threads({}) == 1
    assert site_threads({NODE_KEY: 10_000}) == len(os.sched_getaffinity(0))  # capped
    for bad in (0, -2, "two", 1.5):
        with pytest.raises(ValueError, match=NODE_KEY):
            site_threads({NODE_KEY: bad})
    monkeypatch.setenv(ENV_VAR, "lots")
    with pytest.raises(ValueError, match=ENV_VAR):
        site_threads({})
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# ------------------------------------------------------------ the secure-mode noise

SMALL = {"tvae": {"hidden": 16, "latent": 4},
         "ctgan": {"d_hidden": 16, "g_hidden": 16, "fake_batch": 8},
         "ddpm": {"hidden": 16}}


def test_secure_noise_is_four_draws_halved_after_a_throwaway():
    """Each value is the sum of four N(0, std^2) draws from the given generator, halved,
    after one discarded draw: Opacus' secure_mode arithmetic (arXiv:2107.10138, n = 2)."""
    from fedsynth.common.privacy.secure_noise import DRAWS, secure_gaussian

    std, n = 1.7, 1_003
    got = secure_gaussian(std, n, torch.Generator().manual_seed(42))
    replay = torch.Generator().manual_seed(42)
    torch.normal(0.0, std, (1, 1), generator=replay)
    draws = torch.normal(0.0, std, (DRAWS, n), generator=replay)
    assert DRAWS == 4 and got.shape == (n,) and got.dtype == torch.float32
    assert torch.equal(got, draws.sum(dim=0) / 2)
    # the four rows are distinct draws, not one draw repeated
    assert not torch.equal(draws[0], draws[1])


def test_secure_noise_has_the_calibrated_spread():
    """The noise is N(0, std^2): the accountant's calibration depends on it."""
    from scipy import stats

    from fedsynth.common.privacy.secure_noise import secure_gaussian

    std = 0.8
    noise = secure_gaussian(std, 400_000, torch.Generator().manual_seed(7)).double().numpy()
    assert abs(noise.mean()) < 0.01 and abs(noise.std() / std - 1) < 0.01
    assert abs(stats.kurtosis(noise)) < 0.05  # Gaussian tails, as one N(0, std^2) draw
    assert stats.kstest(noise / std, "norm").pvalue > 1e-3


@pytest.mark.parametrize("generator", ["tvae", "ctgan", "ddpm"])
@pytest.mark.parametrize("mode", ["hooks", "ghost", "bookkeeping"])
def test_a_dp_step_adds_secure_noise_to_opacus_clipped_sum(mode, generator, heart_schema,
                                                           heart_files):
    """One trainer step on real heart rows: the update is Opacus' own clipped sum (its
    optimizer with no noise, after its own ``loss.backward()`` or
    ``DPTensorFastGradientClipping.backward()``; for book-keeping, Opacus' per-sample
    clipping in hooks mode) plus ``secure_gaussian`` of the gradient-noise generator,
    parameter by parameter in order; nothing else changed."""
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer_fast_gradient_clipping import (
        DPOptimizerFastGradientClipping,
    )
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    from fedsynth.common.encoding import TabularEncoder
    from fedsynth.common.generators import get_generator
    from fedsynth.common.privacy import DPSettings, PrivacyLedger, train_round, trainer
    from fedsynth.common.privacy.randomness import DPRandomness
    from fedsynth.common.privacy.secure_noise import secure_gaussian
    from fedsynth.common.table import read_table

    data = TabularEncoder(heart_schema).encode(
        read_table(heart_files["cleveland"], heart_schema).head(60))
    sigma, clip = 0.9, 0.5

    def step(noise: float, opacus_noise: bool, mode: str = mode) -> torch.Tensor:
        torch.set_num_threads(1)
        model = get_generator(generator)(heart_schema, seed=1, **SMALL[generator])
        grads: list[torch.Tensor] = []
        model.after_private_step = lambda m: grads.extend(  # type: ignore[method-assign]
            p.grad.detach().flatten().clone() for p in model.private_module().parameters())
        patch = pytest.MonkeyPatch()
        if opacus_noise:  # Opacus end to end: its optimizers and its backward passes
            patch.setattr(trainer, "SecureNoiseDPOptimizer", DPOptimizer)
            patch.setattr(trainer, "SecureNoiseGhostOptimizer",
                          DPOptimizerFastGradientClipping)
            patch.setattr(trainer, "hooks_backward", lambda losses, _: losses.sum().backward())
            patch.setattr(trainer, "ghost_backward", lambda m, o, losses, _:
                          DPTensorFastGradientClipping(m, o, losses, "sum").backward())
        try:
            train_round(model, data, epochs=1, sample_rate=1.0,
                        dp=DPSettings(noise, clip), ledger=PrivacyLedger(),
                        randomness=DPRandomness.reproducible(3, "noise-test"), mode=mode)
        finally:
            patch.undo()
        return torch.cat(grads) * len(data)  # undo the division by the expected batch

    # Opacus' clipping, no noise at all
    clipped = step(0.0, opacus_noise=True, mode="hooks" if mode == "bookkeeping" else mode)
    noisy = step(sigma, opacus_noise=False)
    generator = DPRandomness.reproducible(3, "noise-test").torch("gradient-noise")
    expected = secure_gaussian(sigma * clip, clipped.numel(), generator)
    assert torch.allclose(noisy - clipped, expected, rtol=0, atol=1e-4)
    assert float(expected.std()) > 10 * 1e-4  # the check is not vacuous
