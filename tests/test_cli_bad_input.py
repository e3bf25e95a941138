"""Bad input to every command but ``simulate``: one message, a non-zero exit, no file.

Each case was found by feeding the real command what a hospital's data team might
(a folder for a file, a huge or negative number, an input table as the output, a
corrupt file) and once ended in a Python traceback, in exit 0 on input that makes no
sense, or in a message that did not name the option. The commands run in-process on
the bundled heart-disease data, with one small saved TVAE for the model-reading ones.
"""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from fedsynth.cli import main
from fedsynth.client.preflight import preflight_command
from fedsynth.common.certs import certs_command
from fedsynth.common.generators import TVAE
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.schema import Schema
from fedsynth.common.table import read_table

from .conftest import digest


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich wraps messages at the terminal width; one line each keeps paths whole."""
    monkeypatch.setenv("COLUMNS", "1000")


def listing(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its digest: what "nothing changed" compares."""
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, heart_schema: Schema, heart_files) -> Path:
    """A small TVAE fitted under DP on Cleveland's rows, saved as a study saves it."""
    frame = read_table(heart_files["cleveland"], heart_schema)
    model = TVAE(heart_schema, seed=3, hidden=16, latent=4).fit(
        frame, epochs=1, epsilon=5.0, randomness=DPRandomness.reproducible(3))
    path = tmp_path_factory.mktemp("model") / "model.fsg"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def synthetic_csv(tmp_path_factory, model_path: Path) -> Path:
    """Rows sampled from the saved model, as `fedsynth sample` writes them."""
    path = tmp_path_factory.mktemp("syn") / "synthetic.csv"
    assert main(["sample", "--model", str(model_path), "-n", "200", "--out", str(path)]) == 0
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and everything printed; argparse's own refusals exit via SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return code, out.out + out.err


# --------------------------------------------------------------------------- sample


def test_sample_refuses_a_row_count_past_memory(model_path, tmp_path, capsys) -> None:
    out = tmp_path / "syn.csv"
    code, text = run(["sample", "--model", str(model_path), "-n", str(10**12),
                      "--out", str(out)], capsys)
    assert code == 2 and "-n" in text and "10,000,000" in text
    assert not out.exists()


def test_sample_refuses_a_folder_as_out_even_with_force(model_path, tmp_path, capsys) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "old.csv").write_text("kept\n")
    code, text = run(["sample", "--model", str(model_path), "-n", "5", "--out", str(folder),
                      "--force"], capsys)
    assert code == 2 and "is a folder" in text
    assert listing(tmp_path) == {"results/old.csv": digest(folder / "old.csv")}  # no .tmp


def test_sample_refuses_out_in_a_missing_folder(model_path, tmp_path, capsys) -> None:
    code, text = run(["sample", "--model", str(model_path), "-n", "5",
                      "--out", str(tmp_path / "nowhere" / "syn.csv")], capsys)
    assert code == 2 and "does not exist" in text
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_sample_refuses_a_seed_no_generator_takes(model_path, tmp_path, capsys, seed) -> None:
    out = tmp_path / "syn.csv"
    code, text = run(["sample", "--model", str(model_path), "-n", "5", "--out", str(out),
                      "--seed", seed], capsys)
    assert code == 2 and "--seed" in text and "2147483647" in text
    assert not out.exists()


@pytest.mark.parametrize("conditions, words", [
    ("{sex: 1}", "--conditions is not valid JSON"),
    ("[1, 2]", "--conditions must map columns to values"),
    ('{"age": "old"}', "column 'age' holds numbers"),
    ('{"age": [50]}', "column 'age' holds numbers"),
])
def test_sample_names_a_bad_condition(model_path, tmp_path, capsys, conditions, words) -> None:
    out = tmp_path / "syn.csv"
    code, text = run(["sample", "--model", str(model_path), "-n", "5", "--out", str(out),
                      "--conditions", conditions], capsys)
    assert code == 2 and words in text
    assert not out.exists()


def test_sample_names_an_unknown_balance_column(model_path, tmp_path, capsys) -> None:
    out = tmp_path / "syn.csv"
    code, text = run(["sample", "--model", str(model_path), "-n", "5", "--out", str(out),
                      "--balance", "ethnicity"], capsys)
    assert code == 2 and "'ethnicity' is not in schema" in text
    assert not out.exists()


def test_sample_says_a_folder_is_not_a_model(tmp_path, capsys) -> None:
    out = tmp_path / "syn.csv"
    code, text = run(["sample", "--model", str(tmp_path), "-n", "5", "--out", str(out)],
                     capsys)
    assert code == 2 and "is a folder" in text and "model.fsg" in text
    assert not out.exists()


def test_sample_names_a_model_damaged_in_transfer(model_path, tmp_path, capsys) -> None:
    """One flipped byte at the start of a compressed entry: a zlib error, not a CRC one."""
    raw = bytearray(model_path.read_bytes())
    with zipfile.ZipFile(model_path) as zf:
        entry = max((i for i in zf.infolist() if i.filename.startswith("arrays/")),
                    key=lambda i: i.compress_size)
    name_len, extra_len = struct.unpack("<HH", raw[entry.header_offset + 26:
                                                   entry.header_offset + 30])
    raw[entry.header_offset + 30 + name_len + extra_len] ^= 0xFF
    damaged = tmp_path / "model.fsg"
    damaged.write_bytes(bytes(raw))
    out = tmp_path / "syn.csv"
    code, text = run(["sample", "--model", str(damaged), "-n", "5", "--out", str(out)],
                     capsys)
    assert code == 2 and "is corrupt" in text
    assert not out.exists()


def test_sample_names_a_model_whose_metadata_lacks_a_part(model_path, tmp_path,
                                                          capsys) -> None:
    with zipfile.ZipFile(model_path) as zf:
        entries = {i.filename: zf.read(i.filename) for i in zf.infolist()}
    meta = json.loads(entries["meta.json"])
    del meta["hparams"]
    entries["meta.json"] = json.dumps(meta).encode()
    edited = tmp_path / "model.fsg"
    with zipfile.ZipFile(edited, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    code, text = run(["sample", "--model", str(edited), "-n", "5",
                      "--out", str(tmp_path / "syn.csv")], capsys)
    assert code == 2 and "is corrupt" in text and "hparams" in text


# --------------------------------------------------------------------------- check


def test_check_refuses_a_binary_file_as_schema(model_path, heart_files, capsys) -> None:
    before = digest(heart_files["cleveland"])
    code, text = run(["check", "--schema", str(model_path), "--data",
                      str(heart_files["cleveland"])], capsys)
    assert code == 2 and "is not a text file" in text and "--schema" in text
    assert digest(heart_files["cleveland"]) == before


def test_check_says_a_folder_is_not_a_schema(tmp_path, heart_files, capsys) -> None:
    code, text = run(["check", "--schema", str(tmp_path), "--data",
                      str(heart_files["cleveland"])], capsys)
    assert code == 2 and "is a folder" in text


# --------------------------------------------------------------------------- validate


def validate_argv(heart_schema_path, heart_files, synthetic: Path, out: Path) -> list[str]:
    return ["validate", "--schema", str(heart_schema_path), "--real",
            str(heart_files["hungarian"]), "--holdout", str(heart_files["cleveland"]),
            "--synthetic", str(synthetic), "--out", str(out)]


def test_validate_refuses_too_few_synthetic_rows(heart_schema_path, heart_files,
                                                  synthetic_csv, tmp_path, capsys) -> None:
    few = tmp_path / "few.csv"
    pd.read_csv(synthetic_csv).head(3).to_csv(few, index=False)
    out = tmp_path / "validation"
    code, text = run(validate_argv(heart_schema_path, heart_files, few, out), capsys)
    assert code == 2 and "too few rows" in text and "synthetic has 3" in text
    assert not out.exists()


def test_validate_refuses_a_positive_value_the_target_never_takes(
        heart_schema_path, heart_files, synthetic_csv, tmp_path, capsys) -> None:
    """num has categories 0-4: num=9 matched no row, and utility scored a constant."""
    out = tmp_path / "validation"
    code, text = run([*validate_argv(heart_schema_path, heart_files, synthetic_csv, out),
                      "--target", "num=9"], capsys)
    assert code == 2 and "target 'num' has no value(s) ['9']" in text
    assert not out.exists()


def test_validate_refuses_the_same_file_as_real_and_holdout(
        heart_schema_path, heart_files, synthetic_csv, tmp_path, capsys) -> None:
    """With one file as both, every privacy comparison is a tie and always passes."""
    out = tmp_path / "validation"
    argv = validate_argv(heart_schema_path, heart_files, synthetic_csv, out)
    argv[argv.index("--real") + 1] = str(heart_files["cleveland"])
    code, text = run(argv, capsys)
    assert code == 2 and "--real and --holdout are the same file" in text
    assert not out.exists()


def test_validate_refuses_a_negative_seed(heart_schema_path, heart_files, synthetic_csv,
                                          tmp_path, capsys) -> None:
    out = tmp_path / "validation"
    code, text = run([*validate_argv(heart_schema_path, heart_files, synthetic_csv, out),
                      "--seed", "-3"], capsys)
    assert code == 2 and "--seed" in text
    assert not out.exists()


# --------------------------------------------------------------------------- schema draft


@pytest.fixture()
def site_table(tmp_path: Path, heart_files) -> Path:
    """A copy of Cleveland's real table (a test must never risk the bundled file)."""
    path = tmp_path / "tables" / "cleveland.csv"
    path.parent.mkdir()
    shutil.copy(heart_files["cleveland"], path)
    return path


@pytest.mark.parametrize("given", ["file", "folder"])
def test_draft_never_writes_over_its_input_table(site_table, capsys, given) -> None:
    before = listing(site_table.parent)
    source = site_table if given == "file" else site_table.parent
    code, text = run(["schema", "draft", str(source), "--out", str(site_table), "--force"],
                     capsys)
    assert code == 2 and "is one of the tables to draft from" in text
    assert listing(site_table.parent) == before


def test_draft_refuses_a_folder_as_out(site_table, tmp_path, capsys) -> None:
    folder = tmp_path / "drafts"
    folder.mkdir()
    code, text = run(["schema", "draft", str(site_table), "--out", str(folder), "--force"],
                     capsys)
    assert code == 2 and "is a folder" in text
    assert not any(folder.iterdir())


def test_draft_refuses_out_in_a_missing_folder(site_table, tmp_path, capsys) -> None:
    code, text = run(["schema", "draft", str(site_table), "--out",
                      str(tmp_path / "nowhere" / "schema.yaml")], capsys)
    assert code == 2 and "does not exist" in text
    assert not (tmp_path / "nowhere").exists()


def test_draft_refuses_a_header_without_rows(heart_schema, tmp_path, capsys) -> None:
    empty = tmp_path / "export.csv"
    empty.write_text(",".join(heart_schema.names) + "\n")
    out = tmp_path / "schema.yaml"
    code, text = run(["schema", "draft", str(empty), "--out", str(out)], capsys)
    assert code == 2 and "no data rows" in text
    assert not out.exists()


def test_draft_names_a_corrupt_parquet_file(heart_schema, heart_files, tmp_path,
                                            capsys) -> None:
    whole = tmp_path / "whole.parquet"
    read_table(heart_files["cleveland"], heart_schema).to_parquet(whole)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    out = tmp_path / "schema.yaml"
    code, text = run(["schema", "draft", str(cut), "--out", str(out)], capsys)
    assert code == 2 and "not a readable Parquet table" in text
    assert not out.exists()


# --------------------------------------------------------------------------- benchmark


@pytest.mark.parametrize("argv, words", [
    # --only nosuch stops a run that got past the options before any setting runs
    (["--epsilons", "3,inf", "--only", "nosuch"], "finite"),
    (["--dirichlet-alpha", "inf", "--only", "nosuch"], "--dirichlet-alpha must be a finite"),
    (["--dirichlet-sites", "3", "--only", "nosuch"], "pass --dirichlet-alpha too"),
    (["--dirichlet-alpha", "1", "--dirichlet-sites", "5000"], "--dirichlet-sites 460 or fewer"),
    (["--seed", "-1"], "--seed"),
])
def test_benchmark_refuses_bad_numbers(tmp_path, capsys, argv, words) -> None:
    """Values that once ran into a traceback, or past the options into the run."""
    out = tmp_path / "bench"
    code, text = run(["benchmark", "--quick", "--generators", "tvae", "--baselines",
                      "independent", "--out", str(out), *argv], capsys)
    assert code == 2 and words in text
    assert not out.exists()


def test_benchmark_refuses_a_file_as_out(tmp_path, capsys) -> None:
    out = tmp_path / "results.csv"
    out.write_text("earlier results\n")
    code, text = run(["benchmark", "--quick", "--generators", "tvae", "--baselines",
                      "independent", "--only", "tvae/central/nodp", "--out", str(out)], capsys)
    assert code == 2 and "is a file; choose a folder" in text
    assert out.read_text() == "earlier results\n"


# --------------------------------------------------------------------------- certs


@pytest.mark.parametrize("argv, words", [
    (["--days", "99999999"], "--days must be from 1 to 3650"),
    (["--study-id", ""], "study id '' is not usable"),
])
def test_certs_refuses_bad_study_settings(tmp_path, capsys, argv, words) -> None:
    out = tmp_path / "certs"
    code = certs_command(["study", "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert code == 1 and words in err and "Traceback" not in err
    assert not out.exists()


# --------------------------------------------------------------------------- preflight


@pytest.fixture()
def site(tmp_path: Path, heart_files, heart_schema_path) -> list[str]:
    """A site setup that passes the pre-flight (loopback, no TLS)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return ["--data", str(heart_files["cleveland"]), "--schema", str(heart_schema_path),
            "--state-dir", str(state), "--superlink", "127.0.0.1:9092", "--insecure"]


def test_preflight_setup_passes(site, capsys) -> None:
    assert preflight_command(site) == 0, capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--epsilon", "inf"], "epsilon must be a finite number > 0"),
    (["--noise-multiplier", "inf"], "noise-multiplier must be in"),
    (["--node-config", "torch-threads=-3"], "torch-threads must be a positive integer"),
])
def test_preflight_finds_a_site_setting_that_fails_later(site, capsys, argv, words) -> None:
    code = preflight_command([*site, *argv])
    out = capsys.readouterr().out
    assert code == 1 and words in out and "flower-supernode" not in out


@pytest.mark.parametrize("port", ["0", "70000", "-1"])
def test_preflight_refuses_a_port_out_of_range(site, capsys, port) -> None:
    code = preflight_command([*site, "--runtime-port", port])
    captured = capsys.readouterr()
    assert code == 2 and "--runtime-port" in captured.err
    assert "flower-supernode" not in captured.out

