"""The TVAE behind the generator interface: state, save/load, conditional sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsynth.cli import main
from fedsynth.common.generators import TVAE, ConditionError, Generator, ModelFileError
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.schema import Schema
from fedsynth.common.table import conform, read_table


@pytest.fixture(scope="module")
def fitted(heart_schema: Schema, heart_files) -> TVAE:
    frame = read_table(heart_files["cleveland"], heart_schema)
    return TVAE(heart_schema, seed=3, hidden=32, latent=8).fit(
        frame, epochs=3, epsilon=5.0, randomness=DPRandomness.reproducible(3)
    )


def test_fit_under_dp_reports_its_epsilon(fitted: TVAE) -> None:
    assert 4.9 < fitted.fit_info["epsilon"] <= 5.0


def test_central_fit_releases_the_histogram_as_a_site_does(
    fitted: TVAE, heart_schema: Schema, heart_files
) -> None:
    """Central training makes the same count release as a site (same noise, same
    seed), so the outcome frequencies it samples from are those of the DP histogram,
    and the budget above covers histogram and training together."""
    from fedsynth.common.generators.base import release_histogram

    encoded = fitted.encoder.encode(read_table(heart_files["cleveland"], heart_schema))
    rng = DPRandomness.reproducible(3).release("count-release")
    hist = np.clip(release_histogram(fitted, encoded, 10.0, rng), 0.0, None)
    np.testing.assert_allclose(fitted.cond_prior.freq.numpy(), hist / hist.sum(), rtol=1e-6)


def test_samples_conform_to_schema(fitted: TVAE, heart_schema: Schema) -> None:
    frame = fitted.sample(300, seed=1)
    assert len(frame) == 300 and list(frame.columns) == heart_schema.names
    conform(frame, heart_schema)  # raises if any value is outside the schema


def test_conditional_sampling_is_exact(fitted: TVAE) -> None:
    rows = fitted.sample(40, conditions={"sex": 0, "num": 1}, seed=2)
    assert len(rows) == 40
    assert set(rows["sex"]) == {0} and set(rows["num"]) == {1}


def test_impossible_condition_is_refused(fitted: TVAE) -> None:
    with pytest.raises(ConditionError, match="categories"):
        fitted.sample(5, conditions={"cp": 9})
    with pytest.raises(ConditionError, match="domain"):
        fitted.sample(5, conditions={"age": 200})
    with pytest.raises(ConditionError, match="never missing"):
        fitted.sample(5, conditions={"sex": None})


def test_state_is_one_flat_prefixed_dict(fitted: TVAE, heart_schema: Schema) -> None:
    state = fitted.state_dict()
    assert all(k.startswith(("vae.", "cond.")) for k in state)
    assert list(state).count("cond.freq") == 1  # the condition's DP frequencies
    # the quantile grid, like the architecture, is a hyperparameter, not state
    other = TVAE(heart_schema, seed=99, **fitted.hparams)
    other.load_state_dict(state)
    a, b = fitted.sample(50, seed=5), other.sample(50, seed=5)
    pd.testing.assert_frame_equal(a, b)
    bad = dict(state)
    bad[next(iter(bad))] = np.full_like(bad[next(iter(bad))], np.nan)
    with pytest.raises(ValueError, match="NaN"):
        other.load_state_dict(bad)


def test_save_load_and_cli_sample(fitted: TVAE, tmp_path: Path, capsys) -> None:
    path = tmp_path / "model.fsg"
    fitted.save(path)
    loaded = Generator.load(path)
    pd.testing.assert_frame_equal(fitted.sample(20, seed=4), loaded.sample(20, seed=4))
    out = tmp_path / "syn.csv"
    assert main(["sample", "--model", str(path), "-n", "25", "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 25
    assert main(["sample", "--model", str(path), "-n", "5", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_corrupt_model_file(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "model.fsg"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="corrupt"):
        Generator.load(bad)
    out = tmp_path / "s.csv"
    assert main(["sample", "--model", str(bad), "-n", "5", "--out", str(out)]) == 2
    assert not out.exists()
    assert "corrupt" in capsys.readouterr().err


def test_balanced_cohort(fitted: TVAE, tmp_path: Path) -> None:
    frame = fitted.sample_balanced(101, "sex", seed=7)
    assert len(frame) == 101
    assert sorted(frame["sex"].value_counts().tolist()) == [50, 51]
    path = tmp_path / "model.fsg"
    fitted.save(path)
    out = tmp_path / "balanced.csv"
    assert main(["sample", "--model", str(path), "-n", "60", "--balance", "num",
                 "--out", str(out)]) == 0
    assert pd.read_csv(out)["num"].value_counts().tolist() == [12] * 5


def test_decoder_is_conditioned_on_the_outcome(fitted: TVAE, heart_schema: Schema) -> None:
    """The outcome is drawn from the stored DP frequencies and fed to the decoder."""
    assert fitted.statistics_column() == "num"  # the schema's outcome
    freq = fitted.state_dict()["cond.freq"]
    assert freq.shape == (5,) and freq.sum() == pytest.approx(1.0, abs=1e-6)
    other = TVAE(heart_schema, seed=3, hidden=32, latent=8)
    other.load_state_dict(fitted.state_dict())
    other.set_statistics(np.array([0.0, 0.0, 40.0, 0.0, -3.0]))  # noise may go negative
    assert set(other.sample(200, seed=1)["num"]) == {2}
    with pytest.raises(ValueError, match="5 cells"):
        other.set_statistics(np.ones(3))


def test_conditioning_keeps_the_outcome_association(heart_schema: Schema, heart_files) -> None:
    """Asymptomatic chest pain (cp 4) goes with disease in Cleveland; samples keep it."""
    frame = read_table(heart_files["cleveland"], heart_schema)
    # no DP: what is tested is the mechanism (the decoder reads the outcome), not DP's cost
    model = TVAE(heart_schema, seed=0).fit(frame, epochs=40, sample_rate=0.5,
                                           randomness=DPRandomness.reproducible(0))
    real_sick = frame["num"].astype(int) > 0
    real_gap = (frame["cp"][real_sick] == 4).mean() - (frame["cp"][~real_sick] == 4).mean()
    syn = model.sample(2000, seed=1)
    sick = syn["num"].astype(int) > 0
    gap = (syn["cp"][sick] == 4).mean() - (syn["cp"][~sick] == 4).mean()
    assert real_gap > 0.4 and gap > 0.5 * real_gap


def test_condition_choice(heart_schema: Schema) -> None:
    plain = TVAE(heart_schema, condition=None)
    assert plain.statistics_column() is None
    assert all(k.startswith("vae.") for k in plain.state_dict())
    plain.load_state_dict(plain.state_dict())  # sampled as a loaded model
    assert len(plain.sample(10, seed=0)) == 10
    assert TVAE(heart_schema, condition="sex").statistics_column() == "sex"
    with pytest.raises(ValueError, match="categorical or binary"):
        TVAE(heart_schema, condition="age")
    with pytest.raises(ValueError, match="not a column"):
        TVAE(heart_schema, condition="nope")


def test_a_model_that_is_not_a_dp_release_says_so_in_its_file(
    heart_schema: Schema, heart_files, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model file whose noise is replayable, or that was fitted without DP, holds
    statistics of the rows with no DP guarantee; its file must say so, or it passes for
    a release. On the old code both were saved unlabelled: the marginal generator wrote
    ``reproducible_noise`` where ``save`` looked for ``reproducible-noise``, and a fit
    with ``epsilon=None`` (its ``cond.freq`` the exact outcome frequencies) had no label."""
    from fedsynth.common.generators import get_generator
    from fedsynth.common.generators.base import NO_DP_RELEASE
    from fedsynth.common.privacy.randomness import NOT_A_DP_RELEASE

    frame = read_table(heart_files["cleveland"], heart_schema)
    marginal = get_generator("marginal")(heart_schema, seed=3, bins=6, rounds=1, per_round=2,
                                         candidates=6, iters=60)
    marginal.fit(frame, epsilon=3.0, randomness=DPRandomness.reproducible(11))
    marginal.save(tmp_path / "marginal.fsg")
    assert Generator.read_meta(tmp_path / "marginal.fsg").get("privacy") == NOT_A_DP_RELEASE

    exact = TVAE(heart_schema, seed=3, hidden=16, latent=4).fit(frame, epochs=1, epsilon=None)
    exact.save(tmp_path / "exact.fsg")
    assert Generator.read_meta(tmp_path / "exact.fsg").get("privacy") == NO_DP_RELEASE
    # a DP fit with secret noise is a release: no such label
    private = TVAE(heart_schema, seed=3, hidden=16, latent=4).fit(frame, epochs=1, epsilon=3.0)
    private.save(tmp_path / "private.fsg")
    assert "privacy" not in Generator.read_meta(tmp_path / "private.fsg")
    # `fedsynth sample` draws from such a file only with a warning naming its label (on
    # the old code it said nothing); the exit code stays 0
    for name, label in (("marginal", NOT_A_DP_RELEASE), ("exact", NO_DP_RELEASE),
                        ("private", None)):
        assert main(["sample", "--model", str(tmp_path / f"{name}.fsg"), "-n", "5",
                     "--out", str(tmp_path / f"{name}.csv")]) == 0
        err = " ".join(capsys.readouterr().err.split())
        assert (label in err) if label else "not a DP release" not in err, (name, err)
