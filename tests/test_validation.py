"""The validation module on the real UCI heart-disease data of the four hospitals.

The "good" synthetic table in these tests is a held-apart sample of real patients that
neither the training nor the holdout table contains: it is what a perfect generator
would draw, so it must pass fidelity, utility and privacy. Copies, planted leaks and
noise are built from it to check that each section fails when it should.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsynth.common.schema import Schema
from fedsynth.common.table import read_table
from fedsynth.common.validation import AREA_RUNNERS, ValidationResult, validate
from fedsynth.common.validation.data import MISSING, Table, gower
from fedsynth.common.validation.privacy import share_closer_to_train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "simulations" / "data" / "heart_disease"
SHARED = ROOT.parent / "shared" / "data" / "heart_disease"
SITES = ("cleveland", "hungarian", "switzerland", "va")


def _data_dir() -> Path:
    for folder in (DATA, SHARED):
        if (folder / "processed.cleveland.data").is_file():
            return folder
    pytest.skip("heart-disease data not found")
    raise AssertionError  # unreachable, for type checkers


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema.load(DATA / "schema.yaml")


@pytest.fixture(scope="module")
def heart(schema: Schema) -> pd.DataFrame:
    folder = _data_dir()
    frames = [read_table(folder / f"processed.{site}.data", schema) for site in SITES]
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def split(heart: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """train 368, holdout 184, fresh 368 real patients (the 'perfect synthetic')."""
    perm = np.random.default_rng(7).permutation(len(heart))
    parts = {"holdout": perm[:184], "train": perm[184:552], "fresh": perm[552:]}
    return {k: heart.iloc[v].reset_index(drop=True) for k, v in parts.items()}


@pytest.fixture(scope="module")
def good(split: dict[str, pd.DataFrame], schema: Schema) -> ValidationResult:
    return validate(split["train"], split["holdout"], split["fresh"], schema, seed=0)


def _uniform_noise(schema: Schema, n: int, seed: int) -> pd.DataFrame:
    """Rows drawn uniformly from the schema's domain: no relation to any patient."""
    rng = np.random.default_rng(seed)
    data: dict[str, object] = {}
    for c in schema.columns:
        if c.is_numeric:
            values = rng.uniform(c.min, c.max, n)
            data[c.name] = np.round(values) if c.kind == "integer" else values
        else:
            data[c.name] = rng.choice(np.array(c.categories, dtype=object), n)
    return pd.DataFrame(data)


# ---------------------------------------------------------------- API


def test_result_api(good: ValidationResult) -> None:
    head = good.headline()
    for key in (
        "fidelity",
        "correlation_similarity",
        "tstr_auroc",
        "trtr_auroc",
        "dcr_share_closer_to_train",
    ):
        assert key in head and head[key] is not None and math.isfinite(head[key]), key
    payload = json.loads(json.dumps(good.to_dict()))
    assert payload["headline"]["fidelity"] == pytest.approx(head["fidelity"])
    frame = good.to_frame()
    assert len(frame) == len(good.metrics)
    assert {"area", "name", "columns", "value", "reference", "direction"} <= set(frame.columns)
    for m in good.metrics:
        assert m.direction in ("higher", "lower")
        assert m.meaning and m.area in AREA_RUNNERS
        if m.threshold is not None and math.isfinite(m.value):
            assert m.passed is not None
    # every per-column figure has its real-vs-real reference
    ks = good.get("ks", ["age"])
    assert ks.reference is not None and 0 <= ks.reference <= 1


def test_areas_subset_and_unknown(split: dict[str, pd.DataFrame], schema: Schema) -> None:
    only = validate(split["train"], split["holdout"], split["fresh"], schema, areas=("fidelity",))
    assert {m.area for m in only.metrics} == {"fidelity"}
    with pytest.raises(ValueError, match="unknown area"):
        validate(split["train"], split["holdout"], split["fresh"], schema, areas=("nope",))


@pytest.mark.slow
def test_reproducible(split: dict[str, pd.DataFrame], schema: Schema) -> None:
    random_areas = ("diversity", "clustering", "detection", "privacy")
    a = validate(
        split["train"], split["holdout"], split["fresh"], schema, seed=3, areas=random_areas
    )
    b = validate(
        split["train"], split["holdout"], split["fresh"], schema, seed=3, areas=random_areas
    )
    assert a.to_dict()["metrics"] == b.to_dict()["metrics"]


# ---------------------------------------------------------------- behaviour


def test_fresh_real_patients_pass_everything(good: ValidationResult) -> None:
    """A perfect generator (new real patients) passes every judged metric."""
    assert good.failures() == [], [m.label for m in good.failures()]
    head = good.headline()
    assert head["fidelity"] > 0.85
    assert 0.4 < head["dcr_share_closer_to_train"] < 0.6
    assert abs(head["tstr_auroc"] - head["trtr_auroc"]) < 0.05
    assert 0.8 < head["trtr_auroc"] < 0.95


def test_training_copy_fails_privacy_not_fidelity(
    split: dict[str, pd.DataFrame], schema: Schema
) -> None:
    result = validate(
        split["train"], split["holdout"], split["train"], schema, areas=("fidelity", "privacy")
    )
    assert result.area_status("fidelity") is True
    assert result.get("exact_copies").value == 1.0
    # a copy is closer to the train subsample only when its source row is in it
    # (184 of 368 rows): 0.5 * 1 + 0.5 * 0.5 = 0.75 expected
    assert result.headline()["dcr_share_closer_to_train"] > 0.7
    assert result.area_status("privacy") is False


def test_planted_leak_is_flagged(split: dict[str, pd.DataFrame], schema: Schema) -> None:
    """5% verbatim training rows among good synthetic rows: privacy fails, fidelity passes."""
    fresh, train = split["fresh"], split["train"]
    n_leak = int(round(0.05 * len(fresh)))
    leaked = train.sample(n_leak, random_state=1)
    synthetic = pd.concat([fresh.iloc[n_leak:], leaked], ignore_index=True)
    result = validate(train, split["holdout"], synthetic, schema, areas=("fidelity", "privacy"))
    assert result.area_status("fidelity") is True
    assert result.area_status("privacy") is False
    copies = result.get("exact_copies")
    assert copies.passed is False and copies.details["count"] >= n_leak


def test_noise_fails_fidelity_and_utility(split: dict[str, pd.DataFrame], schema: Schema) -> None:
    noise = _uniform_noise(schema, 368, seed=2)
    result = validate(
        split["train"], split["holdout"], noise, schema, areas=("fidelity", "utility")
    )
    assert result.get("fidelity").passed is False
    assert result.headline()["tstr_auroc"] < 0.7
    assert result.area_status("utility") is False


def test_one_class_synthetic_gives_nan_utility_not_error(
    split: dict[str, pd.DataFrame], schema: Schema
) -> None:
    fresh = split["fresh"]
    healthy = fresh[fresh["num"] == 0]
    result = validate(split["train"], split["holdout"], healthy, schema, areas=("utility",))
    auroc = result.get("tstr_auroc_logistic_regression")
    assert math.isnan(auroc.value) and "one class" in auroc.note
    assert auroc.passed is None


def test_raw_and_unknown_values_are_tolerated(
    split: dict[str, pd.DataFrame], schema: Schema
) -> None:
    """Synthetic cells as strings, an unknown category and out-of-range numbers count
    against fidelity instead of raising: validation judges generators, it must not
    refuse to look at a bad one."""
    syn = split["fresh"].astype(object).astype(str).replace({"<NA>": "", "nan": ""})
    syn.loc[:9, "cp"] = "9"
    syn.loc[:4, "age"] = "150"
    result = validate(split["train"], split["holdout"], syn, schema, areas=("fidelity",))
    tvd_cp = result.get("tvd", ["cp"])
    assert tvd_cp.value >= 10 / len(syn) - 1e-12
    typed = validate(split["train"], split["holdout"], split["fresh"], schema, areas=("fidelity",))
    assert result.get("ks", ["chol"]).value == pytest.approx(typed.get("ks", ["chol"]).value)


# ---------------------------------------------------------------- definitions


def test_ks_and_tvd_by_hand(schema: Schema) -> None:
    base = pd.DataFrame({c: [None] * 4 for c in schema.names})
    base["age"] = [40, 50, 60, 70]
    base["sex"] = [0, 0, 1, 1]
    base["cp"] = [1, 2, 3, 4]
    base["num"] = [0, 1, 0, 1]
    other = base.copy()
    other["age"] = [40, 40, 40, 80]  # ECDF gap 0.75 at age 40..49
    other["sex"] = [0, 0, 0, None]  # hold: 0:.5 1:.5, syn: 0:.75 missing:.25 -> TVD .5
    result = validate(base, base, other, schema, areas=("fidelity",))
    assert result.get("ks", ["age"]).value == pytest.approx(0.5)
    assert result.get("tvd", ["sex"]).value == pytest.approx(0.5)
    assert result.get("ks", ["age"]).reference == 0.0


def test_missing_is_a_category_in_labels(schema: Schema) -> None:
    frame = pd.DataFrame({c: [None, None] for c in schema.names})
    frame["ca"] = [np.nan, "2"]
    labels = Table.from_frame(frame, schema).labels["ca"]
    assert list(labels) == [MISSING, "2"]


def test_gower_uses_public_bounds(schema: Schema) -> None:
    a = pd.DataFrame({c: [None] for c in schema.names})
    a["age"], a["sex"], a["cp"], a["num"] = 18, 0, 1, 0
    b = a.copy()
    b["age"] = 100  # the whole public range: 1 / 14 columns
    d = gower(Table.from_frame(a, schema), Table.from_frame(b, schema), schema)
    assert d[0, 0] == pytest.approx(1 / len(schema.columns))


def test_dcr_share_is_the_subsample_expectation() -> None:
    """The closed form equals the average over explicit random train subsamples."""
    rng = np.random.default_rng(0)
    d_train = rng.random((30, 12))
    d_hold = rng.random((30, 4))
    exact = share_closer_to_train(d_train, d_hold)
    draws = []
    for _ in range(20000):
        sub = rng.choice(12, size=4, replace=False)
        draws.append(np.mean(d_train[:, sub].min(axis=1) < d_hold.min(axis=1)))
    assert exact == pytest.approx(np.mean(draws), abs=3e-3)


def test_target_options(split: dict[str, pd.DataFrame], schema: Schema) -> None:
    args = (split["train"], split["holdout"], split["fresh"], schema)
    result = validate(*args, target="exang", areas=("utility",))
    assert result.info["target"] == {"column": "exang", "positive": ["1"]}
    with pytest.raises(ValueError, match="positive"):
        validate(*args, target="cp", areas=("utility",))
    chest = validate(*args, target="cp", positive=[4], areas=("utility",))
    assert chest.get("tstr_auroc_logistic_regression").value > 0.6


@pytest.mark.slow
def test_runtime_heart_disease(split: dict[str, pd.DataFrame], schema: Schema) -> None:
    train = pd.concat([split["train"], split["fresh"]], ignore_index=True)  # 736 rows
    synthetic = train.sample(len(train), replace=True, random_state=0)
    start = time.perf_counter()
    validate(train, split["holdout"], synthetic, schema)
    assert time.perf_counter() - start < 10.0


# ---------------------------------------------------------------- more areas


def _noisy(frame: pd.DataFrame, schema: Schema, seed: int) -> pd.DataFrame:
    """Real rows with numeric noise and 20% of categorical cells re-drawn: an imperfect
    generator, so that cross-checked metrics are not all trivially 1."""
    rng = np.random.default_rng(seed)
    out = frame.copy()
    for c in schema.columns:
        if c.is_numeric:
            values = pd.to_numeric(out[c.name], errors="coerce").to_numpy(float, na_value=np.nan)
            values = np.clip(values + rng.normal(0, 0.05 * (c.max - c.min), len(out)), c.min, c.max)
            out[c.name] = np.round(values) if c.kind == "integer" else np.round(values, 1)
        else:
            redraw = rng.random(len(out)) < 0.2
            values = out[c.name].astype(object).to_numpy()
            values[redraw] = rng.choice(np.array(c.categories, dtype=object), redraw.sum())
            out[c.name] = values
    return out


def test_detection_and_diversity(
    split: dict[str, pd.DataFrame], schema: Schema, good: ValidationResult
) -> None:
    assert good.area_status("detection") is True
    assert good.area_status("diversity") is True
    noise = _uniform_noise(schema, 368, seed=4)
    bad = validate(
        split["train"], split["holdout"], noise, schema, areas=("detection", "diversity")
    )
    assert bad.get("detection_auroc_gradient_boosting").value > 0.9
    assert bad.get("prdc_precision").value < good.get("prdc_precision").value - 0.3
    # uniform noise spreads over the public domain: the real range is covered...
    assert bad.get("range_coverage", ["chol"]).value == pytest.approx(1.0, abs=0.05)
    # ...but many values lie outside the real range
    assert bad.get("boundary_adherence", ["chol"]).value < 0.9


def test_detection_rounds_synthetic_decimals(
    split: dict[str, pd.DataFrame], schema: Schema
) -> None:
    """Extra decimals alone must not make synthetic rows detectable."""
    fresh = split["fresh"].copy()
    jitter = np.random.default_rng(0).uniform(-0.04, 0.04, len(fresh))
    fresh["oldpeak"] = fresh["oldpeak"] + jitter  # oldpeak is recorded to 0.1
    result = validate(split["train"], split["holdout"], fresh, schema, areas=("detection",))
    assert (
        result.get("detection_auroc_gradient_boosting").details["rounded_decimals"]["oldpeak"] == 1
    )
    assert result.area_status("detection") is True


def test_collapsed_generator_loses_coverage(split: dict[str, pd.DataFrame], schema: Schema) -> None:
    """A generator that repeats a few patients covers little of the real population."""
    few = split["fresh"].sample(10, random_state=0)
    collapsed = few.sample(368, replace=True, random_state=1)
    result = validate(split["train"], split["holdout"], collapsed, schema, areas=("diversity",))
    assert result.get("prdc_coverage").passed is False
    assert result.get("prdc_recall").value < 0.5


def test_clustering(good: ValidationResult) -> None:
    ari = good.get("kmeans_ari")
    assert ari.value >= 0.4 and ari.details["k"] in range(2, 6)


# ---------------------------------------------------------------- survival (AMLSG cohort)

AMLSG = ROOT.parent / "shared" / "data" / "amlsg" / "amlsg_clinical.csv"


@pytest.fixture(scope="module")
def amlsg() -> tuple[Schema, dict[str, pd.DataFrame]]:
    if not AMLSG.is_file():
        pytest.skip("AMLSG data not found")
    schema = Schema.from_dict(
        {
            "name": "amlsg",
            "columns": [
                {"name": "AOD", "kind": "integer", "min": 15, "max": 100, "nullable": False},
                {"name": "gender", "kind": "binary", "categories": [1, 2], "nullable": False},
                {"name": "wbc", "kind": "continuous", "min": 0, "max": 600},
                {"name": "NPM1", "kind": "binary", "nullable": False},
                {"name": "FLT3_ITD", "kind": "binary", "nullable": False},
                {
                    "name": "C_Risk",
                    "kind": "categorical",
                    "categories": ["Favorable", "Intermediate", "Adverse"],
                },
                {"name": "OS", "kind": "continuous", "min": 0, "max": 7000, "nullable": False},
                {"name": "Status", "kind": "binary", "nullable": False},
            ],
        }
    )
    frame = pd.read_csv(AMLSG, low_memory=False)[schema.names]
    perm = np.random.default_rng(0).permutation(len(frame))
    parts = {"holdout": perm[:300], "train": perm[300:920], "fresh": perm[920:]}
    return schema, {k: frame.iloc[v].reset_index(drop=True) for k, v in parts.items()}


def test_survival_fresh_patients_pass(amlsg: tuple[Schema, dict[str, pd.DataFrame]]) -> None:
    schema, parts = amlsg
    result = validate(
        parts["train"],
        parts["holdout"],
        parts["fresh"],
        schema,
        survival=("OS", "Status"),
        areas=("survival",),
    )
    assert result.area_status("survival") is True
    assert result.get("km_max_gap").value < 0.15
    assert result.get("cox_hr_sign_agreement").value == 1.0
    c = result.get("cox_c_index")
    assert c.value > 0.6 and abs(c.value - c.reference) < 0.05
    assert result.headline()["cox_c_index"] == pytest.approx(c.value)


def test_reversed_hazard_ratio_is_flagged(
    amlsg: tuple[Schema, dict[str, pd.DataFrame]],
) -> None:
    """FLT3-ITD shortens survival in real data; flipping it in the synthetic table
    reverses its hazard ratio and must fail the survival section."""
    schema, parts = amlsg
    reversed_ = parts["fresh"].copy()
    reversed_["FLT3_ITD"] = 1 - reversed_["FLT3_ITD"]
    result = validate(
        parts["train"],
        parts["holdout"],
        reversed_,
        schema,
        survival=("OS", "Status"),
        areas=("survival",),
    )
    assert result.area_status("survival") is False
    flt3 = result.get("cox_hr_same_sign", ["FLT3_ITD=1"])
    assert flt3.passed is False and flt3.details["hr_real"] > 1 > flt3.details["hr_other"]
    # the Kaplan-Meier curves of the whole cohort do not change: only the Cox check sees it
    assert result.get("km_max_gap").passed is True


def test_survival_columns_must_exist(split: dict[str, pd.DataFrame], schema: Schema) -> None:
    with pytest.raises(KeyError):
        validate(
            split["train"], split["holdout"], split["fresh"], schema, survival=("time", "event")
        )


# ---------------------------------------------------------------- SDMetrics cross-check


@pytest.mark.slow
def test_cross_check_with_sdmetrics(split: dict[str, pd.DataFrame], schema: Schema) -> None:
    """Metrics SDMetrics also has agree with it to 1e-9 on the same frames.

    fedsynth counts a missing category as a category; SDMetrics drops NaN. So the frames
    given to SDMetrics carry missing categories as the label fedsynth uses, which makes
    the two definitions the same computation.
    """
    sd_single = pytest.importorskip("sdmetrics.single_column")
    sd_pairs = pytest.importorskip("sdmetrics.column_pairs")
    synthetic = _noisy(split["fresh"], schema, seed=5)
    result = validate(
        split["train"], split["holdout"], synthetic, schema, areas=("fidelity", "diversity")
    )
    real = Table.from_frame(split["holdout"], schema).frame(schema)
    syn = Table.from_frame(synthetic, schema).frame(schema)
    checked = 0
    for c in schema.columns:
        r, s = real[c.name], syn[c.name]
        if c.is_numeric:
            pairs = [
                (1 - result.get("ks", [c.name]).value, sd_single.KSComplement.compute(r, s)),
                (
                    result.get("range_coverage", [c.name]).value,
                    sd_single.RangeCoverage.compute(r, s),
                ),
                (
                    result.get("boundary_adherence", [c.name]).value,
                    sd_single.BoundaryAdherence.compute(r, s),
                ),
            ]
            if c.nullable:
                pairs.append(
                    (
                        1 - result.get("missing_rate_diff", [c.name]).value,
                        sd_single.MissingValueSimilarity.compute(r, s),
                    )
                )
        else:
            pairs = [
                (1 - result.get("tvd", [c.name]).value, sd_single.TVComplement.compute(r, s)),
                (
                    result.get("category_coverage", [c.name]).value,
                    sd_single.CategoryCoverage.compute(r, s),
                ),
            ]
        # SDMetrics' TVComplement adds a count of 1e-6 to a category only the synthetic
        # column has (sdmetrics.utils.get_frequencies, "regularization to prevent NaN"),
        # which moves its TV by at most 1e-6 / n; fedsynth's TVD is the exact one
        extra = set(s) - set(r)
        tolerance = 1e-6 * len(extra) / len(r) + 1e-12 if extra else 1e-9
        for ours, theirs in pairs:
            assert ours == pytest.approx(theirs, abs=tolerance), c.name
            checked += 1
    numeric = [c.name for c in schema.columns if c.is_numeric]
    for i, a in enumerate(numeric):
        for b in numeric[i + 1 :]:
            for method in ("pearson", "spearman"):
                ours = 1 - result.get(f"{method}_diff", [a, b]).value / 2
                theirs = sd_pairs.CorrelationSimilarity.compute(
                    real[[a, b]], syn[[a, b]], coefficient=method.capitalize()
                )
                assert ours == pytest.approx(theirs, abs=1e-9), (a, b, method)
                checked += 1
    categorical = [c.name for c in schema.columns if c.is_categorical]
    for i, a in enumerate(categorical):
        for b in categorical[i + 1 :]:
            ours = result.get("contingency_similarity", [a, b]).value
            theirs = sd_pairs.ContingencySimilarity.compute(real[[a, b]], syn[[a, b]])
            assert ours == pytest.approx(theirs, abs=1e-9), (a, b)
            checked += 1
    assert checked > 80


@pytest.mark.slow
def test_dcr_cross_check_with_sdmetrics(heart: pd.DataFrame, schema: Schema) -> None:
    """fedsynth's distance to closest record and DCR share equal SDMetrics' on the same
    frames, to 1e-9, where the two definitions meet.

    They meet when (1) the Gower scale is the same: SDMetrics divides a numeric gap by
    the *reference table's* observed range, fedsynth by the public bounds, so the
    bounds are set to each reference's range and synthetic values kept inside both
    (fedsynth clips to the bounds); (2) train and holdout have the same size: fedsynth's
    share is the expectation over holdout-sized training subsamples, which is the whole
    training table here; (3) no synthetic row is equally close to both (SDMetrics counts
    a tie as closer to the holdout, fedsynth as one half). Then fedsynth's
    ``dcr_share_closer_to_train`` is SDMetrics' ``closer_to_training`` and
    DCROverfittingProtection's score is min(1, 2 (1 - share)).
    """
    calculate_dcr = pytest.importorskip("sdmetrics.single_table.privacy.dcr_utils").calculate_dcr
    from sdmetrics.single_table import DCROverfittingProtection

    cols = ["age", "trestbps", "thalach", "oldpeak", "sex", "cp", "exang"]
    numeric = [c for c in cols if schema.column(c).is_numeric]
    frame = heart[cols].dropna().astype(float).reset_index(drop=True)
    perm = np.random.default_rng(1).permutation(len(frame))
    train, hold, syn = (frame.iloc[p].reset_index(drop=True) for p in np.split(perm, [300, 600]))
    for c in numeric:
        lo = max(train[c].min(), hold[c].min())
        hi = min(train[c].max(), hold[c].max())
        syn[c] = syn[c].clip(lo, hi)

    def ranged(ref: pd.DataFrame) -> Schema:
        spec = [
            {"name": c, "kind": "continuous", "min": ref[c].min(), "max": ref[c].max()}
            if c in numeric
            else {"name": c, "kind": "categorical", "categories": list(schema.column(c).categories)}
            for c in cols
        ]
        return Schema.from_dict({"name": "dcr", "columns": spec})

    kinds = {c: "numerical" if c in numeric else "categorical" for c in cols}
    meta = {"columns": {c: {"sdtype": kind} for c, kind in kinds.items()}}
    d = {}
    for name, ref in (("train", train), ("holdout", hold)):
        sch = ranged(ref)
        d[name] = gower(Table.from_frame(syn, sch), Table.from_frame(ref, sch), sch)
        theirs = calculate_dcr(syn, ref, meta).to_numpy()
        assert np.abs(d[name].min(axis=1) - theirs).max() < 1e-9, name
    assert not np.any(np.abs(d["train"].min(axis=1) - d["holdout"].min(axis=1)) < 1e-12)
    ours = share_closer_to_train(d["train"], d["holdout"])
    breakdown = DCROverfittingProtection.compute_breakdown(train, syn, hold, meta, None)
    closer = breakdown["synthetic_data_percentages"]["closer_to_training"]
    assert ours == pytest.approx(closer, abs=1e-9)
    assert breakdown["score"] == pytest.approx(min(1.0, 2 * (1 - ours)), abs=1e-9)


# ---------------------------------------------------------------- anonymeter (own process)


def test_anonymeter_failure_is_reported(split: dict[str, pd.DataFrame], schema: Schema) -> None:
    """An interpreter without anonymeter gives a clear error, not a wrong number."""
    import sys

    from fedsynth.common.validation.anonymeter_runner import AnonymeterError

    with pytest.raises(AnonymeterError, match="anonymeter"):
        validate(
            split["train"],
            split["holdout"],
            split["fresh"],
            schema,
            areas=("privacy",),
            anonymeter_python=sys.executable if _lacks_anonymeter() else "/nonexistent",
        )


def _lacks_anonymeter() -> bool:
    import importlib.util

    return importlib.util.find_spec("anonymeter") is None


@pytest.mark.skipif(
    not __import__("os").environ.get("FEDSYNTH_ANONYMETER_PYTHON"),
    reason="set FEDSYNTH_ANONYMETER_PYTHON to a Python with anonymeter (see anonymeter_runner)",
)
@pytest.mark.slow
def test_anonymeter_risks(split: dict[str, pd.DataFrame], schema: Schema) -> None:
    import os

    python = os.environ["FEDSYNTH_ANONYMETER_PYTHON"]
    args = (split["train"], split["holdout"], split["fresh"], schema)
    result = validate(*args, areas=("privacy",), anonymeter_python=python)
    again = validate(*args, areas=("privacy",), anonymeter_python=python)
    # the risks are seeded; anonymeter 1.1.0 draws the linkability baseline (a random
    # guess, reported in the note) from an unseeded generator, so compare values only
    assert [m.value for m in result.metrics] == [m.value for m in again.metrics]
    names = {m.name for m in result.by_area("privacy")}
    assert {
        "anonymeter_singling_out_risk",
        "anonymeter_linkability_risk",
        "anonymeter_inference_risk",
    } <= names
    for m in result.by_area("privacy"):
        if m.name.startswith("anonymeter"):
            assert 0.0 <= m.value <= 1.0 and len(m.details["ci"]) == 2
            assert "baseline" in m.note


# ---------------------------------------------------------------- code sets (AMLSG genes)


@pytest.fixture(scope="module")
def amlsg_genes() -> tuple[Schema, dict[str, pd.DataFrame]]:
    """The AMLSG cohort with its 54-gene mutation code set, as the simulation loads it:
    holdout 400, train 570, and 570 more real patients as the 'perfect synthetic'."""
    if not AMLSG.is_file():
        pytest.skip("AMLSG data not found")
    from fedsynth.simulations.datasets import load_site_frames

    schema, sites = load_site_frames("amlsg")
    frame = pd.concat(list(sites.values()), ignore_index=True)
    perm = np.random.default_rng(0).permutation(len(frame))
    cuts = {"holdout": perm[:400], "train": perm[400:970], "fresh": perm[970:]}
    return schema, {k: frame.iloc[v].reset_index(drop=True) for k, v in cuts.items()}


def _codeset_result(
    amlsg_genes: tuple[Schema, dict[str, pd.DataFrame]], synthetic: pd.DataFrame
) -> ValidationResult:
    schema, parts = amlsg_genes
    return validate(parts["train"], parts["holdout"], synthetic, schema, areas=("fidelity",))


def test_codeset_fresh_patients_agree(amlsg_genes: tuple[Schema, dict[str, pd.DataFrame]]) -> None:
    result = _codeset_result(amlsg_genes, amlsg_genes[1]["fresh"])
    freq = result.get("code_frequency_correlation")
    assert freq.columns == ("mut",) and freq.value > 0.95 and freq.reference > 0.95
    assert result.get("code_frequency_mae").value < 0.02
    sign = result.get("codeset_sign_agreement")
    assert sign.details["significant_real_pairs"] >= 5  # NPM1-DNMT3A, FLT3-NPM1, ...
    assert sign.value == 1.0 and sign.passed is True
    assert 0 <= result.get("codeset_significance_agreement").value <= 1
    judged = [m for m in result.metrics if m.name == "codeset_pair_same_sign"]
    assert judged and all(m.passed is not False for m in judged)
    # the two code columns of a pair are scored by log odds ratio, not as a contingency pair
    assert not any(
        m.name == "contingency_similarity" and m.columns == ("mut_NPM1", "mut_DNMT3A")
        for m in result.metrics
    )


def test_planted_exclusivity_is_a_sign_disagreement(
    amlsg_genes: tuple[Schema, dict[str, pd.DataFrame]],
) -> None:
    """NPM1 and DNMT3A co-occur strongly in AML. A synthetic table where no patient has
    both (DNMT3A removed where NPM1 is mutated) must show that pair's sign reversed."""
    planted = amlsg_genes[1]["fresh"].copy()
    both = (planted["mut_NPM1"].astype(int) == 1) & (planted["mut_DNMT3A"].astype(int) == 1)
    assert both.sum() > 50
    planted.loc[both, "mut_DNMT3A"] = 0
    result = _codeset_result(amlsg_genes, planted)
    pair = result.get("codeset_pair_same_sign", ["mut_NPM1", "mut_DNMT3A"])
    assert pair.details["lor_real"] > 1 and pair.details["lor_synthetic"] < 0
    assert pair.value == 0.0 and pair.passed is False and pair.reference == 1.0
    assert result.get("codeset_sign_agreement").value < 1.0
    assert result.area_status("fidelity") is False
    # the per-column view passes: only DNMT3A's frequency moves, and only a little
    assert result.get("fidelity").passed is True
    assert result.get("tvd", ["mut_DNMT3A"]).value < 0.15


def test_log_odds_and_fisher_by_hand(amlsg_genes: tuple[Schema, dict[str, pd.DataFrame]]) -> None:
    """Counts, the Haldane-corrected log odds ratio and Fisher's p-value of code pairs in
    the real holdout equal a direct crosstab and scipy on the same columns."""
    from scipy.stats import fisher_exact

    from fedsynth.common.validation.codesets import PairStats, code_matrix, pair_counts

    schema, parts = amlsg_genes
    table = Table.from_frame(parts["holdout"], schema)
    columns = schema.codesets["mut"]
    x = code_matrix(table, schema, columns)
    checked_zero = False
    for a, b in (("mut_NPM1", "mut_DNMT3A"), ("mut_TP53", "mut_NPM1"), ("mut_FLT3", "mut_TP53")):
        i, j = columns.index(a), columns.index(b)
        u = parts["holdout"][a].astype(int).to_numpy()
        v = parts["holdout"][b].astype(int).to_numpy()
        cells = np.array(
            [np.sum(u & v), np.sum(u & (1 - v)), np.sum((1 - u) & v), np.sum((1 - u) & (1 - v))]
        )
        assert (pair_counts(x, [(i, j)])[0] == cells).all()
        stats_ = PairStats.of(x, [(i, j)])
        shifted = cells + (0.5 if (cells == 0).any() else 0.0)
        checked_zero |= bool((cells == 0).any())
        expected = np.log(shifted[0] * shifted[3] / (shifted[1] * shifted[2]))
        assert stats_.lor[0] == pytest.approx(expected, abs=1e-12)
        p = fisher_exact([[cells[0], cells[1]], [cells[2], cells[3]]]).pvalue
        assert stats_.p[0] == pytest.approx(p, rel=1e-12)
    assert checked_zero  # TP53 and NPM1 are (almost) never mutated together
