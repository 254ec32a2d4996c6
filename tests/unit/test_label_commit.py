"""Group commit (alpipe.label_commit): requests that arrive while a write is in flight share the next one."""

from __future__ import annotations

import threading
import time

import pytest

from alpipe.label_commit import GroupCommit
from alpipe.schemas import LabelRecord


def record(i: int) -> LabelRecord:
    return LabelRecord(sample_id=f"s{i}", label="cat", labeler=f"l{i}", at=float(i), batch=f"b{i}")


def test_requests_queued_behind_a_write_share_the_next_one() -> None:
    commit = GroupCommit()
    writes: list[list[str]] = []
    first_write_started = threading.Event()
    release_first = threading.Event()

    def write(group: list[LabelRecord]) -> int:
        writes.append([rec.sample_id for rec in group])
        if len(writes) == 1:
            first_write_started.set()
            assert release_first.wait(10)
        return sum(len(w) for w in writes)

    answers: dict[int, int] = {}
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, commit.commit("p", [record(i)], write)))
               for i in range(6)]
    threads[0].start()
    assert first_write_started.wait(10)
    for t in threads[1:]:
        t.start()
    time.sleep(0.3)  # all five queue behind the first write
    assert len(writes) == 1
    release_first.set()
    for t in threads:
        t.join(10)
    assert writes[0] == ["s0"]
    assert sorted(writes[1]) == ["s1", "s2", "s3", "s4", "s5"] and len(writes) == 2
    # Each request is answered with the count after the write that carried its labels.
    assert answers == {0: 1, 1: 6, 2: 6, 3: 6, 4: 6, 5: 6}


def test_a_lone_request_writes_at_once_and_projects_do_not_wait_on_each_other() -> None:
    commit = GroupCommit()
    in_p = threading.Event()
    release = threading.Event()

    def slow_write(group: list[LabelRecord]) -> int:
        in_p.set()
        assert release.wait(10)
        return 1

    t = threading.Thread(target=commit.commit, args=("p", [record(0)], slow_write))
    t.start()
    assert in_p.wait(10)
    # Project q's write goes ahead while p's is still in flight.
    assert commit.commit("q", [record(1)], lambda group: 7) == 7
    release.set()
    t.join(10)


def test_a_failed_write_fails_every_request_of_its_group_and_the_next_group_still_writes() -> None:
    commit = GroupCommit()
    started = threading.Event()
    release = threading.Event()
    calls: list[int] = []

    def write(group: list[LabelRecord]) -> int:
        calls.append(len(group))
        if len(calls) == 1:
            started.set()
            assert release.wait(10)
            return 1
        if len(calls) == 2:
            raise OSError("disk full")
        return 99

    outcomes: dict[int, object] = {}

    def post(i: int) -> None:
        try:
            outcomes[i] = commit.commit("p", [record(i)], write)
        except OSError as e:
            outcomes[i] = e

    first = threading.Thread(target=post, args=(0,))
    first.start()
    assert started.wait(10)
    queued = [threading.Thread(target=post, args=(i,)) for i in (1, 2, 3)]
    for t in queued:
        t.start()
    time.sleep(0.3)
    release.set()
    for t in [first, *queued]:
        t.join(10)
    assert outcomes[0] == 1
    assert all(isinstance(outcomes[i], OSError) for i in (1, 2, 3))
    assert calls == [1, 3]
    assert commit.commit("p", [record(9)], write) == 99  # the project is not left stuck


@pytest.mark.parametrize("threads", [16])
def test_many_concurrent_requests_each_get_their_own_labels_written_once(threads: int) -> None:
    commit = GroupCommit()
    written: list[str] = []
    lock = threading.Lock()

    def write(group: list[LabelRecord]) -> int:
        time.sleep(0.005)  # a write takes time: requests pile up behind it
        with lock:
            written.extend(rec.sample_id for rec in group)
            return len(written)

    workers = [threading.Thread(target=lambda i=i: [commit.commit("p", [record(i * 100 + k)], write)
                                                    for k in range(20)]) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30)
    assert sorted(written) == sorted(f"s{i * 100 + k}" for i in range(threads) for k in range(20))
