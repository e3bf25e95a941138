"""The HTML validation report: one self-contained file that shows every area.

Built from real heart-disease patients (a held-apart real sample stands in for the
synthetic table, plus a noisy one so that the traffic lights show a failure).
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from fedsynth.common.schema import Schema
from fedsynth.common.table import read_table
from fedsynth.common.validation import validate
from fedsynth.common.validation.report import write_report

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "simulations" / "data" / "heart_disease"
SITES = ("cleveland", "hungarian", "switzerland", "va")


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema.load(DATA / "schema.yaml")


@pytest.fixture(scope="module")
def parts(schema: Schema) -> dict[str, pd.DataFrame]:
    frame = pd.concat(
        [read_table(DATA / f"processed.{s}.data", schema) for s in SITES], ignore_index=True
    )
    perm = np.random.default_rng(11).permutation(len(frame))
    split = {"holdout": perm[:184], "train": perm[184:552], "fresh": perm[552:]}
    return {k: frame.iloc[v].reset_index(drop=True) for k, v in split.items()}


def _extra() -> dict[str, object]:
    fig = Figure(figsize=(3, 2))
    fig.subplots().plot([1, 2, 3], [3, 1, 2])
    return {
        "privacy_budget": {
            "cleveland": {"epsilon": 2.99, "rounds_trained": 3, "last_status": "trained"},
            "va": {"epsilon": 1.5, "rounds_trained": 2, "last_status": "budget exhausted"},
        },
        "rounds": [
            {
                "round": r,
                "sites": [
                    {"site": s, "loss": 30.0 / r + i, "epsilon": r * 0.9}
                    for i, s in enumerate(("cleveland", "va"))
                ],
            }
            for r in (1, 2, 3)
        ],
        "study": {"num-server-rounds": 3, "generator": "tvae", "note": "<b>escaped</b>"},
        "a_frame": pd.DataFrame({"site": ["a", "b"], "rows": [10, 20]}),
        "a_figure": fig,
        "a_note": "free text",
    }


@pytest.fixture(scope="module")
def report(parts: dict[str, pd.DataFrame], schema: Schema, tmp_path_factory) -> Path:
    result = validate(parts["train"], parts["holdout"], parts["fresh"], schema, seed=0)
    path = tmp_path_factory.mktemp("report") / "report.html"
    return write_report(
        result,
        path,
        real_train=parts["train"],
        synthetic=parts["fresh"],
        schema=schema,
        title="test report",
        extra=_extra(),
    )


@pytest.mark.slow
def test_report_is_self_contained(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    # nothing is fetched: no scripts, no remote or relative resources
    assert "<script" not in text
    assert not re.search(r'(src|href)="(?!data:)', text)
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) >= 5  # marginals, correlations, DCR, rounds plot, caller's figure
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_report_shows_every_area_and_threshold(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    for heading in (
        "Summary",
        "Fidelity",
        "Diversity",
        "Utility",
        "Clustering",
        "Detection",
        "Privacy",
    ):
        assert f"<h2>{heading}" in text, heading
    # every traffic light states its rule
    assert "≥ 0.800" in text and "≤ 0.600" in text
    assert "real reference" in text
    assert "Marginals: real training vs synthetic" in text


@pytest.mark.slow
def test_report_extra_sections(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    for title in ("privacy budget", "rounds", "study", "a frame", "a figure", "a note"):
        assert f"<h2>{title}</h2>" in text
    assert "budget exhausted" in text and "free text" in text
    assert "&lt;b&gt;escaped&lt;/b&gt;" in text  # caller text is escaped, not injected


@pytest.mark.slow
def test_report_with_failures_and_survival(schema: Schema, tmp_path: Path) -> None:
    """A failing area is red, and a survival pair adds Kaplan-Meier curves."""
    surv = Schema.from_dict(
        {
            "name": "toy",
            "columns": [
                {"name": "age", "kind": "integer", "min": 18, "max": 100, "nullable": False},
                {"name": "months", "kind": "continuous", "min": 0, "max": 120, "nullable": False},
                {"name": "death", "kind": "binary", "nullable": False},
            ],
        }
    )
    rng = np.random.default_rng(0)

    def cohort(n: int, scale: float) -> pd.DataFrame:
        age = rng.integers(30, 90, n)
        months = np.clip(rng.exponential(scale * 60 / (age / 50), n), 0, 120).round(1)
        return pd.DataFrame({"age": age, "months": months, "death": (months < 120).astype(int)})

    train, hold, syn = cohort(300, 1.0), cohort(150, 1.0), cohort(300, 0.3)
    result = validate(
        train,
        hold,
        syn,
        surv,
        survival=("months", "death"),
        target="death",
        areas=("fidelity", "survival", "privacy"),
    )
    assert result.area_status("survival") is False
    path = write_report(
        result,
        tmp_path / "r.html",
        real_train=train,
        synthetic=syn,
        schema=surv,
        title="survival",
        extra=None,
    )
    text = path.read_text(encoding="utf-8")
    assert "<h2>Survival" in text and "#c62828" in text
    assert text.count("data:image/png;base64,") >= 4


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_report_renders_in_chromium(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            f"--screenshot={shot}",
            "--window-size=1280,1600",
            report.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (1600, 1280)
    assert pixels.std() > 0.05  # not a blank page


@pytest.mark.slow
def test_report_code_sets_mimic(tmp_path: Path) -> None:
    """A code set (MIMIC-III demo: 100 patients x ICD-9 categories) is shown as frequency
    and log-odds scatter plots with co-occurrence heat maps, not as 1,000 bar charts."""
    if not (ROOT.parent / "shared" / "data" / "mimic3_demo" / "PATIENTS.csv").is_file():
        pytest.skip("MIMIC-III demo data not found")
    from fedsynth.simulations.datasets import bundled_schema, mimic_patients

    schema = bundled_schema("mimic3_demo")
    frame = mimic_patients(schema)
    perm = np.random.default_rng(0).permutation(len(frame))
    hold, train, fresh = (frame.iloc[p].reset_index(drop=True) for p in np.split(perm, [40, 70]))
    result = validate(train, hold, fresh, schema, areas=("fidelity",))
    freq = result.get("code_frequency_correlation")
    assert freq.value > 0.5 and len(freq.details["codes"]) > 100
    path = write_report(
        result, tmp_path / "mimic.html", real_train=train, synthetic=fresh, schema=schema
    )
    text = path.read_text(encoding="utf-8")
    assert "Code sets: frequencies and co-occurrence" in text
    section = text[text.index("Code sets: frequencies") :]
    assert "data:image/png;base64," in section
    # the marginal grid holds the five non-code columns only
    assert text.count("data:image/png;base64,") <= 5
