"""`fedsynth schema draft`: a schema to review, never one that copies the rows' bounds
silently.

On every bundled dataset the draft, once its marked bounds are replaced by the
bundled schema's public ones, is accepted by `fedsynth check` for every site's
table; `simulate` (and anything that loads a schema: the sites, `check`) refuses it
while a mark is left.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedsynth.cli import main
from fedsynth.common.schema import DRAFT_MARK, Schema, SchemaError
from fedsynth.simulations.datasets import bundled_schema, load_site_frames
from fedsynth.simulations.splits import write_site_table

from .conftest import SHARED

DATASETS = ["heart_disease", "tcga_brca", "amlsg", "mimic3_demo"]


def _site_files(name: str, folder: Path) -> list[Path]:
    """Each site's rows as a user's export: heart as shipped (no header, '?'), the others
    as CSV with a header."""
    if name == "heart_disease":
        from fedsynth.simulations.datasets import bundled_site_files

        return list(bundled_site_files(name).values())
    schema, frames = load_site_frames(name)
    folder.mkdir()
    files = []
    for site, frame in frames.items():
        path = folder / f"{site}.csv"
        write_site_table(frame, schema, str(path))
        files.append(path)
    return files


def _review(draft: Path, public: Schema, reviewed: Path) -> int:
    """Replace every marked bound by the public schema's (the same column by name, or
    by position for a file without header) and delete the marks."""
    raw = yaml.safe_load(draft.read_text())
    by_name = {c.name: c for c in public.columns}
    plain = [c for c in public.columns if not c.group]
    marked = 0
    for i, col in enumerate(raw["columns"]):
        if col.pop(DRAFT_MARK, None):
            marked += 1
            ref = by_name.get(col["name"]) or plain[i]
            col["min"], col["max"] = ref.min, ref.max
    reviewed.write_text(yaml.safe_dump(raw, sort_keys=False))
    return marked


@pytest.mark.parametrize("name", DATASETS)
def test_reviewed_draft_is_accepted_by_check(name: str, tmp_path: Path, capsys) -> None:
    if name in ("amlsg", "mimic3_demo") and not (SHARED / name).is_dir():
        pytest.skip(f"{name} lives in ../shared/data only")
    files = _site_files(name, tmp_path / "sites")
    draft = tmp_path / "draft.yaml"
    assert main(["schema", "draft", *map(str, files), "--out", str(draft)]) == 0
    text = draft.read_text()
    assert text.startswith("# Draft schema") and "domain-knowledge" in text  # self-documenting
    with pytest.raises(SchemaError, match=DRAFT_MARK):
        Schema.load(draft)  # unreviewed: refused by everything that loads a schema
    public = bundled_schema(name)
    assert _review(draft, public, tmp_path / "reviewed.yaml") > 0
    capsys.readouterr()
    for path in files:
        assert main(["check", "--schema", str(tmp_path / "reviewed.yaml"),
                     "--data", str(path)]) == 0, capsys.readouterr().err
    schema = Schema.load(tmp_path / "reviewed.yaml")
    if public.survival_pairs:  # guessed from the column names
        assert schema.survival_pairs == public.survival_pairs
    if name == "heart_disease":
        assert schema.missing_tokens == ("", "?") and not schema.header


def test_simulate_refuses_an_unreviewed_draft(heart_files: dict[str, Path], tmp_path: Path,
                                              capsys) -> None:
    sites = tmp_path / "sites"
    sites.mkdir()
    for name, path in heart_files.items():
        (sites / f"{name}.csv").write_text(path.read_text())
    draft = tmp_path / "draft.yaml"
    assert main(["schema", "draft", str(sites), "--out", str(draft)]) == 0
    out = tmp_path / "study"
    assert main(["simulate", "--schema", str(draft), "--data", str(sites),
                 "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "to_review" in err and "unreviewed draft" in err
    assert not out.exists()


def test_draft_does_not_overwrite(tmp_path: Path, heart_files: dict[str, Path], capsys) -> None:
    out = tmp_path / "s.yaml"
    out.write_text("mine")
    assert main(["schema", "draft", str(heart_files["va"]), "--out", str(out)]) == 2
    assert out.read_text() == "mine"


def test_site_column_is_left_out_and_identifiers_flagged(tmp_path: Path) -> None:
    table = tmp_path / "cohort.csv"
    rows = ["centre,pid,age,sex,relapse"] + [
        f"{'A' if i % 2 else 'B'},P{i:04d},{30 + i % 50},{'F' if i % 3 else 'M'},{i % 2}"
        for i in range(120)
    ]
    table.write_text("\n".join(rows) + "\n")
    out = tmp_path / "s.yaml"
    assert main(["schema", "draft", str(table), "--site-column", "centre", "--out",
                 str(out)]) == 0
    text = out.read_text()
    raw = yaml.safe_load(text)
    names = [c["name"] for c in raw["columns"]]
    assert names == ["pid", "age", "sex", "relapse"]
    assert "identifier" in text  # 120 distinct pid values
    age = raw["columns"][1]
    assert age["kind"] == "integer" and age[DRAFT_MARK]


def test_a_site_refuses_an_unreviewed_draft(heart_files: dict[str, Path], tmp_path: Path) -> None:
    """The ClientApp's own schema check: a site never trains on a draft's bounds."""
    from fedsynth.client.site import SiteState, site_schema
    from fedsynth.common.study import SiteConfig

    draft = tmp_path / "draft.yaml"
    assert main(["schema", "draft", str(heart_files["va"]), "--out", str(draft)]) == 0
    site = SiteConfig(name="va", data_path=str(heart_files["va"]), schema_path=str(draft))
    reply = site_schema(site, SiteState(), "any-fingerprint")
    assert not isinstance(reply, Schema)
    assert any(DRAFT_MARK in p for p in reply.problems)


def test_schema_target_entry_is_the_tstr_label(tmp_path: Path) -> None:
    """`target: COLUMN` in the schema (a binary label) or --target sets what TSTR predicts."""
    from fedsynth.common.study import ConfigError
    from fedsynth.simulations.simulate import SimulationOptions, study_target

    raw = bundled_schema("amlsg").to_dict()
    raw["target"] = "complex_karyotype"
    schema = Schema.from_dict(raw)
    assert study_target(SimulationOptions(), schema) == ("complex_karyotype", ("1",))
    assert study_target(SimulationOptions(target="death"), schema) == ("death", ("1",))
    with pytest.raises(ConfigError, match="positive"):
        study_target(SimulationOptions(target="cyto_risk"), schema)
    assert study_target(SimulationOptions(target="cyto_risk", positive=("Adverse",)),
                        schema) == ("cyto_risk", ("Adverse",))
