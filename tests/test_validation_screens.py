"""A coordinator turns federated validation into a membership test; a reply's keys.

In a study in clear a site cannot check that the model it is asked to score is the
study's release. The coordinator sends a TVAE whose every sample is one guessed
record x: the decoder's last layer has zero weights and biases that pin each
categorical slot to x's category, and the request's heaps (share 1, a window spanning
the column) turn every decoded numeric value into x's. On the code before this fix a
site at ``validation-scores = "quality"`` still sent ``synthetic_recall``, then the
share of its rows equal to x (1/303 for a cleveland patient, 0 for anyone else: a
membership test, and the exact row count), and ``nearest_synthetic_distance_mean``,
the exact mean distance of its rows to x. A site now sends none of the per-patient
screens in a study in clear.

The second test checks the reply's key set: on the old code a key was present or
absent depending on the site's rows (``tstr_auroc`` only with both classes, ``ks[chol]``
only where some cholesterol was recorded), one bit per key outside DP.

Real Flower messages, the real ClientApp, real Opacus, the real heart-disease tables.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fedsynth.common.generators import get_generator
from fedsynth.common.schema import Schema
from fedsynth.common.study import SiteConfig, StudyConfig, schema_fingerprint
from fedsynth.common.table import read_table
from fedsynth.common.validation.federated import (
    NOT_COMPUTABLE,
    PATIENT_SCREENS,
    combine,
    site_scores,
)
from tests.flower_support import task_identity
from tests.test_coordinator_attacks import TINY, _evaluate_message, _initial, _send, _train_message

#: A study the site takes part in (one round), with no grid release so that the
#: coordinator's heaps at validation are the only numeric decoding.
PROBE = StudyConfig(study_id="probe", num_server_rounds=50, local_epochs=1, sample_rate=0.5,
                    generator_params=TINY, seed=42, grid_share=0.0)


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    with task_identity():
        yield


def _pinning_heaps(schema: Schema, x: pd.Series) -> dict[str, list[list[float]]]:
    """One heap of share 1 per numeric column, at x's value, whose window spans the
    column: every decoded value of the column becomes x's."""
    return {c.name: [[float(x[c.name]), float(c.min) - 1, float(c.max) + 1, 1.0]]
            for c in schema.columns
            if c.is_numeric and not c.group and pd.notna(x[c.name])}


def _pinned_model(schema: Schema, x: pd.Series, params: dict[str, Any]) -> dict[str, np.ndarray]:
    """A TVAE of the study's architecture whose every sample is x (the attacker's model)."""
    model = get_generator("tvae")(schema, seed=PROBE.seed, **params)
    enc = model.encoder
    xe = enc.encode(pd.DataFrame([x]))[0]
    state = model.state_dict()
    last = [k for k in state if k.startswith("vae.decoder.") and k.endswith(".weight")][-1]
    bias = last.replace("weight", "bias")
    state[last][:] = 0.0
    pinned = np.zeros_like(state[bias])
    for block in enc.onehot_blocks:
        pinned[block.slice] = np.where(xe[block.slice] > 0.5, 40.0, -40.0)
    for block in enc.numeric_blocks:
        pinned[block.start] = np.arctanh(np.clip(xe[block.start], -0.99, 0.99))
    state[bias][:] = pinned
    if "cond.freq" in state:  # the outcome condition's prior: x's class only
        start, stop = model._cond
        state["cond.freq"] = np.eye(stop - start)[int(np.argmax(xe[start:stop]))]
    return state


def test_a_model_pinned_to_one_record_learns_nothing_from_per_patient_screens(
    tmp_path: Path, heart_files: dict[str, Path], heart_schema_path: Path, heart_schema: Schema
) -> None:
    """The coordinator guesses a cleveland patient x and asks the site, after one round of
    a study in clear, to score a model whose every sample is x. On the old code the reply
    held ``synthetic_recall`` = 1/303 (x is a patient, and there are 303) and
    ``nearest_synthetic_distance_mean``; now no per-patient screen is sent."""
    site = SiteConfig("cleveland", str(heart_files["cleveland"]), str(heart_schema_path),
                      epsilon=3.0, state_dir=str(tmp_path / "state"),
                      validation_scores="quality")
    fp = schema_fingerprint(heart_schema)
    trained = _send(site, _train_message(PROBE, _initial(heart_schema, PROBE), 1, fp), "train")
    assert dict(trained["site"])["status"] == "trained"

    rows = read_table(site.data_path, heart_schema)
    x = rows.dropna().iloc[5]
    asked = replace(PROBE, generator_params={**TINY,
                                             "numeric_heaps": _pinning_heaps(heart_schema, x)})
    crafted = _pinned_model(heart_schema, x, asked.generator_params)
    # the attack works: the model's sample is x, row for row
    check = get_generator("tvae")(heart_schema, seed=PROBE.seed, **asked.generator_params)
    check.load_state_dict(crafted)
    sample = check.sample(200, seed=1)
    assert (sample[heart_schema.names].astype(float) == x[heart_schema.names].astype(float)
            ).all().all()

    reply = _send(site, _evaluate_message(asked, heart_schema, crafted, 200), "evaluate")
    assert dict(reply["site"])["status"] == "evaluated"
    sent = dict(reply["metrics"])
    assert not set(sent) & set(PATIENT_SCREENS), sorted(set(sent) & set(PATIENT_SCREENS))
    assert {"synthetic_recall", "nearest_synthetic_distance_mean", "dcr_min",
            "exact_copies"} <= set(PATIENT_SCREENS)


def test_the_reply_keys_do_not_depend_on_the_sites_rows(
    heart_files: dict[str, Path], heart_schema: Schema
) -> None:
    """Three sites score the same synthetic table: cleveland, switzerland (no cholesterol
    recorded: on the old code no ``ks[chol]``) and cleveland's patients without heart
    disease (one class: on the old code no ``tstr_auroc``). The keys are the same; a
    figure a site cannot compute is the public sentinel, which the coordinator skips."""
    cleveland = read_table(heart_files["cleveland"], heart_schema)
    swiss = read_table(heart_files["switzerland"], heart_schema)
    healthy = cleveland[cleveland["num"].astype(str) == "0"].reset_index(drop=True)
    assert swiss["chol"].isna().all()  # the real table: cholesterol never recorded
    model = get_generator("tvae")(heart_schema, seed=3, **TINY)
    model.load_state_dict(model.state_dict())  # a loaded (untrained) model: public
    synthetic = model.sample(300, seed=4)
    scores = {name: site_scores(rows, synthetic, heart_schema)
              for name, rows in (("cleveland", cleveland), ("switzerland", swiss),
                                 ("healthy", healthy))}
    keys = {name: sorted(s) for name, s in scores.items()}
    assert keys["switzerland"] == keys["cleveland"] == keys["healthy"]
    assert scores["switzerland"]["ks[chol]"] == NOT_COMPUTABLE
    auroc = "tstr_auroc_logistic_regression[num]"
    assert scores["healthy"][auroc] == NOT_COMPUTABLE
    assert 0.0 <= scores["cleveland"][auroc] <= 1.0
    # the coordinator leaves the sentinel out, as a figure the site could not compute
    study = combine({"cleveland": {**scores["cleveland"], "n-rows-dp": 303.0},
                     "switzerland": {**scores["switzerland"], "n-rows-dp": 123.0}})
    ks_chol = study.get("ks[chol]")
    assert ks_chol.sites == {"cleveland": scores["cleveland"]["ks[chol]"]}
    assert ks_chol.value == pytest.approx(scores["cleveland"]["ks[chol]"])
