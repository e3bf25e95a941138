"""The third audit: a coordinator that sets every number it sends to an extreme.

The coordinator writes the study config, the plan and every request, so each numeric
key can be 0, negative, NaN, inf, 1e300 or a float32 subnormal. A site must refuse such a
value with a clear error before anything is drawn or charged, or release only what its
ledger pays for. Each test plays the coordinator through the site's real ClientApp on
real heart-disease rows; the first one failed on the code before this audit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedsynth.client.site import TRAINED, load_encoded, load_site_state
from fedsynth.common.encoding import TabularEncoder
from fedsynth.common.generators import get_generator
from fedsynth.common.privacy.bookkeeping import BookKeeping
from fedsynth.common.schema import Schema
from fedsynth.common.study import (
    MAX_GRAD_NORM_RANGE,
    ConfigError,
    SiteConfig,
    StudyConfig,
    schema_fingerprint,
)
from tests.flower_support import task_identity
from tests.test_coordinator_attacks import PLAN, TINY, _initial, _send, _train_message


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    with task_identity():
        yield


@pytest.fixture()
def site(tmp_path: Path, heart_files: dict[str, Path], heart_schema_path: Path) -> SiteConfig:
    return SiteConfig("cleveland", str(heart_files["cleveland"]), str(heart_schema_path),
                      epsilon=3.0, state_dir=str(tmp_path / "state"))


def _with(study: StudyConfig, **raw: Any) -> dict[str, Any]:
    """The study's flat config with keys set to values ``StudyConfig`` may refuse: the
    coordinator writes the ConfigRecord itself, nothing on its side checks it."""
    return {**study.to_flat(), **raw}


def _raw_train_message(flat: dict[str, Any], schema: Schema) -> RecordDict:
    fp = schema_fingerprint(schema)
    content = _train_message(PLAN, _initial(schema), 1, fp)
    content["config"] = ConfigRecord({**flat, "server-round": 1, "schema-fingerprint": fp})
    return content


def _worst_clipped_norm(site: SiteConfig, schema: Schema, bound: float, rows: int = 60
                        ) -> float:
    """The largest norm, over the site's first ``rows`` patients, of one patient's
    gradient after the site's own clipping (book-keeping, the default mode) at ``bound``:
    the most one patient moves the clipped sum that DP-SGD's noise covers for ``bound``."""
    model = get_generator(PLAN.generator)(schema, seed=PLAN.seed, **TINY)
    data = model.encoder.reencode(load_encoded(site, schema), TabularEncoder(schema))
    module = model.private_module()
    worst = 0.0
    for j in range(rows):
        keeper = BookKeeping(module, bound)
        with keeper.recording():
            losses = model.per_sample_loss(module, torch.as_tensor(data[j:j + 1]))
        keeper.clip_into_grad(losses)
        grad = torch.cat([p.grad.reshape(-1).double() for p in keeper.params])
        keeper.remove_hooks()
        worst = max(worst, float(grad.norm()))
    return worst


@pytest.mark.parametrize("bound", [1e-44, math.inf, math.nan])
def test_a_clipping_bound_float32_cannot_hold_is_refused_uncharged(
    site: SiteConfig, heart_schema: Schema, bound: float
) -> None:
    """DP-SGD's noise covers one patient's clipped gradient of norm C. A site clips in
    float32, where C = 1e-44 is seven subnormal steps of 1.4e-45: on the old code the
    clip factor and the clipped gradient rounded to those steps, and one cleveland
    patient's clipped gradient had norm 2.09 C, and the site trained at that bound and
    charged its round as if the move were C (epsilon 1.8 charged, 4.1 spent at the same
    noise); inf and NaN were taken as well (weights of inf or NaN, or a torch error,
    each after the count release was drawn). With the clip in float64 (the underflow test)
    the one rounding left, of the clipped sum to float32, still makes it 1.13 C. The
    site now refuses a bound outside ``MAX_GRAD_NORM_RANGE`` before it reads a row, and
    charges nothing."""
    if bound == 1e-44:  # the attack itself: what float32 does to the site's clipping
        c32 = float(torch.tensor(bound, dtype=torch.float32))
        assert _worst_clipped_norm(site, heart_schema, bound) > 1.05 * c32
    with pytest.raises(ConfigError, match="max-grad-norm"):
        _send(site, _raw_train_message(_with(PLAN, **{"max-grad-norm": bound}), heart_schema),
              "train")
    assert load_site_state(site, PLAN.study_id).ledger.history == []


def test_within_the_range_the_clip_holds_and_an_honest_study_trains(
    site: SiteConfig, heart_schema: Schema
) -> None:
    """At the range's floor the clip holds on the site's rows up to float32's relative
    rounding, and a study at the default bound trains as before."""
    low, high = MAX_GRAD_NORM_RANGE
    for bound in (low, 1.0):
        assert _worst_clipped_norm(site, heart_schema, bound) <= bound * (1 + 1e-5)
    assert StudyConfig(max_grad_norm=high).max_grad_norm == high
    reply = _send(site, _train_message(PLAN, _initial(heart_schema), 1,
                                       schema_fingerprint(heart_schema)), "train")
    assert dict(reply["site"])["status"] == TRAINED
    assert np.isfinite(float(dict(reply["metrics"])["epsilon"]))


#: (config key, value the coordinator sends, what the site must do): "refused" is a
#: ConfigError naming the key before any row is read; "answered" a reply whose ledger
#: stays within the budget (a release the ledger pays for, or a budget refusal).
TRAIN_EXTREMES: list[tuple[str, Any, str]] = [
    *[("max-grad-norm", v, "refused") for v in (0.0, -1.0, 1e-300, 1e300)],
    *[("count-noise", v, "refused")
      for v in (0.0, -1.0, 1e-300, 1e300, math.nan, math.inf)],
    ("count-noise", 1e-3, "answered"),  # what it would cost is past the budget
    *[("sample-rate", v, "refused") for v in (0.0, -0.5, 2.0, math.nan, math.inf)],
    *[("local-epochs", v, "refused") for v in (0, -3)],
    # steps per round past MAX_STEPS_PER_ROUND: before, the site trained for ever, lock held
    *[("sample-rate", v, "refused") for v in (1e-12, 5e-6)],
    ("local-epochs", 10**9, "refused"),
    *[("grid-share", v, "refused") for v in (-0.5, 1.0, math.nan, math.inf)],
    *[("proximal-mu", v, "refused") for v in (-1.0, math.nan, math.inf)],
    *[("num-server-rounds", v, "refused") for v in (0, -1)],
    ("num-server-rounds", 10**9, "answered"),  # calibrated for 1e9 rounds: huge noise
    *[("count-bound", v, "refused") for v in (0.0, math.nan, math.inf)],
    *[("server-round", v, "answered") for v in (-5, 10**12)],
    ("accountant", "gdp", "refused"),
    *[("generator-params", json.dumps({**TINY, "loss_bound": v}), "answered")
      for v in (1e-44, 1e38)],
]


@pytest.mark.parametrize(("key", "value", "expected"), TRAIN_EXTREMES)
def test_every_number_of_a_training_round_at_an_extreme(
    site: SiteConfig, heart_schema: Schema, key: str, value: Any, expected: str
) -> None:
    """The coordinator sets one key of a training round to an extreme (the rest as an
    honest study, fedprox so that ``proximal-mu`` matters). The site refuses it with an
    error naming the key, before anything is drawn or charged, or answers within its
    budget with a release its ledger pays for (finite weights, the ledger's epsilon in
    the reply)."""
    flat = _with(PLAN, strategy="fedprox", **{"grid-share": 0.0})
    content = _raw_train_message({**flat, key: value}, heart_schema)
    if key == "server-round":
        content["config"] = ConfigRecord({**dict(content["config"]), key: value})
    if expected == "refused":
        with pytest.raises(ConfigError, match=key):
            _send(site, content, "train")
        assert load_site_state(site, PLAN.study_id).ledger.history == []
        return
    reply = _send(site, content, "train")
    spent = load_site_state(site, PLAN.study_id).ledger.epsilon(site.delta)
    assert spent <= site.epsilon * (1 + 1e-9)
    assert float(dict(reply["metrics"])["epsilon"]) == pytest.approx(spent)
    if dict(reply["site"])["status"] == TRAINED:
        assert spent > 0 and "arrays" in reply
        assert all(np.all(np.isfinite(a.numpy())) for a in reply["arrays"].values())


def test_a_crafted_model_cannot_hide_a_gradient_from_the_clip_in_float32_underflow(
    site: SiteConfig, heart_schema: Schema
) -> None:
    """Book-keeping clipping (the site's default mode) takes a row's gradient norm on a
    linear layer as |a| |g|, the layer input's norm times its output gradient's, each
    squared on its own. The coordinator sets the weights: here CTGAN's discriminator
    maps cleveland's one patient at the top of one column to activations of 1e18 per
    unit (|a|^2 = 6.4e37, finite in float32) and sends back through the next layer a
    gradient of 2e-23 per unit, whose square float32 rounds to 0 (the last layer scores
    16.6, where float32's BCE gradient is 1.2e-7). On the old code that
    layer's norm came out 0, the row's clip factor 1, and its gradient entered the
    clipped sum unclipped: 1,146 times C at C = 1e-6, so the noise (std sigma C) no
    longer covered that patient. Norms and clipped sums are now taken in float64."""
    import torch.nn.functional as F

    model = get_generator("ctgan")(heart_schema, seed=PLAN.seed)
    data = torch.as_tensor(model.encoder.reencode(load_encoded(site, heart_schema),
                                                  TabularEncoder(heart_schema)))
    rows = torch.cat([model._to_gan(data), model._real_cond(data)], dim=1)
    top2 = torch.topk(rows, 2, dim=0).values
    column = int(torch.argmax(top2[0] - top2[1]))  # one patient alone on top
    target = int(torch.argmax(rows[:, column]))
    gap = float(top2[0, column] - top2[1, column])
    threshold = float(top2[0, column]) - gap / 2
    net = model.discriminator.net
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[:, column] = 2e18 / gap  # 1e18 per unit on the target alone
        net[0].bias.fill_(-2e18 / gap * threshold)
        net[3].weight.zero_()  # its gradient g (x) a is what the norm misses
        net[3].bias.fill_(1e-3)
        net[6].weight.fill_(2e-23 / 1.19e-7)  # g = 2e-23 per unit behind the last layer
        net[6].bias.fill_(16.6)
    bound = MAX_GRAD_NORM_RANGE[0]
    module = model.private_module()
    keeper = BookKeeping(module, bound)
    with keeper.recording():  # the real part of ``per_sample_loss`` for that one row
        losses = F.binary_cross_entropy_with_logits(
            module(rows[target:target + 1]), torch.ones(1), reduction="none")
    keeper.clip_into_grad(losses)
    clipped = float(torch.cat([p.grad.reshape(-1).double() for p in keeper.params]).norm())
    keeper.remove_hooks()
    assert 0 < clipped <= bound * (1 + 1e-5), clipped / bound
