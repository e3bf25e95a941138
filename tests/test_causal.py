"""Causal knowledge (issue 17): the graph in the schema, interventions, causal checks.

The treatment-effect test runs on a SIMULATED structural causal model
(``tests/causal_scm.py``, labelled as such), the only place where the true effect is
known; everything else runs on the real heart-disease rows and the real mbi fit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsynth.cli import main as cli
from fedsynth.common.causal import CausalError, CausalGraph, GraphError, parse_graph
from fedsynth.common.generators import Generator, get_generator
from fedsynth.common.generators.marginal.plan import planned_ledger
from fedsynth.common.privacy.randomness import DPRandomness
from fedsynth.common.schema import Schema, SchemaError
from fedsynth.common.table import conform, read_table
from fedsynth.common.validation.causal import ate, causal_report

from .causal_scm import TRUE_ATE, scm_schema, simulate

SITES = ("cleveland", "hungarian", "switzerland", "va")


# ------------------------------------------------------------------------ the graph


def test_a_cycle_is_refused_with_the_cycle_named():
    with pytest.raises(GraphError, match=r"cycle: (a -> b -> c -> a|b -> c -> a -> b|"
                                         r"c -> a -> b -> c)"):
        parse_graph({"b": ["a"], "c": ["b"], "a": ["c"]}, ["a", "b", "c"])


def test_unknown_columns_and_self_loops_are_named_in_a_schema_error(heart_schema):
    raw = heart_schema.to_dict()
    raw["graph"] = {"num": ["age", "smoking"], "cp": ["cp"]}
    with pytest.raises(SchemaError) as err:
        Schema.from_dict(raw)
    assert "'smoking' is not a column of the schema" in str(err.value)
    assert "'graph.cp': a column cannot be its own cause" in str(err.value)


def test_heart_graph_is_published_with_the_schema_and_survives_a_model_file(
        heart_schema, tmp_path):
    graph = heart_schema.graph
    assert graph is not None and ("num", "cp") in graph.edges
    order = graph.topological_order(heart_schema.names)
    assert sorted(order) == sorted(heart_schema.names)  # every column, roots included
    assert all(order.index(p) < order.index(c) for p, c in graph.edges)
    assert Schema.from_dict(heart_schema.to_dict()).graph == graph
    cut = graph.intervened(["num"])
    assert cut.parents_of("num") == () and cut.parents_of("cp") == ("num",)
    # local Markov: cp is independent of age given its one cause, num
    assert ("cp", "age", ("num",)) in graph.local_independences(heart_schema.names)


# ------------------------------------------------------- interventions on a known SCM


@pytest.fixture(scope="module")
def scm_model():
    """The causal marginal generator fitted under DP (epsilon 3) on the SIMULATED SCM."""
    model = get_generator("marginal")(scm_schema(), seed=0, bins=10, causal=True)
    model.fit(simulate(100_000, seed=0), epsilon=3.0,
              randomness=DPRandomness.reproducible(1))
    return model


def test_interventions_recover_the_true_effect_and_conditioning_does_not(scm_model):
    n = 5000
    do1 = scm_model.sample(n, interventions={"T": 1}, seed=1)
    do0 = scm_model.sample(n, interventions={"T": 0}, seed=2)
    est, lo, hi = ate(do1["Y"], do0["Y"])
    assert lo <= TRUE_ATE <= hi, (est, lo, hi)
    see1 = scm_model.sample(n, conditions={"T": 1}, seed=3)
    see0 = scm_model.sample(n, conditions={"T": 0}, seed=4)
    naive, nlo, nhi = ate(see1["Y"], see0["Y"])
    assert nhi < TRUE_ATE - 2.0  # confounded by Z: the treated are the sicker ones
    real = simulate(100_000, seed=9)
    real_naive = ate(real.Y[real["T"] == 1], real.Y[real["T"] == 0])[0]
    assert abs(naive - real_naive) < 0.3  # the observational contrast is kept, too
    # do() leaves the cause alone; conditioning shifts it
    assert abs(do1["Z"].mean() - do0["Z"].mean()) < 0.2
    assert see1["Z"].mean() - see0["Z"].mean() > 2.0
    assert (do1["T"] == 1).all() and (do0["T"] == 0).all()


def test_intervention_errors_are_clear(scm_model, heart_schema):
    with pytest.raises(CausalError, match="no causal graph|does not follow a causal graph"):
        get_generator("tvae")(heart_schema).sample(5, interventions={"cp": 4})
    with pytest.raises(CausalError, match="outside the schema's domain"):
        scm_model.sample(5, interventions={"Z": 42})
    with pytest.raises(CausalError, match="both conditioned on and intervened on"):
        scm_model.sample(5, conditions={"T": 1}, interventions={"T": 0})
    with pytest.raises(CausalError, match="publishes no causal graph"):
        get_generator("marginal")(scm_schema(graph=False), causal=True)


def test_interventional_model_saves_and_samples_the_same_after_loading(scm_model, tmp_path):
    scm_model.save(tmp_path / "m.fsg")
    again = Generator.load(tmp_path / "m.fsg")
    a = scm_model.sample(200, interventions={"T": 1}, seed=5)
    b = again.sample(200, interventions={"T": 1}, seed=5)
    pd.testing.assert_frame_equal(a, b)


def test_cli_intervene_writes_rows_and_refuses_a_model_without_graph(scm_model, tmp_path,
                                                                     heart_schema):
    scm_model.save(tmp_path / "m.fsg")
    out = tmp_path / "do.csv"
    assert cli(["sample", "--model", str(tmp_path / "m.fsg"), "-n", "50",
                "--intervene", "T=1", "--out", str(out)]) == 0
    assert (pd.read_csv(out)["T"] == 1).all()
    plain = get_generator("marginal")(scm_schema(graph=False), seed=0, bins=6, iters=50)
    plain.fit(simulate(2000, seed=0), epsilon=3.0, randomness=DPRandomness.reproducible(2))
    plain.save(tmp_path / "plain.fsg")
    refused = tmp_path / "refused.csv"
    assert cli(["sample", "--model", str(tmp_path / "plain.fsg"), "-n", "5",
                "--intervene", "T=1", "--out", str(refused)]) != 0
    assert not refused.exists()
    assert cli(["sample", "--model", str(tmp_path / "m.fsg"), "-n", "5",
                "--intervene", "T", "--out", str(refused)]) != 0


# ---------------------------------------------------------- real heart-disease data


@pytest.fixture(scope="module")
def heart_tables(heart_schema, heart_files):
    frames = [read_table(heart_files[s], heart_schema) for s in SITES]
    pooled = pd.concat(frames, ignore_index=True).sample(frac=1.0, random_state=0)
    cut = int(0.7 * len(pooled))
    return pooled.iloc[:cut].reset_index(drop=True), pooled.iloc[cut:].reset_index(drop=True)


def test_graph_following_fit_measures_the_families_under_its_budget(heart_schema,
                                                                    heart_tables):
    train, hold = heart_tables
    model = get_generator("marginal")(heart_schema, seed=0, bins=6, causal=True, iters=200)
    plan = model.plan()
    families = [heart_schema.graph.family(n) for n in model.order
                if heart_schema.graph.parents_of(n)]
    assert plan.rounds == 1 and plan.per_round == len(families) and plan.select_share == 0
    model.fit(train, epsilon=3.0, randomness=DPRandomness.reproducible(3))
    assert model.fit_info["epsilon"] <= 3.0 + 1e-6
    assert [tuple(c) for c in model.fit_info["selected"]] == families
    syn = model.sample(500, seed=0)
    conform(syn, heart_schema)
    sick = model.sample(300, interventions={"num": 3}, seed=1)
    well = model.sample(300, interventions={"num": 0}, seed=2)
    # do(num) redraws its effects (exercise angina) and leaves its causes (age) alone
    assert sick["exang"].astype(float).mean() > well["exang"].astype(float).mean() + 0.2
    assert abs(sick["age"].mean() - well["age"].mean()) < 3.0
    report = causal_report(hold, syn, heart_schema)
    assert report["implied_independences"] == len(
        heart_schema.graph.local_independences(heart_schema.names))
    assert 0.0 <= report["hold_real"] <= 1.0 and report["edge_sign_agreement"] >= 0.7


def test_causal_report_tells_a_table_that_breaks_the_graph(heart_schema, heart_tables):
    train, hold = heart_tables
    same = causal_report(hold, train, heart_schema)  # real vs real: the graph's edges agree
    assert same["edges_significant_real"] >= 5 and same["edge_sign_agreement"] >= 0.8
    shuffled = train.copy()  # every column shuffled on its own: no edge survives
    for i, col in enumerate(shuffled.columns):
        shuffled[col] = shuffled[col].sample(frac=1.0, random_state=i).to_numpy()
    broken = causal_report(hold, shuffled, heart_schema)
    assert broken["hold_synthetic"] > same["hold_synthetic"]
    assert broken["edge_sign_agreement"] < same["edge_sign_agreement"]


def test_planned_ledger_of_a_graph_plan_spends_no_selection_budget(heart_schema):
    model = get_generator("marginal")(heart_schema, causal=True)
    from fedsynth.common.generators.marginal.plan import calibrate

    plan = model.plan()
    noise = calibrate(plan, 3.0, 1e-5)
    assert noise.score == float("inf")  # nothing scored, so nothing spent on scores
    assert planned_ledger(plan, noise).epsilon(1e-5) <= 3.0 + 1e-6


def test_graph_is_a_dataclass_of_parents():
    g = CausalGraph({"b": ("a",), "c": ("a", "b")})
    assert g.descendants("a") == {"b", "c"} and g.ancestors("c") == {"a", "b"}
    assert g.topological_order() == ["a", "b", "c"]


def test_federated_graph_study_keeps_each_hospital_and_its_budget(tmp_path):
    """Real ServerApp and ClientApp in process: families measured per site, in clear."""
    from fedsynth.simulations.datasets import bundled_schema_path, bundled_site_files
    from fedsynth.simulations.study_api import run_study

    files = bundled_site_files("heart_disease")
    result = run_study({name: files[name] for name in ("cleveland", "switzerland", "va")},
                       bundled_schema_path("heart_disease"), generator="marginal",
                       generator_params={"causal": True, "bins": 6, "iters": 100},
                       epsilon=3.0, seed=0, min_sites=2, out=tmp_path / "study",
                       reproducible_noise=True)  # what it learns, not the noise's luck
    model = result.model
    spent = [p["epsilon_spent"] for p in result.privacy.values()]
    assert 2.99 <= max(spent) <= 3.0
    assert model.graph is not None and model.sites == ["cleveland", "switzerland", "va"]
    swiss = model.sample(300, site="switzerland", seed=1)
    cleve = model.sample(300, site="cleveland", seed=1)
    # every Swiss row lacks cholesterol, almost no Cleveland row does: per-site case
    # mixes. (Swiss's share is blurred: its noise, 11 patients per cell at this budget,
    # spread over chol's 11 value bins, puts a third to half of its mass in them.)
    pooled = model.sample(900, seed=1)["chol"].isna().mean()
    assert swiss["chol"].isna().mean() > max(0.5, 1.5 * pooled)
    assert cleve["chol"].isna().mean() < min(0.3, 0.5 * pooled)
    sick = model.sample(300, site="cleveland", interventions={"num": 3}, seed=2)
    assert (sick["num"].astype(int) == 3).all()
    assert sick["exang"].astype(float).mean() > cleve["exang"].astype(float).mean()


# ------------------------------------------- hospitals' mechanisms, shrunk and calibrated


def test_a_small_hospital_follows_the_pooled_mechanism_and_a_large_one_keeps_its_own():
    """Counts here are made up (two hospitals, a binary parent and child): the rule is
    arithmetic, so a known truth is easiest to read."""
    from fedsynth.common.generators.marginal.causal import partial_pool

    pooled = np.array([[0.9, 0.1], [0.2, 0.8]])  # P(child | parent), all hospitals
    large = np.array([[500.0, 500.0], [500.0, 500.0]])  # its own: child independent
    small = np.array([[3.0, 0.0], [0.0, 0.0]])  # a few patients, mostly noise
    noise = np.array([10.0, 10.0])  # each hospital's noise std per cell
    table = partial_pool(np.stack([large, small]), pooled, noise, 1.0)
    assert np.allclose(table.sum(axis=-1), 1.0)
    assert abs(table[0, 0, 0] - 0.5) < 0.05 and abs(table[0, 1, 1] - 0.5) < 0.05
    assert abs(table[1, 1, 1] - 0.8) < 1e-9  # no counts at all: the pooled mechanism
    assert abs(table[1, 0, 0] - 0.9) < 0.02  # 3 counts against 14 pseudo-patients
    alone = partial_pool(np.stack([large, small]), pooled, noise, 0.0)
    assert alone[1, 0, 0] == 1.0  # pooling 0: the hospital's own counts only


def test_calibration_matches_the_measured_marginal_and_keeps_the_mechanism():
    """A two-node graph a -> b with made-up tables: after calibration b's implied
    marginal is its measured one and the odds ratio between a and b is unchanged."""
    from fedsynth.common.generators.marginal.causal import Mechanism, calibrate

    a = Mechanism("a", (), np.array([0.5, 0.5]))
    b = Mechanism("b", ("a",), np.array([[0.8, 0.2], [0.4, 0.6]]))  # implies b = [.6, .4]
    target = np.array([0.3, 0.7])
    out = calibrate([a, b], {"a": a.table, "b": target}, draws=50_000)
    implied = 0.5 * out[1].table[0] + 0.5 * out[1].table[1]
    assert np.allclose(implied, target, atol=0.01)

    def odds(t: np.ndarray) -> float:
        return float(t[0, 0] / t[0, 1] / (t[1, 0] / t[1, 1]))

    assert abs(odds(out[1].table) - odds(b.table)) / odds(b.table) < 1e-6
    assert np.allclose(out[0].table, a.table)


def test_the_causal_area_shows_each_independence_and_fails_reversed_effects(
        heart_schema, heart_tables):
    from fedsynth.common.validation import validate
    from fedsynth.common.validation.verdict import verdict

    train, hold = heart_tables
    good = validate(train, hold, train.sample(frac=1.0, random_state=1), heart_schema,
                    areas=("causal",))
    tests = heart_schema.graph.local_independences(heart_schema.names)
    per_test = [m for m in good.metrics if m.name == "independence_p"]
    assert len(per_test) == len(tests) and all(m.reference is not None for m in per_test)
    agree = next(m for m in good.metrics if m.name == "causal_edge_sign_agreement")
    assert agree.passed is True and good.headline_values["causal_edge_sign_agreement"] >= 0.8
    flipped = train.copy()  # the disease now lowers exercise angina: an edge reversed
    flipped["num"] = flipped["num"].map({0: 3, 1: 0, 2: 0, 3: 0, 4: 0})
    bad = validate(train, hold, flipped, heart_schema, areas=("causal",))
    sign = next(m for m in bad.metrics if m.name == "causal_edge_sign_agreement")
    assert sign.passed is False and sign.value < agree.value
    area = next(a for a in verdict(bad).areas if a.area == "causal")
    assert area.passed is False and "causal=true" in area.advice


# ------------------------------------------------- bins and code sets on the graph path


def test_graph_bins_keep_equal_mass_cuts_and_cap_their_width_in_the_support():
    from fedsynth.common.dp_histogram import equal_mass_cuts, mass_and_width_cuts

    rng = np.random.default_rng(0)
    # a skewed lab over a wide public range (AMLSG's wbc is bounded 0-600): most
    # patients in the first cells, a long tail, the top of the range empty
    counts, _ = np.histogram(np.clip(rng.lognormal(3.0, 1.0, 3000), 0, 600), 64, (0, 600))
    noisy = counts + rng.normal(0.0, 5.0, 64)
    mass = equal_mass_cuts(noisy, 6, 5.0)
    cuts = mass_and_width_cuts(noisy, 6, 5.0)
    assert set(mass) <= set(cuts) and len(cuts) - 1 <= 12
    assert cuts[0] == 0 and cuts[-1] == 64 and np.all(np.diff(cuts) >= 1)
    # the tail where 98% of patients lie is cut into bins no wider than a sixth of it
    cdf = np.cumsum(counts) / counts.sum()
    lo, hi = int(np.argmax(cdf > 0.01)), int(np.argmax(cdf >= 0.99)) + 1
    inside = [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if a >= lo and b <= hi]
    assert inside and max(b - a for a, b in inside) <= int(np.ceil((hi - lo) / 6)) + 2
    # the empty top of the range stays one bin: no cells spent where nobody is
    assert cuts[-2] < 40


@pytest.mark.slow
def test_graph_fit_on_a_code_set_charges_its_plan_and_keeps_gene_frequencies():
    """Real AMLSG rows (../shared/data/amlsg): with the schema's graph the genes' 1-way
    marginals come from the bounded code histogram (one patient adds to few codes) and
    the numeric bins from the fine release; the ledger is exactly the plan's releases
    and an independent accountant agrees with the reported epsilon."""
    from opacus.accountants import RDPAccountant

    from fedsynth.common.generators.marginal.plan import calibrate
    from fedsynth.simulations.datasets import load_site_frames

    if not (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amlsg").is_dir():
        pytest.skip("AMLSG data not found in ../shared/data/amlsg")
    schema, sites = load_site_frames("amlsg")
    frame = pd.concat(list(sites.values()), ignore_index=True)
    model = get_generator("marginal")(schema, seed=0, causal=True, iters=200)
    model.fit(frame, epsilon=3.0, randomness=DPRandomness.reproducible(4))
    plan = model.plan()
    assert plan.code_bound > 0 and plan.fine > 0
    ledger = model.fit_info["ledger"]
    history = list(zip(ledger["noise"], ledger["rate"], ledger["count"], strict=True))
    noise = calibrate(plan, 3.0, 1e-5)
    # the plan's releases that cost anything (it lists an unspent score release of
    # infinite noise: a graph plan selects nothing)
    planned = [tuple(h) for h in planned_ledger(plan, noise).history if np.isfinite(h[0])]
    assert history == planned
    assert [count for _, _, count in history] == [plan.fine, plan.attributes,
                                                  plan.code_bound, plan.per_round]
    acc = RDPAccountant()
    for sigma, rate, count in history:
        for _ in range(count):
            acc.step(noise_multiplier=sigma, sample_rate=rate)
    assert abs(acc.get_epsilon(delta=1e-5) - model.fit_info["epsilon"]) < 1e-6
    genes = schema.codesets["mut"]
    syn = model.sample(len(frame), seed=0)
    real_freq = frame[genes].astype(float).mean().to_numpy()
    syn_freq = syn[genes].astype(float).mean().to_numpy()
    assert np.corrcoef(real_freq, syn_freq)[0, 1] >= 0.95
    # the skewed labs get bins where the patients are, not six equal slices of 0-600
    assert model.sizes["wbc"] > 6
    assert abs(syn["wbc"].median() - frame["wbc"].median()) < 0.5 * frame["wbc"].std()
