"""Every array record crosses the network as one packed array (common/protocol.py).

Flower 1.41 moves each array of a message as objects of their own, one request each at
every hop of a deployment; packing a model's tensors into one array is what makes a
deployed round wait for 6 objects instead of 38 (the drill's TVAE). These tests
check that the packing is exact (same keys, order, shapes, dtypes and bytes, for every
generator's real state), that it changes what Flower sends into few objects, that a
packed record that does not decode is refused (by a site) or dropped and then refused by
the guards (at the coordinator), and that a real study through the real ServerApp and
ClientApp code sends and receives only packed model records whose contents are exactly
the model's arrays.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_object_tree, iterate_object_tree

from fedsynth.common.generators import get_generator
from fedsynth.common.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    PACKED,
    WireFormatError,
    pack_arrays,
    pack_content,
    unpack_arrays,
    unpack_content,
)
from fedsynth.common.schema import Schema
from fedsynth.server.guards import ClearUpdate, RoundContext
from fedsynth.server.packed_grid import unpacked
from tests.flower_support import task_identity

TINY = {"hidden": 16, "latent": 4}


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    with task_identity():  # Flower stamps a new message with its process's run and node
        yield


def _state(name: str, schema: Schema) -> dict[str, np.ndarray]:
    """A generator's real state at its default size (the drill's small TVAE for tvae)."""
    return get_generator(name)(schema, seed=0, **(TINY if name == "tvae" else {})).state_dict()


@pytest.mark.parametrize("generator", ["tvae", "ctgan", "ddpm"])
def test_packing_a_models_state_is_exact(generator: str, heart_schema: Schema) -> None:
    state = _state(generator, heart_schema)
    content = RecordDict({
        ARRAYS: ArrayRecord({k: Array(v) for k, v in state.items()}),
        CONFIG: ConfigRecord({"server-round": 3}),
        METRICS: MetricRecord({"loss": 0.5}),
    })
    wire = pack_content(content)
    assert list(wire[ARRAYS].keys()) == [PACKED]
    assert wire[ARRAYS][PACKED].numpy().dtype == np.uint8
    assert dict(wire[CONFIG]) == {"server-round": 3} and dict(wire[METRICS]) == {"loss": 0.5}
    back = unpack_content(wire)[ARRAYS]
    assert list(back.keys()) == list(state)  # same keys, same order
    for key, value in state.items():
        got = back[key].numpy()
        assert got.dtype == value.dtype and got.shape == value.shape
        assert got.tobytes() == np.ascontiguousarray(value).tobytes()


def test_a_message_becomes_a_few_objects(heart_schema: Schema) -> None:
    """What Flower pushes and pulls one request at a time: the message's object tree."""
    state = _state("tvae", heart_schema)
    content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in state.items()}),
                          CONFIG: ConfigRecord({"server-round": 1})})

    def objects(c: RecordDict) -> int:
        msg = Message(c, dst_node_id=1, message_type="train")
        return sum(1 for _ in iterate_object_tree(get_object_tree(msg)))

    before, after = objects(content), objects(pack_content(content))
    assert before >= 2 * len(state)  # an array and its chunk per tensor
    assert after <= 6, after  # message, record dict, two records, one array, its chunk


def test_records_of_one_array_and_other_records_are_left_alone() -> None:
    values = ArrayRecord({"values": Array(np.arange(5.0))})
    content = RecordDict({"counts": values, "site": ConfigRecord({"name": "a"})})
    wire = pack_content(content)
    assert list(wire["counts"].keys()) == ["values"]
    # packing twice changes nothing; the envelope's name is no array's
    model = RecordDict({ARRAYS: ArrayRecord({"a": Array(np.ones(2)), "b": Array(np.ones(1))})})
    once = pack_content(model)
    assert pack_content(once)[ARRAYS][PACKED].numpy().tobytes() == \
        once[ARRAYS][PACKED].numpy().tobytes()
    clash = RecordDict({ARRAYS: ArrayRecord({PACKED: Array(np.ones(2)), "b": Array(np.ones(1))})})
    with pytest.raises(WireFormatError, match="may not be named"):
        pack_content(clash)


def _tampered(blob: np.ndarray, header: list | None = None, tail: bytes = b"",
              cut: int = 0) -> np.ndarray:
    raw = blob.tobytes()
    size = int.from_bytes(raw[:4], "little")
    head = json.dumps(header).encode() if header is not None else raw[4 : 4 + size]
    body = raw[4 + size :]
    body = body[: len(body) - cut] + tail
    return np.frombuffer(len(head).to_bytes(4, "little") + head + body, np.uint8)


def test_a_packed_record_that_does_not_decode_is_refused() -> None:
    arrays = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    blob = pack_arrays(arrays)
    assert unpack_arrays(blob).keys() == arrays.keys()
    bad = {
        "bytes missing": _tampered(blob, cut=4),
        "bytes left over": _tampered(blob, tail=b"\x00" * 4),
        "an object dtype": _tampered(blob, [["w", "|O", [2, 3]], ["b", "<f4", [3]]]),
        "a repeated key": _tampered(blob, [["w", "<f4", [3]], ["w", "<f4", [2, 3]]]),
        "no header": np.frombuffer(b"\xff\xff\xff\x7f{", np.uint8),
    }
    for what, value in bad.items():
        with pytest.raises(WireFormatError):
            unpack_arrays(value)
        content = RecordDict({ARRAYS: ArrayRecord({PACKED: Array(value)})})
        with pytest.raises(WireFormatError):  # a site refuses the request
            unpack_content(content)
        # the coordinator drops the record, and its guard refuses the reply
        assert ARRAYS not in unpack_content(content, drop_bad=True), what


def test_the_coordinator_refuses_a_reply_whose_weights_do_not_decode() -> None:
    blob = _tampered(pack_arrays({"w": np.ones(4, np.float32), "b": np.ones(1)}), cut=2)
    reply = Message(RecordDict({ARRAYS: ArrayRecord({PACKED: Array(blob)}),
                                METRICS: MetricRecord({"num-examples": 10.0})}),
                    dst_node_id=1, message_type="train")
    content = unpacked(reply).content
    ctx = RoundContext(sent={}, reference={"w": ((4,), "float32"), "b": ((1,), "float64")},
                       history=[])
    assert "no model arrays" in ClearUpdate().check(content, "site-a", ctx)


def test_a_real_study_sends_only_packed_model_records(
    tmp_path: Path, heart_files: dict[str, Path], heart_schema_path: Path
) -> None:
    """Two rounds of three hospitals through the real coordinator and ClientApp code,
    the message log taken as the messages cross the network."""
    from fedsynth.common.study import SiteConfig, StudyConfig
    from fedsynth.simulations.benchmark_inprocess import run_inprocess

    log = tmp_path / "messages.jsonl"
    sites = [SiteConfig(n, str(heart_files[n]), str(heart_schema_path),
                        state_dir=str(tmp_path / n)) for n in ("cleveland", "hungarian", "va")]
    study = StudyConfig(num_server_rounds=2, local_epochs=1, generator_params=TINY,
                        min_sites=3, output_dir=str(tmp_path / "out"),
                        record_messages=str(log), study_id="wire")
    result = run_inprocess(study, sites)
    assert len(result.outcome.history) == 2
    statuses = [(s.site, s.status, s.reason) for r in result.outcome.history for s in r.sites]
    assert all(s[1] == "trained" for s in statuses), statuses
    model = _state("tvae", Schema.load(heart_schema_path))
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    train = [m for m in entries if m["message_type"] == "train"]
    assert len(train) == 12  # 3 sites x 2 rounds, sent and received
    for m in train:
        record = m["records"][ARRAYS]
        assert record["decodes"] and record["packed_bytes"] > 0
        # exactly the model's arrays: its keys, shapes, float32, nothing more
        assert {k: tuple(e["shape"]) for k, e in record["entries"].items()} == {
            k: tuple(v.shape) for k, v in model.items()}
        assert all(e["dtype"] == "float32" for e in record["entries"].values())
