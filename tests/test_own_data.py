"""A researcher's own multi-site table, not bundled, through `fedsynth simulate`.

AMLSG (GPL-3, ../shared/data only) as a user would bring it: one CSV per centre, or
one CSV with a centre column. Each form runs end to end through the real ServerApp
and ClientApp (in-process engine), small: 3 centres, 2 rounds, 1 epoch at q = 0.1.
Also: every problem of every site at once before anything is written, and no study's
folder is overwritten or left behind by a failing argument.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from fedsynth.cli import main
from fedsynth.common.schema import Schema

from .conftest import BUNDLED, SHARED

AMLSG_SCHEMA = BUNDLED / "amlsg" / "schema.yaml"
SMALL = ["--rounds", "2", "--local-epochs", "1", "--sample-rate", "0.1",
         "--generator-params", '{"hidden": 16, "latent": 4}', "--n-synthetic", "300"]

needs_amlsg = pytest.mark.skipif(not (SHARED / "amlsg").is_dir(),
                                 reason="AMLSG lives in ../shared/data only")


@pytest.fixture(scope="module")
def amlsg_tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three largest AMLSG site groups: one CSV per site, and one table with a
    `centre` column (written as a user's export would be: header, NA for missing)."""
    from fedsynth.simulations.datasets import _amlsg_sites

    schema = Schema.load(AMLSG_SCHEMA)
    sites = _amlsg_sites(schema)
    keep = sorted(sites, key=lambda k: -len(sites[k]))[:3]
    root = tmp_path_factory.mktemp("amlsg-own")
    (root / "by_site").mkdir()
    for name in keep:
        sites[name].to_csv(root / "by_site" / f"{name}.csv", index=False, na_rep="NA")
    whole = pd.concat([sites[k].assign(centre=k) for k in keep], ignore_index=True)
    whole.sample(frac=1.0, random_state=0).to_parquet(root / "amlsg.parquet", index=False)
    return root


def _summary(out: Path) -> dict:
    """What a study wrote: the publishable summary and, beside it, what was computed on
    the real rows (validation figures, verdict), which stays with the data."""
    return {**json.loads((out / "summary.json").read_text()),
            **json.loads((out / "validation.json").read_text())}


def _check_study(out: Path, sites: set[str]) -> dict:
    summary = _summary(out)
    assert set(summary["sites"]) == sites
    assert all(s["rounds_trained"] == 2 for s in summary["sites"].values())
    assert all(0 < s["epsilon"] <= 3.0 for s in summary["sites"].values())
    info = summary["validation"]["metrics"]["info"]
    # survival data is scored with the survival metrics: Kaplan-Meier, Cox, C-index
    assert info["survival"] == ["OS", "death"]
    assert "cox_c_index" in summary["validation"]["headline"]
    verdict = summary["verdict"]
    assert set(verdict["areas"]) >= {"fidelity", "survival", "detection", "privacy"}
    assert all(a["advice"] for a in verdict["areas"].values() if a["verdict"] == "fail")
    report = (out / "report.html").read_text()
    assert "Kaplan-Meier" in report and "Verdict:" in report
    # the report reads as a verdict: budget beside spent, the DP loss explained, raw logs
    # folded into an appendix, the area and the metric "fidelity" named apart
    assert "epsilon budget" in report and "a differential privacy release" in report
    assert '<details class="appendix">' in report and "marginal_similarity" in report
    assert report.count("<figure>") == report.count("<figcaption>") >= 4
    assert len(pd.read_csv(out / "synthetic.csv")) == 300
    return summary


@needs_amlsg
def test_simulate_own_folder_of_site_tables(amlsg_tables: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    code = main(["simulate", "--schema", str(AMLSG_SCHEMA), "--data",
                 str(amlsg_tables / "by_site"), "--out", str(out), *SMALL])
    assert code == 0  # the study ran: exit 0 whatever its verdict
    _check_study(out, {p.stem for p in (amlsg_tables / "by_site").iterdir()})
    console = capsys.readouterr().out
    assert "verdict:" in console and "what to do" in console
    assert "DEPRECATED" not in console  # Flower's banners go to the log
    assert (out / "fedsynth.log").is_file()


@needs_amlsg
def test_simulate_one_table_split_by_site_column(amlsg_tables: Path, tmp_path: Path) -> None:
    out = tmp_path / "study"
    code = main(["simulate", "--schema", str(AMLSG_SCHEMA), "--data",
                 str(amlsg_tables / "amlsg.parquet"), "--site-column", "centre",
                 "--target", "complex_karyotype", "--out", str(out), "--strict", *SMALL])
    summary = _check_study(out, {"other_centres", "centre_43", "centre_34"})
    # --strict: a failing verdict (2 rounds of a tiny model) is exit 1, not 0
    assert code == (0 if summary["verdict"]["passed"] else 1)
    assert summary["validation"]["metrics"]["info"]["target"]["column"] == "complex_karyotype"
    train = pd.read_csv(out / "real" / "train.csv")
    assert "centre" not in train.columns  # the site column is dropped before training


def _bad_sites(tmp_path: Path, heart_files: dict[str, Path]) -> Path:
    folder = tmp_path / "sites"
    folder.mkdir()
    for name in ("cleveland", "va"):
        lines = heart_files[name].read_text().splitlines()
        fields = lines[3].split(",")
        fields[0] = "250" if name == "va" else "old"  # age out of bounds / not a number
        lines[3] = ",".join(fields)
        (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_every_site_problem_at_once_before_anything(
    tmp_path: Path, heart_files: dict[str, Path], heart_schema_path: Path, capsys
) -> None:
    out = tmp_path / "study"
    code = main(["simulate", "--schema", str(heart_schema_path), "--data",
                 str(_bad_sites(tmp_path, heart_files)), "--out", str(out)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert "site cleveland" in err and "site va" in err  # both sites, one message
    assert "not numbers" in err and "outside the schema's domain" in err
    assert not out.exists()  # nothing written


def test_existing_study_is_not_overwritten(tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert main(["simulate", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == "{}"
    assert main(["validate", "--schema", "s.yaml", "--real", "r", "--holdout", "h",
                 "--synthetic", "s", "--out", str(out / "v")]) == 2  # missing schema
    (out / "v").mkdir()
    (out / "v" / "report.html").write_text("old")
    assert main(["validate", "--schema", "s.yaml", "--real", "r", "--holdout", "h",
                 "--synthetic", "s", "--out", str(out / "v")]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "v" / "report.html").read_text() == "old"


@pytest.mark.parametrize("argv", [
    ["--sites", "cleveland,zurich"],
    ["--site-epsilon", "zurich=1"],
    ["--generator-params", '{"nonsense": 1}'],
    ["--dataset", "my_schema.yaml"],
    ["--target", "chol"],
    ["--holdout", "1.5"],
])
def test_failing_argument_leaves_no_folder(argv: list[str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    assert main(["simulate", "--out", str(out), *argv]) == 2
    assert "error:" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("argv", "says"), [
    # each of these reached a planner or a seed and ended in a traceback (exit 1); the
    # marginal ones left fedsynth.log, real/ (the sites' real rows) and site-state/ behind
    (["--epsilon", "nan"], "epsilon must be a finite number > 0, got nan"),
    (["--epsilon", "inf"], "epsilon must be a finite number > 0, got inf"),
    (["--delta", "2"], "delta must be in (0, 1), got 2.0"),
    (["--delta", "nan"], "delta must be in (0, 1), got nan"),
    (["--site-epsilon", "cleveland=nan"], "site cleveland: the budget's epsilon"),
    (["--seed", "-1"], "a seed is a whole number from 0 to 2147483647, got -1"),
    (["--n-synthetic", "-3"], "n-synthetic must be >= 0"),
    (["--generator", "marginal", "--epsilon", "0.01"],
     "no noise level gets below epsilon 0.103"),
    (["--generator", "marginal", "--delta", "1e-300"], "cannot pay for a marginal study"),
    (["--generator", "marginal", "--epsilon", "inf"], "finite number > 0"),
    # a positive value the column never takes: TSTR silently vanished from the report
    (["--target", "num=9"], "target 'num' has no value(s) ['9']; its values are 0, 1, 2"),
    (["--target", "num=0,1,2,3,4"], "leave at least one as the negative class"),
    # an empty holdout trained the whole study, then failed validating (ZeroDivisionError)
    (["--holdout", "0.001"], "holds back fewer than 20 patients over all sites"),
    (["--holdout", "0.999", "--sites", "switzerland"],
     "leaves site(s) switzerland no rows to train on"),
    # a zero-width layer built and trained a network that ignored its input (exit 0)
    (["--generator-params", '{"hidden": 0}'],
     "hidden must be a whole number >= 1 and < 4097, got 0"),
    (["--generator", "ddpm", "--generator-params", '{"lr": NaN}'],
     "lr must be a number > 0, got nan"),
    (["--generator", "ctgan", "--generator-params", '{"dropout": 1}'],
     "dropout must be a number >= 0 and < 1, got 1"),
    (["--generator", "marginal", "--generator-params", '{"iters": 0}'],
     "iters must be a whole number >= 1, got 0"),
    (["--generator", "marginal", "--generator-params", '{"max_way": 5}'],
     "max_way must be a whole number >= 2 and < 4, got 5"),
])
def test_impossible_budget_seed_or_target_is_one_message(
    argv: list[str], says: str, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "study"
    try:
        code = main(["simulate", "--out", str(out), *argv])
    except SystemExit as stop:  # argparse's own type errors
        code = stop.code
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error:" in err and says in err, err  # argparse's own errors follow a usage line
    assert "Traceback" not in err
    assert not out.exists()


def test_schema_file_given_as_dataset_says_what_to_do(tmp_path: Path, capsys) -> None:
    assert main(["simulate", "--dataset", "mine.yaml", "--out", str(tmp_path / "o")]) == 2
    assert "--schema mine.yaml with --data" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("n", ["0", "-5"])
def test_sample_needs_a_positive_number_of_rows(n: str, tmp_path: Path, capsys) -> None:
    assert main(["sample", "--model", str(tmp_path / "m.fsg"), "-n", n,
                 "--out", str(tmp_path / "s.csv")]) == 2
    assert "whole number >= 1" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "s.csv").exists()


def test_validate_prints_a_verdict_and_keeps_earlier_results(
    tmp_path: Path, heart_files: dict[str, Path], heart_schema_path: Path, capsys
) -> None:
    """`fedsynth validate` ends with the verdict; --strict turns a failing one into exit 1;
    a second run into the same folder needs --force."""
    out = tmp_path / "v"
    argv = ["validate", "--schema", str(heart_schema_path), "--real",
            str(heart_files["cleveland"]), "--holdout", str(heart_files["hungarian"]),
            "--synthetic", str(heart_files["va"]), "--no-synthetic-header", "--out", str(out)]
    assert main([*argv, "--strict"]) == 1  # VA's patients are not Cleveland's
    console = " ".join(capsys.readouterr().out.split())
    assert "verdict:" in console and "what to do:" in console
    saved = json.loads((out / "validation.json").read_text())
    assert saved["verdict"]["passed"] is False
    assert main(argv) == 2  # no silent overwrite
    assert main([*argv, "--force"]) == 0  # the study ran: exit 0 without --strict


@pytest.fixture(scope="module")
def one_round_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "study"
    assert main(["simulate", "--out", str(out), "--rounds", "1", "--sites",
                 "cleveland,hungarian", "--reproducible-noise"]) == 0
    return out


@pytest.mark.parametrize(("argv", "says"), [
    # a marginal study started again against spent ledgers, every site refused, and
    # the command validated and reported the earlier tvae study's outputs (exit 0)
    (["--generator", "marginal"], "a marginal study measures its marginals once"),
    (["--generator", "ddpm"], "was trained by generator 'tvae', not 'ddpm'"),
    (["--generator-params", '{"hidden": 16}'], "other --generator-params (hidden=32)"),
])
def test_resume_refuses_a_study_it_cannot_continue(
    one_round_study: Path, argv: list[str], says: str, capsys
) -> None:
    before = {p.name: p.read_bytes() for p in one_round_study.iterdir() if p.is_file()}
    assert main(["simulate", "--out", str(one_round_study), "--rounds", "2", "--sites",
                 "cleveland,hungarian", "--reproducible-noise", "--resume", *argv]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("error: --resume") and says in err, err
    after = {p.name: p.read_bytes() for p in one_round_study.iterdir() if p.is_file()}
    assert after == before


def test_a_reproducible_study_says_so_wherever_its_epsilon_shows(one_round_study: Path) -> None:
    """Reproducible noise is no DP release, so every place a reader sees the sites'
    epsilon must say so: on the old code summary.json and model.fsg carried the label,
    but report.html showed the privacy table's "2.999 / 3.000" and the console
    "2.999 of 3" with no word of it."""
    from io import StringIO

    from rich.console import Console

    from fedsynth.common.privacy.randomness import NOT_A_DP_RELEASE
    from fedsynth.simulations.simulate import _print_summary

    summary = json.loads((one_round_study / "summary.json").read_text())
    assert summary["privacy"].startswith(NOT_A_DP_RELEASE)
    report = (one_round_study / "report.html").read_text()
    # at the top, before the verdict, and beside the privacy table
    assert NOT_A_DP_RELEASE in report[:report.index('class="verdict"')]
    table = report[report.index("Privacy spent per site"):]
    assert NOT_A_DP_RELEASE in table[:table.index("<h2>")]
    local = json.loads((one_round_study / "validation.json").read_text())
    printed = StringIO()
    _print_summary(Console(file=printed, width=1000), {**summary, **local})
    assert NOT_A_DP_RELEASE in printed.getvalue()


def test_the_published_summary_holds_no_noise_seed(one_round_study: Path) -> None:
    """summary.json may be published; a site's reproducible-noise seed in it is what
    replays the noise (on the old code ``sites_config`` carried it)."""
    summary = json.loads((one_round_study / "summary.json").read_text())
    config = summary["sites_config"]
    assert [c["name"] for c in config] == ["cleveland", "hungarian"]
    assert all("epsilon" in c and "delta" in c for c in config)  # the table's budgets
    assert not any("seed" in key for c in config for key in c), config
