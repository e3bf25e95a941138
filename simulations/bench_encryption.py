"""Overhead of CKKS aggregation per round: bytes on the wire and wall time.

Run it as a script (it is a measurement, not a test: timings depend on the machine)::

    python -m fedsynth.simulations.bench_encryption --out benchmarks/encryption.md

For each model it plays one encrypted FedAvg round with real TenSEAL ciphertexts and
the study's parameters: every site encrypts its weighted update, the coordinator checks
each reply and adds them with a key-less context, a site decrypts the weighted mean.
Each step is repeated and the median reported, because single timings of millisecond
operations are dominated by scheduler noise. Plaintext bytes are the float32 bytes of
the state, what an unencrypted Flower ArrayRecord carries; encrypted bytes are the
serialized ciphertexts. The relative error column is measured against the plaintext
FedAvg of the same weights, so the table also shows that the speed came at no cost in
accuracy. Local training time is measured by the study's own benchmarks; compare the
"added per round" column with it.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
import torch

from fedsynth.common.encryption import (
    COEFF_MOD_BIT_SIZES,
    POLY_MODULUS_DEGREE,
    SCALE_BITS,
    add_encrypted,
    check_ciphertexts,
    decrypt_weighted_mean,
    encrypt_weighted_update,
    load_context,
    make_secret_context,
    public_context_bytes,
)

DEFAULT_COUNTS = (242, 235, 98, 160)

COLUMNS = [
    ("model", "model"),
    ("params", "parameters"),
    ("sites", "sites"),
    ("plain_bytes", "plaintext bytes / site"),
    ("encrypted_bytes", "encrypted bytes / site"),
    ("ratio", "encrypted / plaintext"),
    ("ciphertexts", "ciphertexts / site"),
    ("encrypt_s", "encrypt (s, per site)"),
    ("check_s", "coordinator check (s, all sites)"),
    ("aggregate_s", "coordinator aggregate (s, all sites)"),
    ("decrypt_s", "decrypt (s, per site)"),
    ("added_s", "added per round (s)"),
    ("max_rel_error", "max relative error vs plaintext FedAvg"),
]


def _mlp_small() -> torch.nn.Module:
    """About 15k parameters: the size of the default generator on a clinical table."""
    return torch.nn.Sequential(
        torch.nn.Linear(40, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 24),
    )


def _mlp_1m() -> torch.nn.Module:
    """About 1M parameters (one 1000 x 1000 layer): the issue's large reference model."""
    return torch.nn.Sequential(torch.nn.Linear(1000, 1000))


MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "MLP 40-128-64-24": _mlp_small,
    "MLP 1000x1000": _mlp_1m,
}


def _site_states(model: torch.nn.Module, n_sites: int, seed: int) -> list[dict[str, np.ndarray]]:
    base = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    rng = np.random.default_rng(seed)
    return [
        {k: (v + rng.normal(0.0, 0.01, v.shape)).astype(np.float32) for k, v in base.items()}
        for _ in range(n_sites)
    ]


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_model(
    name: str, model: torch.nn.Module, counts: tuple[int, ...], repeats: int, seed: int
) -> dict[str, Any]:
    """One row of the table: medians over ``repeats`` full encrypted rounds."""
    secret = make_secret_context()
    public = load_context(public_context_bytes(secret), require_secret=False)
    states = _site_states(model, len(counts), seed)
    total = float(sum(counts))
    reference = np.concatenate(
        [
            sum(c * s[k].astype(np.float64) for s, c in zip(states, counts, strict=True)).ravel()
            / total
            for k in sorted(states[0])
        ]
    )
    encrypt_t, check_t, aggregate_t, decrypt_t, errors = [], [], [], [], []
    updates = []
    for _ in range(repeats):
        updates = []
        for state, count in zip(states, counts, strict=True):
            update, seconds = _timed(lambda s=state, c=count: encrypt_weighted_update(secret, s, c))
            updates.append(update)
            encrypt_t.append(seconds)
        layout = updates[0].layout
        _, seconds = _timed(
            lambda u=updates, lay=layout: [check_ciphertexts(public, x.chunks, lay) for x in u]
        )
        check_t.append(seconds)
        summed, seconds = _timed(lambda u=updates: add_encrypted(public, [x.chunks for x in u]))
        aggregate_t.append(seconds)
        (mean, _), seconds = _timed(
            lambda s=summed, lay=layout: decrypt_weighted_mean(secret, s, lay)
        )
        decrypt_t.append(seconds)
        got = np.concatenate([mean[k].astype(np.float64).ravel() for k in layout.keys])
        errors.append(float(np.max(np.abs(got - reference)) / np.max(np.abs(reference))))

    plain = sum(v.nbytes for v in states[0].values())
    encrypted = updates[0].nbytes
    row = {
        "model": name,
        "params": sum(v.size for v in states[0].values()),
        "sites": len(counts),
        "plain_bytes": plain,
        "encrypted_bytes": encrypted,
        "ratio": encrypted / plain,
        "ciphertexts": len(updates[0].chunks),
        "encrypt_s": statistics.median(encrypt_t),
        "check_s": statistics.median(check_t),
        "aggregate_s": statistics.median(aggregate_t),
        "decrypt_s": statistics.median(decrypt_t),
        "max_rel_error": max(errors),
    }
    # A round waits for the slowest site's encryption, the coordinator, then decryption.
    row["added_s"] = row["encrypt_s"] + row["check_s"] + row["aggregate_s"] + row["decrypt_s"]
    return row


def _format(key: str, value: Any) -> str:
    if key in {"plain_bytes", "encrypted_bytes"}:
        return f"{value:,} ({value / 2**20:.2f} MiB)"
    if key == "ratio":
        return f"{value:.2f}x"
    if key == "max_rel_error":
        return f"{value:.1e}"
    if key.endswith("_s"):
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_report(rows: list[dict[str, Any]], out: Path, repeats: int) -> Path:
    """The Markdown table at ``out`` and the raw numbers next to it as CSV."""
    out.parent.mkdir(parents=True, exist_ok=True)
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [
        "# Encrypted aggregation overhead (CKKS, TenSEAL)",
        "",
        f"One FedAvg round per repetition, median of {repeats}; weighted mean with the "
        "count slot (the coordinator learns no site's row count).",
        "",
        f"- CKKS: poly modulus {POLY_MODULUS_DEGREE}, coefficient chain "
        f"{list(COEFF_MOD_BIT_SIZES)}, scale 2^{SCALE_BITS}, symmetric encryption, "
        f"no Galois or relinearisation keys; TenSEAL {ts.__version__}",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "- Plaintext bytes: float32 state; encrypted bytes: serialized ciphertexts "
        "(the aggregate sent back to each site has the same size).",
        "- Added per round: one site's encrypt + coordinator check and aggregate of all "
        "replies + one site's decrypt (sites encrypt and decrypt in parallel).",
        "",
        header,
        rule,
        *("| " + " | ".join(_format(k, row[k]) for k, _ in COLUMNS) + " |" for row in rows),
        "",
    ]
    out.write_text("\n".join(lines))
    csv_path = out.with_suffix(".csv")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[k for k, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/encryption.md"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--counts",
        type=int,
        nargs="+",
        default=list(DEFAULT_COUNTS),
        help="row count of each site (one site per number)",
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    args = parser.parse_args(argv)
    if args.repeats < 1 or any(c < 1 for c in args.counts):
        parser.error("--repeats and every --counts value must be at least 1")
    torch.manual_seed(args.seed)
    rows = []
    for name in args.models:
        row = bench_model(name, MODELS[name](), tuple(args.counts), args.repeats, args.seed)
        rows.append(row)
        print(
            f"{name}: {row['params']:,} params, {row['ratio']:.2f}x bytes, "
            f"encrypt {row['encrypt_s']:.3f}s, aggregate {row['aggregate_s']:.3f}s, "
            f"decrypt {row['decrypt_s']:.3f}s, max rel error {row['max_rel_error']:.1e}",
            flush=True,
        )
    csv_path = write_report(rows, args.out, args.repeats)
    print(f"wrote {args.out} and {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
