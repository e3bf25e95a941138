"""Federated validation on the four real heart-disease hospitals: each hospital scores the
synthetic table against its own rows, the coordinator combines the scores, and the
combined figures are compared with the same figures computed on the pooled rows.

The "synthetic" table is made of real patients held apart from every hospital (what a
perfect generator draws) plus a few verbatim copies of hospital rows, so that the copy
count is not trivially zero.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedsynth.client.evaluate import (
    EVALUATED,
    ROWS_KEY,
    SEED_KEY,
    SyntheticTableError,
    evaluate_site,
    read_synthetic,
)
from fedsynth.common.schema import Schema
from fedsynth.common.study import StudyConfig
from fedsynth.common.table import read_table
from fedsynth.common.validation.data import Table, gower
from fedsynth.common.validation.federated import (
    COUNT_KEY,
    PATIENT_SCREENS,
    RULES,
    combine,
    pooled_figure,
    rule_for,
    site_scores,
)
from fedsynth.server.validation import evaluate_content, site_figures, write_federated

COPIES_PER_SITE = {"cleveland": 3, "va": 2}


@pytest.fixture(scope="module")
def study(
    heart_schema: Schema, heart_files: dict[str, object]
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Each hospital keeps 80% of its rows; the 20% held apart plus copies is 'synthetic'."""
    rng = np.random.default_rng(11)
    sites: dict[str, pd.DataFrame] = {}
    apart: list[pd.DataFrame] = []
    copies: list[pd.DataFrame] = []
    for name, path in heart_files.items():
        frame = read_table(path, heart_schema)
        perm = rng.permutation(len(frame))
        cut = int(0.8 * len(frame))
        sites[name] = frame.iloc[perm[:cut]].reset_index(drop=True)
        apart.append(frame.iloc[perm[cut:]])
        copies.append(sites[name].iloc[: COPIES_PER_SITE.get(name, 0)])
    synthetic = pd.concat([*apart, *copies], ignore_index=True)
    return sites, synthetic


@pytest.fixture(scope="module")
def figures(
    study: tuple[dict[str, pd.DataFrame], pd.DataFrame], heart_schema: Schema
) -> dict[str, object]:
    sites, synthetic = study
    noise = StudyConfig().count_noise
    rng = np.random.default_rng(5)
    per_site = {}
    for name, rows in sites.items():
        # the DP count a site released in training: n + N(0, count_noise^2), rounded
        noisy = max(1.0, float(round(len(rows) + rng.normal(0.0, noise))))
        per_site[name] = evaluate_site(rows, heart_schema, synthetic, noisy_count=noisy)
    pooled_rows = pd.concat(list(sites.values()), ignore_index=True)
    return {
        "sites": per_site,
        "pooled": site_scores(pooled_rows, synthetic, heart_schema),
        "dp": combine(per_site),
        "true": combine(per_site, counts={k: len(v) for k, v in sites.items()}),
    }


def test_site_sends_scores_only(figures: dict[str, object], heart_schema: Schema) -> None:
    """Every key a site sends is a known score or its DP count; every value one float."""
    for name, sent in figures["sites"].items():  # type: ignore[union-attr]
        assert COUNT_KEY in sent
        for key, value in sent.items():
            assert key == COUNT_KEY or key.split("[", 1)[0] in RULES, key
            assert isinstance(value, float) and math.isfinite(value)
        # a figure per column and a handful per table: nothing row- or category-sized
        assert len(sent) <= 2 * len(heart_schema.columns) + 12, name
        MetricRecord(sent)  # fits a Flower MetricRecord as it is


def test_exact_figures_match_pooled(
    figures: dict[str, object], study: tuple[dict[str, pd.DataFrame], pd.DataFrame],
    heart_schema: Schema,
) -> None:
    sites, synthetic = study
    pooled, dp = figures["pooled"], figures["dp"]
    # the sum rule for copies is exact when no record is held by two sites: check it
    tables = [Table.from_frame(f, heart_schema) for f in sites.values()]
    for i, a in enumerate(tables):
        for b in tables[i + 1 :]:
            assert (gower(a, b, heart_schema) > 1e-12).all()
    exact = [f for f in dp.figures if f.rule.exactness == "exact"]  # type: ignore[union-attr]
    assert {f.label for f in exact} == {"dcr_min", "exact_copies"}
    for f in exact:
        assert f.value == pytest.approx(pooled_figure(f.label, pooled), abs=1e-9), f.label
    n_syn = len(synthetic)
    # the 5 planted copies, plus real duplicates (the heart data repeats a few records)
    assert round(dp.get("exact_copies").value * n_syn) >= 5
    assert dp.get("dcr_min").value == 0.0


def test_row_means_match_pooled_with_true_counts(figures: dict[str, object]) -> None:
    """Row-mean figures combine exactly with the true counts; the DP counts' noise is
    the only gap, and it is small."""
    pooled, true, dp = figures["pooled"], figures["true"], figures["dp"]
    means = [f for f in true.figures if f.rule.combine == "row-mean"]  # type: ignore[union-attr]
    assert len(means) == 4
    for f in means:
        ref = pooled_figure(f.label, pooled)
        assert f.value == pytest.approx(ref, abs=1e-9), f.label
        gap = abs(dp.get(f.label).value - ref)
        print(f"row-mean {f.label}: pooled {ref:.4f}, DP-weighted gap {gap:.2e}")
        assert gap < 0.01, f.label


def test_bounds_hold_and_gaps_are_reported(
    figures: dict[str, object], heart_schema: Schema
) -> None:
    """KS, Wasserstein and TVD combined by the weighted mean bound the pooled value from
    above wherever the mixture weights are the row counts (no missing values in a numeric
    column; categorical columns count missing as a category)."""
    pooled, true, dp = figures["pooled"], figures["true"], figures["dp"]
    rows = []
    for f in true.figures:  # type: ignore[union-attr]
        if f.rule.combine != "bound":
            continue
        ref = pooled_figure(f.label, pooled)
        assert ref is not None and f.value is not None
        name, _, col = f.label.partition("[")
        column = heart_schema.column(col.rstrip("]")) if col else None
        guaranteed = name in ("tvd", "contingency_similarity") or (
            column is not None and not column.nullable
        )
        if guaranteed:
            if f.rule.direction == "lower":
                assert f.value >= ref - 1e-12, f.label
            else:
                assert f.value <= ref + 1e-12, f.label
        rows.append((f.label, ref, f.value, dp.get(f.label).value, guaranteed))
    print("\nfigure | pooled | federated (true counts) | federated (DP counts) | bound")
    for label, ref, v, vdp, g in rows:
        print(f"{label} | {ref:.4f} | {v:.4f} | {vdp:.4f} | {g}")
    fid = dp.get("fidelity")  # type: ignore[union-attr]
    assert fid.value <= pooled_figure("fidelity", pooled) + 0.05
    assert len(rows) >= 20


def test_non_combinable_figures_have_site_values_only(figures: dict[str, object]) -> None:
    dp = figures["dp"]
    none = [f for f in dp.figures if f.rule.exactness == "none"]  # type: ignore[union-attr]
    assert {f.label.split("[")[0] for f in none} == {
        "tstr_auroc_logistic_regression",
        "correlation_similarity",
    }
    for f in none:
        assert f.value is None and len(f.sites) >= 3 and f.note
    # every figure carries its reason, for the report and the docs
    assert all(f.rule.why for f in dp.figures)  # type: ignore[union-attr]


def test_messages_round_trip_and_output(
    figures: dict[str, object], study: tuple[dict[str, pd.DataFrame], pd.DataFrame],
    heart_schema: Schema, tmp_path,
) -> None:
    """The coordinator's message carries the released model and the table's size and
    seed, never a table; the sites' replies (real Flower records) come back into the
    same study figures; a failed site is named."""
    from fedsynth.common.generators import TVAE

    state = TVAE(heart_schema, seed=0).state_dict()
    content = evaluate_content(state, 300, 7, {"schema-fingerprint": "x"})
    config = dict(content["config"])
    assert config[ROWS_KEY] == 300 and config[SEED_KEY] == 7
    assert not any(isinstance(v, str) and "," in v and "\n" in v for v in config.values())
    assert set(content["arrays"].keys()) == set(state)
    replies = [
        RecordDict(
            {
                "metrics": MetricRecord(scores),
                "site": ConfigRecord({"name": name, "status": EVALUATED, "problems": []}),
            }
        )
        for name, scores in figures["sites"].items()  # type: ignore[union-attr]
    ]
    replies.append(
        RecordDict(
            {"site": ConfigRecord({"name": "va2", "status": "invalid-data", "problems": ["x"]})}
        )
    )
    got, skipped = site_figures(replies)
    assert skipped == ["va2: invalid-data (x)"]
    again = combine(got)
    for f in figures["dp"].figures:  # type: ignore[union-attr]
        assert again.get(f.label).value == f.value
    path = write_federated(again, tmp_path)
    assert path.is_file() and (tmp_path / "federated_validation.csv").is_file()
    page = (tmp_path / "federated_validation.html").read_text(encoding="utf-8")
    for name in figures["sites"]:  # type: ignore[union-attr]
        assert f"<th class=\"\">{name}</th>" in page
    assert "dcr_min" in page and "upper bound" in page


def test_bad_synthetic_table_is_named(heart_schema: Schema) -> None:
    with pytest.raises(SyntheticTableError, match="lacks 14 schema column"):
        read_synthetic("a,b\n1,2\n3,4\n", heart_schema)
    with pytest.raises(SyntheticTableError, match="at least 2"):
        read_synthetic(",".join(heart_schema.names) + "\n" + ",".join(["1"] * 14), heart_schema)


def test_rules_cover_every_site_figure(figures: dict[str, object]) -> None:
    for sent in figures["sites"].values():  # type: ignore[union-attr]
        for key in sent:
            if key != COUNT_KEY:
                assert rule_for(key).exactness in ("exact", "approximate", "bound", "none")


@pytest.mark.slow
def test_flower_evaluate_round(
    study: tuple[dict[str, pd.DataFrame], pd.DataFrame],
    heart_schema: Schema,
    heart_schema_path,
    tmp_path,
) -> None:
    """One real Flower simulation: the project's ClientApp (its ``@app.evaluate()``
    handler) and a ServerApp running the coordinator's step. Sites run with
    ``dp = false`` (exact counts), so the row-mean figures that travel through Flower
    must equal the pooled ones to 1e-9."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedsynth.client.app import make_client_app
    from fedsynth.common.generators import get_generator
    from fedsynth.common.study import SiteConfig, schema_fingerprint
    from fedsynth.server.validation import (
        FEDERATED_JSON,
        run_federated_validation,
        write_federated,
    )

    sites_rows, _ = study
    plan = StudyConfig(local_epochs=1)
    model = get_generator(plan.generator)(heart_schema, seed=plan.seed)
    model.load_state_dict(model.state_dict())  # the model sent: a loaded state
    synthetic = model.sample(400, seed=9)  # what each site samples from the model sent
    site_configs = []
    for name, rows in sites_rows.items():
        path = tmp_path / f"{name}.csv"
        rows.to_csv(path, index=False, header=heart_schema.header, na_rep="?")
        site_configs.append(
            SiteConfig(name=name, data_path=str(path), schema_path=str(heart_schema_path),
                       dp=False, validation_scores="all")
        )
    config = {**plan.to_flat(), "schema-fingerprint": schema_fingerprint(heart_schema)}
    out = tmp_path / "out"

    client = make_client_app(site_configs)  # the production handler

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        result, skipped = run_federated_validation(
            grid, model.state_dict(), 400, 9, config, min_sites=len(site_configs), wait=120,
            timeout=300,
        )
        assert result is not None and not skipped, skipped
        write_federated(result, out)

    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=len(site_configs),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2},
        },
    )
    import json

    payload = json.loads((out / FEDERATED_JSON).read_text())
    assert payload["weights"] == {k: float(len(v)) for k, v in sites_rows.items()}
    got = {f["metric"]: f for f in payload["figures"]}
    pooled = site_scores(pd.concat(list(sites_rows.values()), ignore_index=True), synthetic,
                         heart_schema, include_privacy=False)
    # in clear, a site cannot check the model is the release: no per-patient screens
    assert not set(got) & set(PATIENT_SCREENS)
    for label, f in got.items():
        if f["combines"] in ("exact", "approximate"):
            assert f["study"] == pytest.approx(pooled_figure(label, pooled), abs=1e-9), label
    # TSTR accuracy and Brier; recall and the nearest distance are per-patient screens
    assert sum(f["combines"] == "approximate" for f in got.values()) == 2


def test_evaluate_reply_at_a_site(
    heart_files: dict[str, object], heart_schema: Schema, heart_schema_path,
    study: tuple[dict[str, pd.DataFrame], pd.DataFrame],
) -> None:
    """The site-side step on a hospital's own file: scores with the DP count it released
    in training, no count when told to keep it, and a named refusal for a bad table."""
    from dataclasses import replace

    from fedsynth.client.evaluate import DECLINED, INVALID_SYNTHETIC, evaluate_reply
    from fedsynth.client.site import SCHEMA_MISMATCH, SiteState
    from fedsynth.common.study import SiteConfig, schema_fingerprint

    _, synthetic = study
    site = SiteConfig(
        name="va", data_path=str(heart_files["va"]), schema_path=str(heart_schema_path),
        validation_scores="all",
    )
    fp = schema_fingerprint(heart_schema)
    csv = synthetic.to_csv(index=False)
    state = SiteState(noisy_count=207.0)
    reply = evaluate_reply(site, fp, csv, state)
    assert reply.status == EVALUATED and reply.metrics[COUNT_KEY] == 207.0
    assert reply.metrics["epsilon"] == state.ledger.epsilon(site.delta)  # nothing spent here
    kept = evaluate_reply(site, fp, csv, state, send_count=False)
    assert COUNT_KEY not in kept.metrics and kept.metrics["dcr_min"] == reply.metrics["dcr_min"]
    bad = evaluate_reply(site, fp, "age,sex\n50,1\n60,0\n", state)
    assert bad.status == INVALID_SYNTHETIC and "lacks 12 schema column" in bad.problems[0]
    assert evaluate_reply(site, "other-study", csv, state).status == SCHEMA_MISMATCH
    # The site decides what leaves it: by default nothing, with "quality" no figure
    # that hinges on single patients.
    declined = evaluate_reply(replace(site, validation_scores="none"), fp, csv, state)
    assert declined.status == DECLINED and not set(declined.metrics) - set(reply.metrics)
    assert "dcr_min" not in declined.metrics and COUNT_KEY not in declined.metrics
    quality = evaluate_reply(replace(site, validation_scores="quality"), fp, csv, state)
    assert quality.status == EVALUATED and quality.metrics[COUNT_KEY] == 207.0
    assert not set(quality.metrics) & set(PATIENT_SCREENS)
