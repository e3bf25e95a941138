"""The verdict's advice names the generator to try next, from the one that ran.

Why: the generic "try another generator" after a failing default study sent users to
ctgan or ddpm, which do no better there; the marginal generator clears clustering on
the default study (docs/generators.md, "Which generator")."""

from __future__ import annotations

from fedsynth.common.validation.metric import ValidationResult, metric
from fedsynth.common.validation.verdict import verdict


def _failing_detection() -> ValidationResult:
    # a judged detection check that fails and a judged fidelity check that passes
    return ValidationResult([
        metric("detection_auroc_gradient_boosting", "detection", 0.95, "lower",
               "detection AUROC", threshold=0.75),
        metric("fidelity", "fidelity", 0.95, "higher", "fidelity", threshold=0.85),
    ])


def _advice(generator: str | None) -> str:
    v = verdict(_failing_detection(), rounds=10, generator=generator)
    area = {a.area: a for a in v.areas}
    assert area["fidelity"].passed and area["fidelity"].advice == ""
    assert area["detection"].passed is False
    return area["detection"].advice


def test_a_deep_generator_is_sent_to_the_marginal_one() -> None:
    for deep in ("tvae", "ctgan", "ddpm"):
        text = _advice(deep)
        assert "--generator marginal" in text and '"causal": true' in text
        assert "{another}" not in text


def test_the_marginal_generator_is_sent_to_its_graph_or_a_deep_one() -> None:
    text = _advice("marginal")
    assert '"causal": true' in text and "--generator tvae|ddpm" in text
    assert "--generator marginal" not in text


def test_without_a_known_generator_every_family_is_named() -> None:
    assert "marginal|tvae|ddpm|ctgan" in _advice(None)


def test_the_marginal_generator_is_not_told_to_train_longer() -> None:
    # it measures once: --rounds and --local-epochs change nothing it releases, so the
    # advice sent its users to flags that did nothing
    text = _advice("marginal")
    assert "--rounds" not in text and "--local-epochs" not in text and "{longer}" not in text
    assert "larger budget" in text or "raise the budget" in text
    for deep in ("tvae", "ctgan", "ddpm"):
        assert "train longer (--rounds, --local-epochs)" in _advice(deep)


def test_few_rounds_are_noted_only_for_a_generator_that_trains() -> None:
    note = "a verdict after so few rounds says little"
    assert any(note in n for n in verdict(_failing_detection(), rounds=2,
                                          generator="tvae").notes)
    assert not verdict(_failing_detection(), rounds=2, generator="marginal").notes


def test_no_area_advice_keeps_a_placeholder() -> None:
    failing = ValidationResult([
        metric(f"m_{area}", area, 0.0, "higher", area, threshold=0.5)
        for area in ("fidelity", "diversity", "utility", "survival", "causal",
                     "clustering", "detection", "privacy")
    ])
    for generator in ("tvae", "marginal", None):
        for a in verdict(failing, rounds=10, generator=generator).areas:
            assert a.passed is False and a.advice, (generator, a)
            assert "{another}" not in a.advice and "{longer}" not in a.advice
