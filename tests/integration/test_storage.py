"""One behaviour suite for every ObjectStore backend: LocalStore and S3Store on a real moto server."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from alpipe.errors import NotFound
from alpipe.storage import JOURNAL_DIR, LocalStore, ObjectStore, S3Store


def test_put_get_round_trip(store: ObjectStore) -> None:
    data = bytes(range(256)) * 4
    store.put_bytes("blobs/one.bin", data)
    assert store.get_bytes("blobs/one.bin") == data


def test_empty_object_round_trip(store: ObjectStore) -> None:
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""
    assert store.exists("empty")


def test_get_missing_raises_not_found(store: ObjectStore) -> None:
    with pytest.raises(NotFound):
        store.get_bytes("nope/missing.bin")


def test_get_json_missing_raises_not_found(store: ObjectStore) -> None:
    with pytest.raises(NotFound):
        store.get_json("nope.json")


def test_exists(store: ObjectStore) -> None:
    assert not store.exists("x/y.txt")
    store.put_bytes("x/y.txt", b"hi")
    assert store.exists("x/y.txt")
    assert not store.exists("x/y")  # a prefix of a key is not a key
    assert not store.exists("x/y.txt.bak")


def test_list_sorted_under_prefix_only(store: ObjectStore) -> None:
    keys = ["a/b/c", "a/1", "a/b/a", "ab", "b/x", "a/z", "top"]
    for key in keys:
        store.put_bytes(key, key.encode())
    assert list(store.list()) == sorted(keys)
    assert list(store.list("a/")) == ["a/1", "a/b/a", "a/b/c", "a/z"]
    assert list(store.list("a/b/")) == ["a/b/a", "a/b/c"]
    assert list(store.list("a")) == ["a/1", "a/b/a", "a/b/c", "a/z", "ab"]
    assert list(store.list("zzz/")) == []


def test_list_empty_store(store: ObjectStore) -> None:
    assert list(store.list()) == []


def test_delete(store: ObjectStore) -> None:
    store.put_bytes("d/k", b"1")
    store.put_bytes("d/keep", b"2")
    store.delete("d/k")
    assert not store.exists("d/k")
    with pytest.raises(NotFound):
        store.get_bytes("d/k")
    assert list(store.list("d/")) == ["d/keep"]


def test_delete_missing_is_fine(store: ObjectStore) -> None:
    store.delete("never/was/here")
    store.put_bytes("k", b"1")
    store.delete("k")
    store.delete("k")


def test_json_round_trip(store: ObjectStore) -> None:
    value = {"b": [1, 2.5, None, True], "a": {"nested": "ü"}, "n": 0}
    store.put_json("meta/v1.json", value)
    assert store.get_json("meta/v1.json") == value


def test_overwrite_replaces(store: ObjectStore) -> None:
    store.put_bytes("k", b"first, longer content")
    store.put_bytes("k", b"second")
    assert store.get_bytes("k") == b"second"
    assert list(store.list()) == ["k"]


def test_put_file(store: ObjectStore, tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"file contents")
    store.put_file("files/f.bin", path)
    assert store.get_bytes("files/f.bin") == b"file contents"


def test_put_if_absent_writes_once(store: ObjectStore) -> None:
    assert store.put_if_absent("ckpt/1.pt", b"original") is True
    assert store.get_bytes("ckpt/1.pt") == b"original"
    assert store.put_if_absent("ckpt/1.pt", b"other") is False
    assert store.get_bytes("ckpt/1.pt") == b"original"
    assert list(store.list("ckpt/")) == ["ckpt/1.pt"]


def test_put_if_absent_after_plain_put(store: ObjectStore) -> None:
    store.put_bytes("k", b"v1")
    assert store.put_if_absent("k", b"v2") is False
    assert store.get_bytes("k") == b"v1"


def test_put_if_absent_concurrent_single_winner(store: ObjectStore) -> None:
    n = 8
    barrier = threading.Barrier(n)
    results: list[bool] = []
    lock = threading.Lock()

    def attempt(i: int) -> None:
        barrier.wait()
        wrote = store.put_if_absent("race/key", f"writer-{i}".encode())
        with lock:
            results.append(wrote)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == n
    assert results.count(True) == 1
    assert store.get_bytes("race/key").startswith(b"writer-")


def test_put_new_is_read_and_listed_at_once(store: ObjectStore) -> None:
    """The label log's write: durable on return and visible to every reader (journaled on the local store)."""
    for n in range(3):
        store.put_new(f"projects/p/labels/{n:020d}-b.jsonl", f"batch {n}".encode())
    assert list(store.list("projects/p/labels/")) == [f"projects/p/labels/{n:020d}-b.jsonl" for n in range(3)]
    assert store.get_bytes("projects/p/labels/00000000000000000001-b.jsonl") == b"batch 1"


# --------------------------------------------------------------------------- LocalStore only


_JOURNAL_WRITER = """
import sys
from alpipe.storage import LocalStore
store = LocalStore(sys.argv[1])
for n in range(int(sys.argv[3])):
    key = f"projects/p/labels/{n:06d}-{sys.argv[2]}.jsonl"
    store.put_new(key, f"{sys.argv[2]} {n}".encode())
    print(key, flush=True)  # acknowledged: durable from here on
"""


def test_local_journal_two_writer_processes_and_a_reader_listing_meanwhile(local_store: LocalStore) -> None:
    """Every write a process acknowledged is listed and read by another process, while the writers run and
    after they exit; a writer that exits leaves no journal segment behind."""
    writers = [subprocess.Popen([sys.executable, "-c", _JOURNAL_WRITER, str(local_store.root), name, "300"],
                                stdout=subprocess.PIPE, text=True) for name in ("a", "b")]
    seen_while_running = set()
    while any(w.poll() is None for w in writers):
        seen_while_running.update(local_store.list("projects/p/labels/"))
    acknowledged = {line.strip() for w in writers for line in w.stdout}
    assert [w.returncode for w in writers] == [0, 0]
    assert len(acknowledged) == 600 and seen_while_running <= acknowledged
    assert set(local_store.list("projects/p/labels/")) == acknowledged
    assert local_store.get_bytes("projects/p/labels/000299-b.jsonl") == b"b 299"
    assert not list((local_store.root / JOURNAL_DIR).glob("*.seg"))


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "a/..", "/abs/key", "/", ""])
def test_local_rejects_bad_keys(local_store: LocalStore, key: str) -> None:
    with pytest.raises(ValueError):
        local_store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        local_store.get_bytes(key)
    with pytest.raises(ValueError):
        local_store.exists(key)
    with pytest.raises(ValueError):
        local_store.delete(key)
    with pytest.raises(ValueError):
        local_store.put_if_absent(key, b"x")
    assert not (local_store.root.parent / "escape").exists()


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


class _Crash(Exception):
    pass


def test_local_crash_mid_write_leaves_no_partial_object(local_store: LocalStore,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    local_store.put_bytes("obj", b"old")

    def crash(*_args, **_kwargs):
        raise _Crash("power cut")

    monkeypatch.setattr(os, "fsync", crash)  # data partly written, never renamed into place
    with pytest.raises(_Crash):
        local_store.put_bytes("obj", b"new content")
    with pytest.raises(_Crash):
        local_store.put_bytes("fresh/obj", b"new content")
    with pytest.raises(_Crash):
        local_store.put_if_absent("fresh/once", b"new content")
    monkeypatch.undo()

    assert local_store.get_bytes("obj") == b"old"
    assert not local_store.exists("fresh/obj")
    assert not local_store.exists("fresh/once")
    assert _tmp_files(local_store.root) == []
    assert list(local_store.list()) == ["obj"]


def test_local_crash_before_rename_keeps_old_content(local_store: LocalStore,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    local_store.put_bytes("obj", b"old")

    def crash(*_args, **_kwargs):
        raise _Crash("killed before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(_Crash):
        local_store.put_bytes("obj", b"new")
    monkeypatch.undo()
    assert local_store.get_bytes("obj") == b"old"
    assert _tmp_files(local_store.root) == []


def test_local_list_ignores_leftover_temp_files(local_store: LocalStore) -> None:
    # What a hard kill (no cleanup runs) leaves behind: a temp file next to the objects.
    local_store.put_bytes("dir/real", b"1")
    (local_store.root / "dir" / ".tmp-abc123").write_bytes(b"partial")
    (local_store.root / ".tmp-top").write_bytes(b"partial")
    assert list(local_store.list()) == ["dir/real"]
    assert list(local_store.list("dir/")) == ["dir/real"]
    assert local_store.put_if_absent("dir/other", b"2") is True
    assert sorted(p.name for p in _tmp_files(local_store.root)) == [".tmp-abc123", ".tmp-top"]


def test_local_objects_are_plain_files(local_store: LocalStore) -> None:
    local_store.put_bytes("a/b/c", b"payload")
    assert (local_store.root / "a" / "b" / "c").read_bytes() == b"payload"


def test_put_if_absent_empty_object(store: ObjectStore) -> None:
    assert store.put_if_absent("empty-once", b"") is True
    assert store.put_if_absent("empty-once", b"x") is False
    assert store.get_bytes("empty-once") == b""


# --------------------------------------------------------------------------- S3Store only


def test_s3_missing_key_semantics(s3_store: S3Store) -> None:
    assert not s3_store.exists("missing")
    with pytest.raises(NotFound):
        s3_store.get_bytes("missing")
    s3_store.delete("missing")
    assert list(s3_store.list()) == []


def test_s3_open_existing_bucket_and_concurrent_create(s3_server, s3_store: S3Store) -> None:
    s3_store.put_bytes("k", b"v")
    bucket = f"{s3_store.bucket}-shared"
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_store() -> None:
        barrier.wait()
        try:
            S3Store(endpoint=s3_server.endpoint, access_key=s3_server.access_key,
                    secret_key=s3_server.secret_key, bucket=bucket, region=s3_server.region)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    again = S3Store(endpoint=s3_server.endpoint, access_key=s3_server.access_key,
                    secret_key=s3_server.secret_key, bucket=s3_store.bucket, region=s3_server.region)
    assert again.get_bytes("k") == b"v"
    s3_store.client.remove_bucket(bucket)
