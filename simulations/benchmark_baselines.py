"""External baselines of the benchmark, trained centrally on the pooled rows, no DP.

- ``independent``: every column drawn on its own from its real-train marginal (the
  empirical distribution, missing values included). It keeps each column and nothing
  between columns: a generator that does not beat it on pairwise metrics (correlation,
  contingency) or on TSTR has not learnt the joint distribution.
- ``sdv_ctgan`` / ``sdv_tvae``: CTGAN and TVAE as the ``ctgan`` package (SDV's own
  implementation) ships them, at the package defaults unless ``epochs`` is given.
  With ``batch_rows`` (``fedsynth benchmark --quick``) CTGAN's batch is at most the
  training rows (``quick_batch``) instead of 500 rows drawn from, say, the MIMIC-III
  demo's 80: the same one step per epoch, each on 80 rows not 500 (its discriminator
  reads 10 packed rows of ~5,000 one-hot and condition columns, so on that table a
  step cost 6x more for rows it had already seen). TVAE's batches are already at most
  the rows (its loader does not resample).
- ``sdv_gaussian_copula``: SDV's GaussianCopulaSynthesizer.

The SDV family comes from the optional ``benchmark`` extra (``pip install -e
.[benchmark]``); when it is missing, :func:`sdv_missing` says so and only those
baselines are skipped. None of them is private: they are reference points for what
pooled, non-private training of known tools reaches, never something to release.

The packages cannot read the schema's missing-value model, so a table goes to them as
numbers and strings: a numeric column that can be missing gets an indicator column
and its gaps filled with the median; a category is a string, missing is a category of
its own. Samples are mapped back (gaps restored, categories parsed, numbers clipped to
the schema's public domain and rounded for integer columns).
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..common.schema import Schema

MISSING = "<missing>"
INDICATOR = "__missing"
SDV_BASELINES = ("sdv_ctgan", "sdv_tvae", "sdv_gaussian_copula")
BASELINES = ("independent", *SDV_BASELINES)


@dataclass
class BaselineRun:
    synthetic: pd.DataFrame
    seconds: float
    epochs: int | None = None


def sdv_missing() -> str:
    """Why the SDV baselines cannot run here ('' when they can)."""
    absent = [m for m in ("sdv", "ctgan") if importlib.util.find_spec(m) is None]
    if not absent:
        return ""
    return (
        f"{' and '.join(absent)} not installed: the SDV baselines (CTGAN, TVAE, Gaussian "
        "copula) are skipped; install them with `pip install -e .[benchmark]`"
    )


def independent_marginals(
    train: pd.DataFrame, schema: Schema, n: int, seed: int
) -> pd.DataFrame:
    """Each column resampled on its own (with replacement) from its real-train values."""
    rng = np.random.default_rng(seed)
    out = {}
    for column in schema.columns:
        values = train[column.name].to_numpy(dtype=object)
        out[column.name] = values[rng.integers(0, len(values), size=n)]
    frame = pd.DataFrame(out)
    for column in schema.columns:  # keep the typed frame's dtypes (Int64, float, object)
        frame[column.name] = frame[column.name].astype(train[column.name].dtype)
    return frame


def to_plain(frame: pd.DataFrame, schema: Schema) -> tuple[pd.DataFrame, list[str]]:
    """The typed frame as numbers and strings an external package can fit."""
    out: dict[str, pd.Series] = {}
    discrete: list[str] = []
    for column in schema.columns:
        values = frame[column.name]
        if column.is_numeric:
            num = pd.to_numeric(values, errors="coerce").astype(float)
            if num.isna().any():
                out[column.name + INDICATOR] = num.isna().map({True: "1", False: "0"})
                discrete.append(column.name + INDICATOR)
                fill = float(num.median()) if num.notna().any() else 0.0
                num = num.fillna(fill)
            out[column.name] = num
        else:
            out[column.name] = values.map(lambda v: MISSING if pd.isna(v) else str(v))
            discrete.append(column.name)
    return pd.DataFrame(out), discrete


def from_plain(plain: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Map a sample in the plain layout back to the schema's typed values."""
    out: dict[str, pd.Series] = {}
    for column in schema.columns:
        if column.is_numeric:
            num = pd.to_numeric(plain[column.name], errors="coerce").astype(float)
            if column.min is not None and column.max is not None:
                num = num.clip(column.min, column.max)
            if column.kind in ("integer",):
                num = num.round()
            flag = plain.get(column.name + INDICATOR)
            if flag is not None:
                num = num.mask(flag.astype(str) == "1")
            out[column.name] = num
        else:
            lookup = {str(c): c for c in column.categories}
            # object dtype, as read_table types categories: 0 stays 0, not 0.0
            out[column.name] = pd.Series(
                [lookup.get(str(v), np.nan) for v in plain[column.name]],
                index=plain.index, dtype=object,
            )
    return pd.DataFrame(out)


#: The ctgan package's CTGAN defaults: batch size and "pac" (rows packed per
#: discriminator input; the batch must be a multiple of it).
CTGAN_BATCH, CTGAN_PAC = 500, 10


def quick_batch(rows: int) -> int:
    """CTGAN's batch for ``--quick``: the training rows rounded down to a multiple of
    its pac, between one pac and the package's 500."""
    return max(CTGAN_PAC, min(CTGAN_BATCH, rows // CTGAN_PAC * CTGAN_PAC))


def _fit_ctgan_package(
    kind: str, train: pd.DataFrame, schema: Schema, n: int, seed: int, epochs: int | None,
    batch_rows: bool = False,
) -> BaselineRun:
    import torch
    from ctgan import CTGAN, TVAE

    plain, discrete = to_plain(train, schema)
    cls = CTGAN if kind == "sdv_ctgan" else TVAE
    kwargs: dict[str, int] = {} if epochs is None else {"epochs": epochs}
    if batch_rows and cls is CTGAN:
        kwargs["batch_size"] = quick_batch(len(plain))
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    model = cls(**kwargs)
    if hasattr(model, "set_random_state"):
        model.set_random_state(seed)
    start = time.perf_counter()
    model.fit(plain, discrete_columns=discrete)
    seconds = time.perf_counter() - start
    sample = model.sample(n)
    used = getattr(model, "epochs", getattr(model, "_epochs", None))
    return BaselineRun(from_plain(sample, schema), seconds, used)


def _fit_gaussian_copula(
    train: pd.DataFrame, schema: Schema, n: int, seed: int, epochs: int | None
) -> BaselineRun:
    from sdv.metadata import Metadata
    from sdv.single_table import GaussianCopulaSynthesizer

    plain, discrete = to_plain(train, schema)
    columns = {
        name: {"sdtype": "categorical" if name in discrete else "numerical"}
        for name in plain.columns
    }
    metadata = Metadata.load_from_dict({"tables": {"train": {"columns": columns}}})
    model = GaussianCopulaSynthesizer(metadata, enforce_min_max_values=True)
    np.random.seed(seed % 2**32)
    start = time.perf_counter()
    model.fit({"train": plain})
    seconds = time.perf_counter() - start
    sample = model.sample(n)
    if isinstance(sample, dict):  # SDV 2 returns {table name: frame}
        sample = sample["train"]
    return BaselineRun(from_plain(sample, schema), seconds, None)


def run_baseline(
    name: str,
    train: pd.DataFrame,
    schema: Schema,
    n: int,
    seed: int,
    epochs: int | None = None,
    *,
    batch_rows: bool = False,
) -> BaselineRun:
    """Fit baseline ``name`` on the pooled training rows and draw ``n`` rows
    (``batch_rows``: CTGAN's batch at most the rows, see ``quick_batch``)."""
    if name == "independent":
        start = time.perf_counter()
        frame = independent_marginals(train, schema, n, seed)
        return BaselineRun(frame, time.perf_counter() - start, None)
    if name not in SDV_BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    why = sdv_missing()
    if why:
        raise RuntimeError(why)
    runners: dict[str, Callable[[], BaselineRun]] = {
        "sdv_ctgan": lambda: _fit_ctgan_package(name, train, schema, n, seed, epochs,
                                                batch_rows),
        "sdv_tvae": lambda: _fit_ctgan_package(name, train, schema, n, seed, epochs),
        "sdv_gaussian_copula": lambda: _fit_gaussian_copula(train, schema, n, seed, epochs),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the packages' FutureWarnings and fit notices
        return runners[name]()
