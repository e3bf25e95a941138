"""`fedsynth check`: every bad-input kind is named, exits non-zero, and changes nothing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from fedsynth.cli import main
from fedsynth.common.schema import Schema, SchemaError
from fedsynth.common.table import TableCheckError, read_table

from .conftest import digest


@pytest.fixture()
def header_schema(tmp_path: Path, heart_schema: Schema) -> Path:
    """The heart schema for files that carry a header row."""
    path = tmp_path / "schema.yaml"
    replace(heart_schema, header=True).save(path)
    return path


@pytest.fixture()
def good_csv(tmp_path: Path, heart_files: dict[str, Path], heart_schema: Schema) -> Path:
    frame = read_table(heart_files["cleveland"], heart_schema)
    path = tmp_path / "site.csv"
    frame.to_csv(path, index=False)
    return path


def run_check(schema: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    before = digest(data) if data.is_file() else None
    code = main(["check", "--schema", str(schema), "--data", str(data)])
    out = capsys.readouterr()
    if before is not None:
        assert digest(data) == before, "check must never modify the site's file"
    return code, out.out + out.err


def test_real_sites_pass(heart_schema_path: Path, heart_files: dict[str, Path], capsys) -> None:
    for path in heart_files.values():
        code, text = run_check(heart_schema_path, path, capsys)
        assert code == 0, text
        assert "OK" in text


def test_swiss_cholesterol_zero_is_missing(heart_schema: Schema, heart_files) -> None:
    swiss = read_table(heart_files["switzerland"], heart_schema)
    va = read_table(heart_files["va"], heart_schema)
    assert swiss["chol"].isna().all() and len(swiss) == 123
    raw_va = pd.read_csv(heart_files["va"], header=None, na_values="?")
    assert int(va["chol"].isna().sum()) == int(raw_va[4].isna().sum() + (raw_va[4] == 0).sum())
    assert int((raw_va[4] == 0).sum()) == 49


def test_every_problem_in_one_message(header_schema, good_csv, tmp_path, capsys) -> None:
    frame = pd.read_csv(good_csv, dtype=str, keep_default_na=False)
    frame.loc[3, "age"] = "sixty"
    frame.loc[7, "chol"] = "abc"
    frame.loc[5, "trestbps"] = "300"
    frame.loc[9, "cp"] = "9"
    frame.loc[11, "sex"] = ""
    frame.loc[12, "oldpeak"] = "1.5e400"
    frame = frame.drop(columns=["thal"]).assign(hospital_id="x")
    bad = tmp_path / "bad.csv"
    frame.to_csv(bad, index=False)
    code, text = run_check(header_schema, bad, capsys)
    assert code != 0
    for needle in [
        "missing column(s): thal",
        "not in the schema: hospital_id",
        "'age': 1 value(s) are not numbers",
        "row 4: 'sixty'",
        "'chol': 1 value(s) are not numbers",
        "'trestbps': 1 value(s) outside the schema's domain [60, 240]",
        "'cp': 1 value(s) are not among its categories",
        "'sex': 1 missing value(s)",
        "'oldpeak'",
    ]:
        assert needle in text, f"{needle!r} not in:\n{text}"


def test_empty_file(header_schema, tmp_path, capsys) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    code, text = run_check(header_schema, empty, capsys)
    assert code != 0 and "empty" in text


def test_header_only_has_no_rows(header_schema, good_csv, tmp_path, capsys) -> None:
    only = tmp_path / "header.csv"
    only.write_text(good_csv.read_text().splitlines()[0] + "\n")
    code, text = run_check(header_schema, only, capsys)
    assert code != 0 and "no rows" in text


def test_not_a_table(header_schema, tmp_path, capsys) -> None:
    blob = tmp_path / "scan.csv"
    blob.write_bytes(bytes(range(256)) * 40)
    code, text = run_check(header_schema, blob, capsys)
    assert code != 0 and "not a readable CSV table" in text


def test_ragged_rows(heart_schema_path, heart_files, tmp_path, capsys) -> None:
    lines = heart_files["cleveland"].read_text().splitlines()
    lines[4] += ",1"
    ragged = tmp_path / "ragged.data"
    ragged.write_text("\n".join(lines) + "\n")
    code, text = run_check(heart_schema_path, ragged, capsys)
    assert code != 0 and "not a readable CSV table" in text and "line 5" in text


def test_wrong_field_count(heart_schema_path, tmp_path, capsys) -> None:
    narrow = tmp_path / "narrow.data"
    narrow.write_text("63,1,1\n60,0,2\n")
    code, text = run_check(heart_schema_path, narrow, capsys)
    assert code != 0 and "3 field(s) per row" in text


def test_missing_file(heart_schema_path, tmp_path, capsys) -> None:
    code, text = run_check(heart_schema_path, tmp_path / "nope.csv", capsys)
    assert code != 0 and "does not exist" in text


def test_parquet(header_schema, good_csv, tmp_path, capsys) -> None:
    frame = pd.read_csv(good_csv)
    good = tmp_path / "site.parquet"
    frame.to_parquet(good)
    code, text = run_check(header_schema, good, capsys)
    assert code == 0, text
    frame.loc[2, "thalach"] = 999
    bad = tmp_path / "bad.parquet"
    frame.to_parquet(bad)
    code, text = run_check(header_schema, bad, capsys)
    assert code != 0 and "'thalach': 1 value(s) outside" in text and "row 3" in text


def test_shareable_summary_has_no_values(header_schema, good_csv, tmp_path) -> None:
    frame = pd.read_csv(good_csv, dtype=str, keep_default_na=False)
    frame.loc[3, "chol"] = "12345"
    bad = tmp_path / "bad.csv"
    frame.to_csv(bad, index=False)
    with pytest.raises(TableCheckError) as info:
        read_table(bad, Schema.load(header_schema))
    assert "12345" in str(info.value)
    assert all("12345" not in line and "row" not in line for line in info.value.shareable())


def test_bad_schema_lists_every_problem(tmp_path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: x\ncolumns:\n  - {name: a, kind: continuous}\n"
        "  - {name: b, kind: categorical}\n  - {name: c, kind: weird}\n"
    )
    with pytest.raises(SchemaError) as info:
        Schema.load(path)
    text = str(info.value)
    assert "3 problem(s)" in text and "'min' and 'max'" in text and "weird" in text


@pytest.mark.slow
def test_bad_generator_params_fail_before_anything_is_written(tmp_path, capsys) -> None:
    """A typo in --generator-params is one message, and no output folder appears."""
    out = tmp_path / "study"
    assert main(["simulate", "--generator-params", '{"bogus": 1}', "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "bogus" in err and "known:" in err
    assert not out.exists()
