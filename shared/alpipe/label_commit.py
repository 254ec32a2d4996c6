"""Group commit of labels: concurrent label posts of one process share one label-log object.

A label is acknowledged only once it is durable in the label log (one object per write, fsynced on
the local store, a PUT on S3), then applied to Redis. Written one request at a time, that write is
the cost of a label. Here the first request of a project to arrive writes (it leads); requests that
arrive while its write is in flight wait and go together in the next write, led by the first of
them. Nothing waits on a timer: a lone labeler writes at once, and under load a write carries
everything that queued behind the one before. The promise is unchanged: every request is answered
after the object holding its labels is durable and applied, in the order the object lists them.

Recovery, export and the Redis-restart check read a grouped object like any other label-log object.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from .schemas import LabelRecord


@dataclass
class _Waiter:
    records: list[LabelRecord]
    wake: threading.Event = field(default_factory=threading.Event)
    leads: bool = False
    labeled: int = 0
    error: BaseException | None = None

    def outcome(self) -> int:
        if self.error is not None:
            raise self.error
        return self.labeled


# write(records) makes the records durable and applies them, in order, and returns the labeled count.
Writer = Callable[[list[LabelRecord]], int]


class GroupCommit:
    """One per process; keyed by project (any hashable key naming one), so projects never wait on each other."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: dict[Hashable, list[_Waiter]] = {}
        self._writing: set[Hashable] = set()

    def commit(self, project: Hashable, records: list[LabelRecord], write: Writer) -> int:
        """Make records durable and applied together with whatever else is queued for the project;
        returns the labeled count after the write that carried them. Raises that write's error."""
        me = _Waiter(records)
        with self._lock:
            self._queued.setdefault(project, []).append(me)
            if project not in self._writing:
                self._writing.add(project)
                me.leads = True
        if not me.leads:
            me.wake.wait()
            if not me.leads:  # another request's write carried these records
                return me.outcome()
        with self._lock:
            group = self._queued.pop(project)
        try:
            labeled = write([rec for waiter in group for rec in waiter.records])
            for waiter in group:
                waiter.labeled = labeled
        except BaseException as e:  # every request of the group gets the error: none of them is acknowledged
            for waiter in group:
                waiter.error = e
        with self._lock:
            following = self._queued.get(project)
            if following:
                following[0].leads = True
                following[0].wake.set()
            else:
                self._writing.discard(project)
        for waiter in group:
            if waiter is not me:
                waiter.wake.set()
        return me.outcome()

