"""alpipe.records: the object-storage layout, read and written through one module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alpipe import keys, records
from alpipe.errors import NotFound, UserError
from alpipe.records import ModelPointer
from alpipe.schemas import CurvePointOut, LabelRecord, Project, SampleRecord
from alpipe.storage import LocalStore


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def point(version: int, n_labeled: int = 20) -> CurvePointOut:
    return CurvePointOut(model_version=version, n_labeled=n_labeled, test_accuracy=0.5 + version / 100)


def publish(store: LocalStore, *, first: int, n_labeled: int = 20) -> int:
    return records.publish_model(store, "p", first_version=first, checkpoint=lambda v: f"weights v{v}".encode(),
                                 point=lambda v: point(v, n_labeled), n_labeled=n_labeled)


def test_publishing_takes_the_next_free_version_and_moves_the_pointer_forward_only(store):
    assert records.read_pointer(store, "p") is None
    assert publish(store, first=1) == 1
    # Another trainer took v2 (its checkpoint is there, its pointer never moved): v2 is skipped, not overwritten.
    store.put_if_absent(keys.checkpoint_key("p", 2), b"the other trainer's v2")
    assert publish(store, first=2, n_labeled=30) == 3
    assert store.get_bytes(keys.checkpoint_key("p", 2)) == b"the other trainer's v2"
    assert records.read_pointer(store, "p") == ModelPointer(version=3, n_labeled=30, key=keys.checkpoint_key("p", 3))
    # A faster trainer published v5; a slow one finishing v4 afterwards does not move the pointer back.
    assert publish(store, first=5, n_labeled=40) == 5
    assert publish(store, first=4, n_labeled=35) == 4
    assert records.read_pointer(store, "p").version == 5
    assert records.stored_versions(store, "p") == [1, 2, 3, 4, 5]


def test_the_pointer_object_keeps_its_documented_shape(store):
    publish(store, first=1)
    assert json.loads(store.get_bytes(keys.current_model_key("p"))) == {
        "version": 1, "n_labeled": 20, "key": "projects/p/models/v000001.pt"}


def test_the_curve_stops_at_the_pointer_and_is_ordered_by_version(store):
    for first in (1, 2, 3):
        publish(store, first=first)
    store.put_json(keys.model_metrics_key("p", 9), point(9).model_dump())  # a training that never finished
    assert [p.model_version for p in records.model_curve(store, "p", up_to=3)] == [1, 2, 3]
    assert records.model_curve(store, "p", up_to=0) == []


def test_a_malformed_metrics_object_fails_loudly(store):
    store.put_json(keys.model_metrics_key("p", 1), {"model_version": 1})
    with pytest.raises(ValueError):
        records.model_curve(store, "p", up_to=1)


def test_checkpoint_chunks_stream_the_wanted_version(store):
    publish(store, first=1)
    publish(store, first=2)
    pointer = records.read_pointer(store, "p")
    assert b"".join(records.checkpoint_chunks(store, "p", 1, pointer)) == b"weights v1"
    assert b"".join(records.checkpoint_chunks(store, "p", 2, pointer)) == b"weights v2"


def test_batches_read_back_in_write_order_and_count_as_durable(store):
    samples = [SampleRecord(id=f"s{i}", name=f"{i}.png") for i in range(3)]
    records.write_sample_batch(store, "p", samples[:2])
    records.write_sample_batch(store, "p", samples[2:])
    first = records.write_label_batch(store, "p", [LabelRecord(sample_id="s0", label="a", labeler="x", at=1.0,
                                                               batch="b1")], batch_id="b1")
    records.write_label_batch(store, "p", [LabelRecord(sample_id="s0", label="b", labeler="x", at=2.0, batch="b2")])
    store.put_bytes(keys.label_log_prefix("p") + "notes.txt", b"not a batch")
    assert first.endswith("-b1.jsonl")
    assert [[s.id for s in batch] for _, batch in records.read_sample_batches(store, "p")] == [["s0", "s1"], ["s2"]]
    assert [[r.label for r in batch] for _, batch in records.read_label_log(store, "p")] == [["a"], ["b"]]
    assert records.label_log_keys(store, "p")[0] == first
    assert records.durable_batch_count(store, "p") == 4


def test_project_definitions(store):
    project = Project(name="p", classes=["a", "b"], created_at=1.0)
    assert records.create_project(store, project)
    assert not records.create_project(store, project)  # the name is taken: a racing create loses
    assert records.read_project(store, "p") == project
    assert records.project_stored(store, "p") and records.stored_project_names(store) == ["p"]
    with pytest.raises(NotFound, match="project 'q' not found"):
        records.read_project(store, "q")
    store.put_bytes(keys.project_key("q"), b"{}")
    with pytest.raises(UserError, match="not a valid project definition"):
        records.read_project(store, "q")
