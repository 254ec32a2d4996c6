"""The local store's journal: a journaled object is durable, listed and read at once, made a file later,
and a dead writer's segment is made into files and deleted by the next reader."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from alpipe.journal import SEGMENT_SUFFIX, Journal, encode_entry
from alpipe.storage import JOURNAL_DIR, LocalStore
from tests.helpers import wait_until


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def journal_of(store: LocalStore, *, segment_bytes: int = 4 << 20) -> Journal:
    """A journal without its background thread: only readers make files of what it holds."""
    return Journal(store.root / JOURNAL_DIR, store._put_many_if_absent, segment_bytes=segment_bytes,
                   background=False)


def segments(store: LocalStore) -> list[Path]:
    folder = store.root / JOURNAL_DIR
    return sorted(p for p in folder.glob(f"*{SEGMENT_SUFFIX}") if not p.name.startswith(".tmp-")) \
        if folder.is_dir() else []


def label_key(n: int) -> str:
    return f"projects/p/labels/{n:020d}-b{n}.jsonl"


def test_a_journaled_object_is_listed_and_read_by_another_reader_before_it_is_a_file(store):
    journal = journal_of(store)
    journal.append(label_key(1), b'{"label": "cat"}\n')
    journal.append(label_key(2), b'{"label": "dog"}\n')
    assert not (store.root / label_key(1)).exists()  # only in the journal so far

    reader = LocalStore(store.root)
    assert list(reader.list("projects/p/labels/")) == [label_key(1), label_key(2)]
    assert reader.get_bytes(label_key(2)) == b'{"label": "dog"}\n'
    assert (store.root / label_key(1)).read_bytes() == b'{"label": "cat"}\n'  # the reader made the files
    # The writer is alive (it holds its segment's lock): the reader leaves the segment to it.
    assert len(segments(store)) == 1
    journal.close()
    assert segments(store) == []
    assert list(LocalStore(store.root).list("")) == [label_key(1), label_key(2)]  # the journal is not a key


def test_get_bytes_of_an_object_only_in_the_journal_finds_it(store):
    journal = journal_of(store)
    journal.append(label_key(7), b"seven")
    assert LocalStore(store.root).get_bytes(label_key(7)) == b"seven"


def kill_a_writer_after_three_appends(store: LocalStore) -> None:
    """Three objects acknowledged (their O_DSYNC writes returned), then SIGKILL before any file was made."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from alpipe.journal import Journal
        from alpipe.storage import JOURNAL_DIR, LocalStore
        store = LocalStore({str(store.root)!r})
        journal = Journal(store.root / JOURNAL_DIR, store._put_many_if_absent, background=False)
        for n in range(3):
            journal.append(f"projects/p/labels/{{n:020d}}-b{{n}}.jsonl", f"label {{n}}".encode())
        print("acknowledged", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == -signal.SIGKILL and "acknowledged" in run.stdout, run.stderr
    assert len(segments(store)) == 1 and not (store.root / "projects").exists()


def test_a_dead_writers_segment_is_made_into_files_and_deleted_by_the_next_reader(store):
    kill_a_writer_after_three_appends(store)
    assert list(store.list("projects/")) == [label_key(n) for n in range(3)]
    assert [store.get_bytes(label_key(n)) for n in range(3)] == [b"label 0", b"label 1", b"label 2"]
    assert segments(store) == []  # the orphan is gone once its objects are files


def test_a_restarted_writer_takes_over_what_its_predecessor_left(store):
    kill_a_writer_after_three_appends(store)
    [orphan] = segments(store)
    store.put_new(label_key(9), b"after the restart")  # the first write of a new process's journal
    assert [(store.root / label_key(n)).read_bytes() for n in range(3)] == [b"label 0", b"label 1", b"label 2"]
    assert orphan not in segments(store)


def test_a_torn_entry_ends_what_a_reader_takes(store):
    """A write a crash cut short was never acknowledged: the entries before it count, it does not."""
    journal = journal_of(store)
    journal.append(label_key(1), b"whole")
    journal.append(label_key(2), b"cut short")
    [segment] = segments(store)
    torn_at = len(b"ALPJRN01") + len(encode_entry(label_key(1), b"whole")) + len(encode_entry(label_key(2), b"cut"))
    with open(segment, "r+b") as f:  # the last bytes of the second entry never reached the device
        f.seek(torn_at)
        f.write(bytes(len(b" short")))
    assert list(LocalStore(store.root).list("projects/")) == [label_key(1)]


def test_segments_roll_when_full_and_go_once_every_object_in_them_is_a_file(store):
    journal = journal_of(store, segment_bytes=256)
    for n in range(12):
        journal.append(label_key(n), b"x" * 40)
    assert len(segments(store)) >= 4
    assert not journal.fits(label_key(99), b"x" * 256)
    journal.flush()
    assert len(segments(store)) == 1  # the active one
    assert sorted(p.name for p in (store.root / "projects/p/labels").iterdir()) == [
        Path(label_key(n)).name for n in range(12)]
    journal.close()
    assert segments(store) == []


def test_put_new_is_durable_visible_and_becomes_a_file_in_the_background(store):
    store.put_new(label_key(1), b"first")
    assert store.get_bytes(label_key(1)) == b"first"
    wait_until(lambda: (store.root / label_key(1)).is_file(), timeout=10, what="the journal's file")


def test_put_new_of_an_object_bigger_than_a_segment_writes_it_directly(store):
    big = os.urandom((4 << 20) + 1)
    store.put_new(label_key(2), big)
    assert (store.root / label_key(2)).read_bytes() == big


def test_the_journal_folder_is_not_a_key(store):
    with pytest.raises(ValueError, match="invalid object key"):
        store.put_bytes(f"{JOURNAL_DIR}/x", b"v")


def test_a_backlog_longer_than_one_batch_becomes_files(store):
    """An outage or a flat-out import leaves hundreds journaled: they are made files a bounded batch at a time."""
    journal = journal_of(store)
    for n in range(600):
        journal.append(label_key(n), f"label {n}".encode())
    assert list(LocalStore(store.root).list("projects/p/labels/")) == [label_key(n) for n in range(600)]
    assert (store.root / label_key(599)).read_bytes() == b"label 599"


def test_a_journal_folder_removed_under_its_writer_is_made_again_and_nothing_is_lost(store):
    """A write must never be acknowledged into a segment nobody can read any more."""
    journal = journal_of(store)
    journal.append(label_key(1), b"before")
    shutil.rmtree(store.root / JOURNAL_DIR)
    journal.append(label_key(2), b"after")
    assert len(segments(store)) == 1  # a new segment, in the folder made again
    assert list(LocalStore(store.root).list("projects/")) == [label_key(2)]  # the first is only in memory now
    journal.flush()
    assert [(store.root / label_key(n)).read_bytes() for n in (1, 2)] == [b"before", b"after"]


def test_a_store_away_is_logged_once_and_its_journaled_objects_become_files_when_it_is_back(store, caplog):
    caplog.set_level(logging.WARNING, logger="alpipe.journal")
    journal = Journal(store.root / JOURNAL_DIR, store._put_many_if_absent)  # with its background thread
    journal.append(label_key(1), b"before")
    wait_until(lambda: (store.root / label_key(1)).is_file(), timeout=10, what="the first file")
    away = store.root.with_name("store-away")
    store.root.rename(away)
    journal.append(label_key(2), b"while away")  # durable in the segment, which moved with the store
    time.sleep(2.5)  # about three attempts to make its file
    messages = [r.getMessage() for r in caplog.records if r.name == "alpipe.journal"]
    assert sum("cannot make files" in m for m in messages) == 1, messages
    away.rename(store.root)
    wait_until(lambda: (store.root / label_key(2)).is_file(), timeout=10, what="the file once the store is back")
    assert (store.root / label_key(2)).read_bytes() == b"while away"
    wait_until(lambda: any("making files again" in r.getMessage() for r in caplog.records), timeout=5,
               what="the recovery line")
    journal.close()
