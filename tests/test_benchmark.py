"""The benchmark machinery on the real heart-disease hospitals, without Ray or SDV.

- the independent-marginals baseline keeps every column's distribution and destroys
  the relation between columns (what makes it the bar for "learnt the joint");
- the adapter that feeds external packages maps the typed table there and back intact;
- a two-setting benchmark (federated DP, plaintext and CKKS-encrypted) through the real
  ServerApp and ClientApp in process writes a consistent table: epsilon per site is
  what each site's own ledger says, encryption costs bytes and not quality;
- bad options end with one message, exit 2, and no output folder;
- every Opacus grad-sample mode the throughput part times is checked against `hooks`.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fedsynth.cli import main
from fedsynth.client.site import SiteState
from fedsynth.common.schema import Schema
from fedsynth.simulations.benchmark import BenchmarkOptions, run_benchmark
from fedsynth.simulations.benchmark_baselines import (
    from_plain,
    independent_marginals,
    to_plain,
)
from fedsynth.simulations.splits import pooled_split

# Ray, the deployment engine or a whole study: the slow tier (pytest -m 'not slow').
pytestmark = pytest.mark.slow

FED = "tvae/federated/eps3"
FED_CKKS = "tvae/federated/eps3/ckks"


@pytest.fixture(scope="module")
def pooled(heart_schema: Schema) -> pd.DataFrame:
    train, _ = pooled_split(heart_schema)
    return train


def test_independent_marginals_keep_columns_and_kill_correlation(pooled, heart_schema):
    synthetic = independent_marginals(pooled, heart_schema, n=6000, seed=1)
    for column in heart_schema.columns:
        real, syn = pooled[column.name], synthetic[column.name]
        assert abs(real.isna().mean() - syn.isna().mean()) < 0.03, column.name
        if column.is_numeric:
            ks = stats.ks_2samp(real.dropna().astype(float), syn.dropna().astype(float))
            assert ks.statistic < 0.05, column.name
        else:
            p = real.astype(str).value_counts(normalize=True)
            q = syn.astype(str).value_counts(normalize=True)
            tvd = 0.5 * sum(abs(p.get(k, 0) - q.get(k, 0)) for k in set(p.index) | set(q.index))
            assert tvd < 0.05, column.name

    def corr(frame: pd.DataFrame) -> float:
        both = frame[["age", "thalach"]].dropna().astype(float)
        return float(np.corrcoef(both["age"], both["thalach"])[0, 1])

    assert corr(pooled) < -0.3  # older patients reach a lower maximum heart rate
    assert abs(corr(synthetic)) < 0.05


def test_external_package_layout_round_trips(pooled, heart_schema):
    plain, discrete = to_plain(pooled, heart_schema)
    assert not plain.isna().any().any()  # the packages get no NaN
    assert "chol__missing" in discrete and "cp" in discrete and "age" not in discrete
    back = from_plain(plain, heart_schema)
    for column in heart_schema.columns:
        a, b = pooled[column.name], back[column.name]
        assert (a.isna() == b.isna()).all(), column.name
        if column.is_numeric:
            assert np.allclose(a.dropna().astype(float), b.dropna().astype(float))
        else:
            assert [str(v) for v in a.dropna()] == [str(v) for v in b.dropna()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    opts = BenchmarkOptions(
        generators=("tvae",),
        epsilons=(3.0,),
        seeds=1,
        rounds=2,
        local_epochs=2,
        baselines=("independent",),
        areas=("fidelity", "privacy"),
        only=(FED, FED_CKKS),
        out=out,
        keep_work=True,
        command="pytest tiny run",
    )
    result = run_benchmark(opts)
    return {"out": out, "result": result}


def test_tiny_benchmark_writes_a_consistent_table(tiny_run):
    out: Path = tiny_run["out"]
    with (out / "results.csv").open() as fh:
        rows = {r["setting"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {FED, FED_CKKS}
    for key, row in rows.items():
        eps = json.loads(row["epsilon_sites"])
        assert set(eps) == {"cleveland", "hungarian", "switzerland", "va"}
        study = f"bench-{key.replace('/', '-')}-s0"
        for site, value in eps.items():
            path = (out / "work" / "seed-0" / key.replace("/", "_") / "site-state" / site
                    / "site-ledger.json")
            saved = SiteState.from_record(json.loads(path.read_text()))
            assert saved.study_id == study
            ledger = saved.ledger
            assert value == pytest.approx(ledger.epsilon(1e-5), rel=1e-9)
            assert 0 < value <= 3.0
        assert float(row["epsilon_max_site"]) == pytest.approx(max(eps.values()))
        assert int(row["rounds"]) == 2 and 0 <= float(row["fidelity"]) <= 1
        assert float(row["peak_rss_mb"]) > 0 and float(row["wall_s"]) > 0
    plain, sealed = rows[FED], rows[FED_CKKS]
    # ciphertexts are several times the float32 weights (2.5 on this tiny model; 7.5 on
    # the default one, benchmarks/deep-spread/ckks-grid-results.md: 1.60 MiB / 217 KiB)
    assert float(sealed["bytes_per_round"]) > 2 * float(plain["bytes_per_round"])
    # both studies encode on the sites' DP quantile grid: in clear from the sites'
    # releases, under CKKS from the sum one site decrypted (docs/privacy.md)
    from fedsynth.common.generators import Generator
    from fedsynth.common.generators.base import GRID_PARAM

    for key in (FED, FED_CKKS):
        model = out / "work" / "seed-0" / key.replace("/", "_") / "model.fsg"
        assert Generator.read_meta(model)["hparams"][GRID_PARAM], key
    md = (out / "results.md").read_text()
    assert "pytest tiny run" in md and f"`{FED}`" in md and f"`{FED_CKKS}`" in md
    for png in ("quality_vs_epsilon.png", "wall_time.png"):
        assert (out / png).stat().st_size > 1000


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--seeds", "0"], "--seeds"),
        (["--generators", "gan9"], "gan9"),
        (["--epsilons", "3,-1"], "--epsilons"),
        (["--dataset", "nowhere"], "nowhere"),
        (["--only", "tvae/federated/eps7"], "--only"),
        (["--alone-sites", "-1"], "--alone-sites"),
    ],
)
def test_bad_options_exit_2_and_write_nothing(tmp_path, capsys, argv, words):
    out = tmp_path / "never"
    assert main(["benchmark", "--out", str(out), "--generators", "tvae", *argv]) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()


def test_every_opacus_mode_is_checked_against_hooks(pooled, heart_schema):
    """The throughput part keeps only exact modes: each is compared with the trainer's."""
    from fedsynth.common.generators import TVAE
    from fedsynth.simulations.benchmark_cost import MODES, grad_sample_modes

    model = TVAE(heart_schema, seed=0)
    rows = grad_sample_modes(model, model.encoder.encode(pooled.iloc[:200]), repeats=1, seed=0)
    by_mode = {r["mode"]: r for r in rows}
    assert set(by_mode) == set(MODES)
    assert by_mode["hooks"]["max_relative_error_vs_hooks"] == 0.0
    for mode in ("ew", "ghost", "bookkeeping"):  # the modes that apply to a plain MLP
        assert by_mode[mode]["ok"] and by_mode[mode]["exact"], by_mode[mode]
        assert by_mode[mode]["max_relative_error_vs_hooks"] < 1e-4


def test_without_sdv_only_the_sdv_baselines_are_skipped(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    import fedsynth.simulations.benchmark as bench

    monkeypatch.setattr(bench, "sdv_missing", lambda: "sdv not installed: skipped")
    out = tmp_path / "nosdv"
    buffer = io.StringIO()
    opts = BenchmarkOptions(
        generators=("tvae",), seeds=1, baselines=("independent", "sdv_gaussian_copula"),
        areas=("fidelity",), only=("baseline/independent",), out=out, ray_check=False,
    )
    run_benchmark(opts, Console(file=buffer, width=200))
    assert "sdv not installed: skipped" in buffer.getvalue()
    with (out / "results.csv").open() as fh:
        assert [r["setting"] for r in csv.DictReader(fh)] == ["baseline/independent"]
    assert "sdv not installed: skipped" in (out / "results.md").read_text()


def test_quick_trains_four_sites_alone_spread_over_the_sizes():
    """AMLSG's 18 centres: --quick runs 4 alone spread over the sizes, the full run every
    one; heart disease's 4 hospitals all train alone either way; federated settings
    always use every site."""
    from fedsynth.simulations.benchmark import plan_settings

    rows = {f"centre_{i}": n for i, n in enumerate([71, 70, 34, 27, 42, 26, 46, 70, 38,
                                                    57, 56, 35, 48, 53, 90, 30, 155, 284])}
    quick = plan_settings(BenchmarkOptions.quick_defaults(generators=("tvae",)),
                          list(rows), rows)
    alone = [s.site for s in quick if s.kind == "local"]
    assert alone == ["centre_5", "centre_4", "centre_9", "centre_17"]  # 26, 42, 57, 284 rows
    four = {"a": 10, "b": 20, "c": 30, "d": 40}
    assert [s.site for s in plan_settings(BenchmarkOptions.quick_defaults(
        generators=("tvae",)), list(four), four) if s.kind == "local"] == list(four)
    full = plan_settings(BenchmarkOptions(generators=("tvae",)), list(rows), rows)
    assert sorted(s.site for s in full if s.kind == "local") == sorted(rows)
    assert [s.key for s in quick if s.kind == "federated"] == \
        [s.key for s in full if s.kind == "federated"]


def test_quick_runs_ctgan_package_on_batches_of_at_most_the_rows(monkeypatch, pooled,
                                                                  heart_schema):
    """--quick gives the ctgan package's CTGAN batches of the training rows (a multiple of
    its pac of 10, at most its default 500) and says so; the full run keeps 500."""
    import types

    from fedsynth.simulations import benchmark_baselines as bb

    assert [bb.quick_batch(n) for n in (3, 80, 87, 499, 920)] == [10, 80, 80, 490, 500]
    assert BenchmarkOptions.quick_defaults().baseline_batch == "rows"
    assert BenchmarkOptions().baseline_batch == "package"
    seen = {}

    class Stop(Exception):
        pass

    class FakeCTGAN:
        def __init__(self, **kw):
            seen.update(kw)
            raise Stop

    # the package itself is a benchmark extra, not a test dependency: a stand-in module
    fake = types.ModuleType("ctgan")
    fake.CTGAN, fake.TVAE = FakeCTGAN, FakeCTGAN
    monkeypatch.setitem(sys.modules, "ctgan", fake)
    monkeypatch.setattr(bb, "sdv_missing", lambda: "")
    with pytest.raises(Stop):
        bb.run_baseline("sdv_ctgan", pooled.head(80), heart_schema, 80, 0, 50, batch_rows=True)
    assert seen == {"epochs": 50, "batch_size": 80}
    seen.clear()
    with pytest.raises(Stop):
        bb.run_baseline("sdv_ctgan", pooled.head(80), heart_schema, 80, 0, 50)
    assert seen == {"epochs": 50}
