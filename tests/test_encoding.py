"""Schema-driven encoding: no statistics of the rows, exact round trip, missing modelled."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedsynth.common.encoding import TabularEncoder
from fedsynth.common.schema import Schema
from fedsynth.common.table import read_table


@pytest.fixture(scope="module")
def heart(heart_schema: Schema, heart_files) -> pd.DataFrame:
    return pd.concat([read_table(p, heart_schema) for p in heart_files.values()],
                     ignore_index=True)


def test_round_trip_is_exact(heart_schema: Schema, heart: pd.DataFrame) -> None:
    enc = TabularEncoder(heart_schema)
    back = enc.decode(enc.encode(heart))
    for col in heart_schema.columns:
        a, b = heart[col.name], back[col.name]
        assert (a.isna().to_numpy() == b.isna().to_numpy()).all(), col.name
        present = ~a.isna().to_numpy()
        if col.is_numeric:
            np.testing.assert_allclose(
                a[present].astype(float).to_numpy(), b[present].astype(float).to_numpy(),
                atol=1e-4 * (col.max - col.min), err_msg=col.name,
            )
        else:
            assert list(a[present]) == list(b[present]), col.name
    assert str(back["age"].dtype) == "Int64" and str(back["chol"].dtype) == "Int64"


def test_missing_values_are_modelled(heart_schema: Schema, heart: pd.DataFrame) -> None:
    enc = TabularEncoder(heart_schema)
    x = enc.encode(heart)
    chol = enc.block("chol", "missing")
    assert x[:, chol.start + 1].sum() == heart["chol"].isna().sum() > 150
    ca = enc.block("ca", "onehot")
    assert x[:, ca.stop - 1].sum() == heart["ca"].isna().sum()
    with pytest.raises(KeyError):
        enc.block("age", "missing")  # never missing under the schema: no indicator


def test_encoding_uses_only_the_schema(heart_schema: Schema, heart: pd.DataFrame) -> None:
    """The same row encodes the same way whatever else is in the table."""
    enc = TabularEncoder(heart_schema)
    alone = enc.encode(heart.iloc[[10]])
    among = enc.encode(heart)[10:11]
    np.testing.assert_array_equal(alone, among)
    assert alone.min() >= -1 and alone.max() <= 1


def test_decode_clips_and_rounds(heart_schema: Schema) -> None:
    enc = TabularEncoder(heart_schema)
    raw = np.zeros((1, enc.dim))
    raw[0, enc.block("age", "numeric").start] = 5.0  # beyond the bound
    raw[0, enc.block("oldpeak", "numeric").start] = 0.123456
    out = enc.decode(raw)
    assert out["age"].iloc[0] == 100
    assert out["oldpeak"].iloc[0] == round(out["oldpeak"].iloc[0], 1)
