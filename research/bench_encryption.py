"""Overhead of CKKS aggregation per round, next to the round's local training.

Run it as a script (it is a measurement, not a test: timings depend on the machine)::

    python research/bench_encryption.py --out benchmarks/encryption.md

Part 1, per round. For each model (the default TVAE, and the same TVAE widened to about
1M parameters), the four heart-disease hospitals train for ``--repeats`` real rounds
with ``client.site.train_site`` (DP-SGD at the study's defaults, on the sites' real
rows), and each round is then aggregated the encrypted way with real TenSEAL
ciphertexts: every site encrypts its weighted update, the coordinator checks each reply
and adds them with a key-less context, a site decrypts the weighted mean, which is the
next round's starting model. Reported per round (medians): bytes per site in clear
(float32) and encrypted, the wall time of each crypto step, the local training time of
the slowest site (sites train in parallel, so a round waits for the slowest), and the
added wall time as a share of that round. The relative error column compares the
decrypted mean with the plaintext FedAvg of the same weights and DP counts.

Part 2, quality (``--study-rounds N``, 0 to skip). The heart-disease study is run with
``fedsynth simulate`` with and without ``--secure-aggregation ckks`` at the same seed,
and without encryption at further seeds to show how much the scores move from seed to
seed; encryption should move them far less than that.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
import torch

from fedsynth.client.site import SiteState, train_site
from fedsynth.common.encryption import (
    COEFF_MOD_BIT_SIZES,
    POLY_MODULUS_DEGREE,
    SCALE_BITS,
    StateLayout,
    add_encrypted,
    check_ciphertexts,
    decrypt_weighted_mean,
    encrypt_weighted_update,
    load_context,
    make_secret_context,
    public_context_bytes,
)
from fedsynth.common.generators import Generator, get_generator
from fedsynth.common.study import StudyConfig, schema_fingerprint
from fedsynth.server.app import SECONDS_FEDERATED, read_timings
from fedsynth.simulations.datasets import bundled_schema, bundled_sites

DATASET = "heart_disease"

# The default generator, and the same architecture widened to about 1M parameters (the
# issue's large reference point) so its training time is real too.
MODELS: dict[str, dict[str, Any]] = {
    "TVAE default": {},
    "TVAE hidden 680 (~1M)": {"hidden": 680},
}

COLUMNS = [
    ("model", "model"),
    ("params", "parameters"),
    ("sites", "sites"),
    ("plain_bytes", "plaintext bytes / site"),
    ("encrypted_bytes", "encrypted bytes / site"),
    ("ratio", "encrypted / plaintext"),
    ("ciphertexts", "ciphertexts / site"),
    ("encrypt_s", "encrypt (s, slowest site)"),
    ("check_s", "coordinator check (s, all sites)"),
    ("aggregate_s", "coordinator aggregate (s, all sites)"),
    ("decrypt_s", "decrypt (s, per site)"),
    ("added_s", "added per round (s)"),
    ("train_s", "local training per round (s, slowest site)"),
    ("added_pct", "added wall time per round"),
    ("max_rel_error", "max relative error vs plaintext FedAvg"),
]

QUALITY_KEYS = (
    "fidelity",
    "correlation_similarity",
    "contingency_similarity",
    "tstr_auroc",
    "trtr_auroc",
    "detection_auroc",
    "prdc_coverage",
    "dcr_share_closer_to_train",
    "membership_inference_auroc",
)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _flat(state: dict[str, np.ndarray], keys: tuple[str, ...]) -> np.ndarray:
    return np.concatenate([np.asarray(state[k], dtype=np.float64).ravel() for k in keys])


def bench_model(name: str, params: dict[str, Any], repeats: int, seed: int) -> dict[str, Any]:
    """One row of the table: ``repeats`` real rounds of the four hospitals, encrypted."""
    schema = bundled_schema(DATASET)
    sites = bundled_sites(DATASET)
    study = StudyConfig(generator_params=params, seed=seed, num_server_rounds=max(repeats, 2))
    fp = schema_fingerprint(schema)
    model = get_generator(study.generator)(schema, seed=seed, **params)
    global_state = model.state_dict()
    layout = StateLayout.from_state(global_state, count_bound=study.count_bound)
    secret = make_secret_context()
    public = load_context(public_context_bytes(secret), require_secret=False)
    states = {s.name: SiteState() for s in sites}
    train_t, encrypt_t, check_t, aggregate_t, decrypt_t, errors = [], [], [], [], [], []
    updates: list[Any] = []
    for server_round in range(1, repeats + 1):
        replies = []
        round_train = []
        for site in sites:
            reply, seconds = _timed(
                lambda s=site, g=global_state, r=server_round: train_site(
                    s, study, fp, g, states[s.name], r
                )
            )
            if reply.arrays is None:
                raise RuntimeError(f"{site.name} did not train in round {server_round}: "
                                   f"{reply.status} {reply.problems}")
            replies.append(reply)
            round_train.append(seconds)
        train_t.append(max(round_train))
        counts = [r.metrics["num-examples"] for r in replies]
        updates, round_encrypt = [], []
        for reply, count in zip(replies, counts, strict=True):
            update, seconds = _timed(
                lambda r=reply, c=count: encrypt_weighted_update(secret, r.arrays, c,
                                                                 layout=layout)
            )
            updates.append(update)
            round_encrypt.append(seconds)
        encrypt_t.append(max(round_encrypt))
        _, seconds = _timed(
            lambda us=updates: [check_ciphertexts(public, u.chunks, layout) for u in us]
        )
        check_t.append(seconds)
        summed, seconds = _timed(lambda us=updates: add_encrypted(public, [u.chunks for u in us]))
        aggregate_t.append(seconds)
        (mean, _), seconds = _timed(lambda s=summed: decrypt_weighted_mean(secret, s, layout))
        decrypt_t.append(seconds)
        reference = sum(
            c * _flat(r.arrays, layout.keys) for r, c in zip(replies, counts, strict=True)
        ) / float(sum(counts))
        got = _flat(mean, layout.keys)
        errors.append(float(np.max(np.abs(got - reference)) / np.max(np.abs(reference))))
        global_state = mean

    plain = sum(np.asarray(v).nbytes for v in global_state.values())
    encrypted = updates[0].nbytes
    row = {
        "model": name,
        "params": layout.n_params,
        "sites": len(sites),
        "plain_bytes": plain,
        "encrypted_bytes": encrypted,
        "ratio": encrypted / plain,
        "ciphertexts": len(updates[0].chunks),
        "encrypt_s": statistics.median(encrypt_t),
        "check_s": statistics.median(check_t),
        "aggregate_s": statistics.median(aggregate_t),
        "decrypt_s": statistics.median(decrypt_t),
        "train_s": statistics.median(train_t),
        "max_rel_error": max(errors),
    }
    # A round waits for the slowest site's encryption, the coordinator, then decryption.
    row["added_s"] = row["encrypt_s"] + row["check_s"] + row["aggregate_s"] + row["decrypt_s"]
    row["added_pct"] = 100.0 * row["added_s"] / row["train_s"]
    return row


def run_study(
    out: Path, rounds: int, seed: int, secure: bool, n_synthetic: int
) -> tuple[dict[str, Any], np.ndarray]:
    """One ``fedsynth simulate`` run in a fresh process (Ray starts and stops with it).

    Returns the scores and the final generator's weights as one vector.
    """
    cmd = [
        sys.executable, "-m", "fedsynth.cli", "simulate",
        "--dataset", DATASET, "--rounds", str(rounds), "--seed", str(seed),
        "--n-synthetic", str(n_synthetic), "--out", str(out),
        "--secure-aggregation", "ckks" if secure else "none",
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    if secure and not summary.get("secure_aggregation", {}).get("released_by"):
        statuses = [[s["status"] for s in r["sites"]] for r in summary["rounds"]]
        raise RuntimeError(
            f"{out}: the encrypted study has no release record "
            f"({summary.get('secure_aggregation')}; statuses {statuses}); output:\n"
            f"{done.stdout[-3000:]}"
        )
    head = json.loads((out / "validation.json").read_text())["validation"]["headline"]
    state = Generator.load(out / "model.fsg").state_dict()
    return {
        "seed": seed,
        "secure": secure,
        "seconds_federated": read_timings(out)[SECONDS_FEDERATED],  # not in summary.json
        "seconds_wall": wall,
        "max_epsilon": max(s["epsilon"] or 0.0 for s in summary["sites"].values()),
        **{k: head.get(k) for k in QUALITY_KEYS},
    }, _flat(state, tuple(sorted(state)))


def bench_quality(rounds: int, seeds: list[int], n_synthetic: int) -> list[dict[str, Any]]:
    """Encrypted and plaintext at ``seeds[0]``; plaintext at the other seeds for the spread."""
    runs, weights = [], []
    with tempfile.TemporaryDirectory(prefix="fedsynth-bench-") as tmp:
        plan = [(seeds[0], True)] + [(s, False) for s in seeds]
        for seed, secure in plan:
            out = Path(tmp) / f"{'ckks' if secure else 'plain'}-{seed}"
            run, flat = run_study(out, rounds, seed, secure, n_synthetic)
            runs.append(run)
            weights.append(flat)
            print(f"study seed {seed} {'ckks' if secure else 'plain'}: "
                  f"fidelity {run['fidelity']:.4f}, tstr {run['tstr_auroc']:.4f}, "
                  f"{run['seconds_federated']:.0f}s federated", flush=True)
    # How far encryption moved the released generator: CKKS error plus release flooding.
    encrypted, plain = weights[0], weights[1]
    runs[0]["weights_rel_diff"] = float(np.max(np.abs(encrypted - plain)) / np.max(np.abs(plain)))
    return runs


def _format(key: str, value: Any) -> str:
    if key in {"plain_bytes", "encrypted_bytes"}:
        return f"{value:,} ({value / 2**20:.2f} MiB)"
    if key == "ratio":
        return f"{value:.2f}x"
    if key == "added_pct":
        return f"+{value:.1f}%"
    if key == "max_rel_error":
        return f"{value:.1e}"
    if key.endswith("_s"):
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _quality_lines(runs: list[dict[str, Any]], rounds: int) -> list[str]:
    secure = next(r for r in runs if r["secure"])
    same = next(r for r in runs if not r["secure"] and r["seed"] == secure["seed"])
    plain = [r for r in runs if not r["secure"]]
    seeds = ", ".join(str(r["seed"]) for r in plain)
    lines = [
        "## Synthetic data quality with and without encryption",
        "",
        f"`fedsynth simulate --dataset {DATASET} --rounds {rounds}` (4 hospitals, default "
        "generator, DP epsilon 3 per site, validation against held-out patients), with "
        f"`--secure-aggregation ckks` and without at seed {secure['seed']}; the seed-to-seed "
        f"spread is the range of the plaintext runs at seeds {seeds}.",
        "",
        f"| metric | ckks, seed {secure['seed']} | plaintext, seed {same['seed']} | "
        "difference | seed-to-seed range (plaintext) |",
        "|---|---|---|---|---|",
    ]
    for key in QUALITY_KEYS:
        values = [r[key] for r in plain if r[key] is not None]
        if secure[key] is None or same[key] is None or not values:
            continue
        lines.append(
            f"| {key} | {secure[key]:.4f} | {same[key]:.4f} | "
            f"{secure[key] - same[key]:+.4f} | {max(values) - min(values):.4f} |"
        )
    lines += [
        f"| final generator weights, max relative difference | "
        f"{secure['weights_rel_diff']:.1e} | | | |",
        f"| max epsilon (any site) | {secure['max_epsilon']:.3f} | {same['max_epsilon']:.3f} "
        "| | |",
        f"| federated wall time (s) | {secure['seconds_federated']:.1f} | "
        f"{same['seconds_federated']:.1f} | "
        f"{secure['seconds_federated'] - same['seconds_federated']:+.1f} | |",
        "",
    ]
    return lines


def write_report(
    rows: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    out: Path,
    repeats: int,
    rounds: int,
) -> Path:
    """The Markdown report at ``out`` and the per-round numbers next to it as CSV."""
    out.parent.mkdir(parents=True, exist_ok=True)
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [
        "# Encrypted aggregation overhead (CKKS, TenSEAL)",
        "",
        "Written by `python research/bench_encryption.py`.",
        "",
        "## Per round",
        "",
        f"{repeats} real rounds of the {DATASET} hospitals per model (DP-SGD with "
        "`client.site.train_site` at the study defaults, on each hospital's real rows), "
        "each aggregated the encrypted way with the count slot (the coordinator learns "
        "no site's row count); medians over the rounds.",
        "",
        f"- CKKS: poly modulus {POLY_MODULUS_DEGREE}, coefficient chain "
        f"{list(COEFF_MOD_BIT_SIZES)}, scale 2^{SCALE_BITS}, symmetric encryption, "
        f"no Galois or relinearisation keys; TenSEAL {ts.__version__}, torch "
        f"{torch.__version__}",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()} (timings move with machine load)",
        "- Plaintext bytes: float32 state, what an unencrypted Flower ArrayRecord carries; "
        "encrypted bytes: serialized ciphertexts (the aggregate sent back to each site has "
        "the same size).",
        "- Added per round: the slowest site's encrypt + coordinator check and aggregate of "
        "all replies + one site's decrypt (sites encrypt and decrypt in parallel). Added "
        "wall time per round: that, as a share of the slowest site's local training "
        "(DP-SGD plus the DP loss report), the round's length without encryption.",
        "",
        header,
        rule,
        *("| " + " | ".join(_format(k, row[k]) for k, _ in COLUMNS) + " |" for row in rows),
        "",
    ]
    if runs:
        lines += _quality_lines(runs, rounds)
    out.write_text("\n".join(lines))
    csv_path = out.with_suffix(".csv")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[k for k, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/encryption.md"))
    parser.add_argument("--repeats", type=int, default=3, help="real rounds per model")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--study-rounds", type=int, default=5,
                        help="rounds of the with/without-encryption study (0: skip it)")
    parser.add_argument("--study-seeds", type=int, nargs="+", default=[42, 43, 44],
                        help="the first seed runs with and without encryption, the rest "
                        "without, for the seed-to-seed spread")
    parser.add_argument("--n-synthetic", type=int, default=1000,
                        help="rows sampled in each study (fixed, so runs compare)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.study_rounds < 0:
        parser.error("--repeats must be at least 1 and --study-rounds at least 0")
    rows = []
    for name in args.models:
        row = bench_model(name, MODELS[name], args.repeats, args.seed)
        rows.append(row)
        print(
            f"{name}: {row['params']:,} params, {row['ratio']:.2f}x bytes, "
            f"encrypt {row['encrypt_s']:.3f}s, aggregate {row['aggregate_s']:.3f}s, "
            f"decrypt {row['decrypt_s']:.3f}s, training {row['train_s']:.2f}s, "
            f"added {row['added_pct']:.1f}%, max rel error {row['max_rel_error']:.1e}",
            flush=True,
        )
    runs = (
        bench_quality(args.study_rounds, args.study_seeds, args.n_synthetic)
        if args.study_rounds
        else []
    )
    csv_path = write_report(rows, runs, args.out, args.repeats, args.study_rounds)
    print(f"wrote {args.out} and {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
