"""Work in flight: heartbeat keys and locks in Redis, and the rq job states the reconcilers read.

Shared by the trainer and scorer orchestration (alpipe.pipeline) and the embedding pass
(alpipe.embed_pass). Imported by the API, so nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.utils import utcparse

from .config import Settings
from .redis_lua import bound, delete_if_equal

log = logging.getLogger(__name__)

RESULT_TTL_S = 3600
FAILURE_TTL_S = 7 * 24 * 3600

# A job in these states will run without help; "started" is judged by heartbeats instead.
_WAITING = {JobStatus.QUEUED.value, JobStatus.SCHEDULED.value, JobStatus.DEFERRED.value,
            JobStatus.CREATED.value}


def worker_identity(job_id: str | None = None) -> str:
    """host:pid[:job] — the value of heartbeat keys, so an operator can tell who holds one."""
    base = f"{socket.gethostname()}:{os.getpid()}"
    return f"{base}:{job_id}" if job_id else base


# --- heartbeats and locks ---------------------------------------------------------------------------

# Keeps our key alive; an exclusive key held by someone else is left alone (returns 0).
_REFRESH_LUA = """
local ttl = tonumber(ARGV[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ttl) end
if ARGV[3] == '1' then
  if redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl, 'NX') then return 1 end
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
return 1
"""


class Heartbeat:
    """A Redis key with a TTL, kept alive by a daemon thread every ttl/3 while work is in progress.

    exclusive=True makes it a lock (SET NX): `acquire` waits while a live holder has it. When the
    process dies the key expires after ttl_s, which is how the reconciler tells dead work from
    slow work.
    """

    def __init__(self, r: redis.Redis, key: str, ttl_s: float, *, value: str | None = None,
                 exclusive: bool = False):
        self.r = r
        self.key = key
        self.ttl_ms = max(100, int(ttl_s * 1000))
        self.value = value or f"{worker_identity()}:{uuid.uuid4().hex[:8]}"
        self.exclusive = exclusive
        self.lost = False
        self._refresh = bound(r, _REFRESH_LUA)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, *, wait: bool = True, poll_s: float | None = None) -> bool:
        """Take the key (and start refreshing it); with wait, poll until a live holder lets go."""
        poll_s = poll_s if poll_s is not None else min(1.0, self.ttl_ms / 3000)
        while True:
            if self.exclusive:
                taken = bool(self.r.set(self.key, self.value, px=self.ttl_ms, nx=True))
            else:
                taken = bool(self.r.set(self.key, self.value, px=self.ttl_ms))
            if taken:
                self._start_thread()
                return True
            if not wait:
                return False
            time.sleep(poll_s)

    def _start_thread(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat {self.key}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = self.ttl_ms / 3000
        while not self._stop.wait(interval):
            try:
                kept = self._refresh(keys=[self.key], args=[self.value, self.ttl_ms, int(self.exclusive)])
            except redis.RedisError as e:  # keep trying: Redis may come back before the TTL runs out
                log.warning("heartbeat %s: %s", self.key, e)
                continue
            if not kept and not self.lost:
                self.lost = True
                log.warning("heartbeat %s: lost to another holder", self.key)

    def release(self) -> None:
        """Stop refreshing and delete the key if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            delete_if_equal(self.r, self.key, self.value)
        except redis.RedisError as e:  # it expires by itself
            log.warning("heartbeat %s: not deleted: %s", self.key, e)

    def __enter__(self) -> Heartbeat:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Lease:
    """Leadership among processes: `hold()` takes a Redis key with a TTL when nobody has it, or keeps it
    when this process does, and says whether this process holds it. A holder that stops calling (it
    died) loses the key after ttl_s, and the next caller takes over."""

    def __init__(self, r: redis.Redis, key: str, ttl_s: float):
        self.r = r
        self.key = key
        self.ttl_ms = max(100, int(ttl_s * 1000))
        self.value = f"{worker_identity()}:{uuid.uuid4().hex[:8]}"
        self._refresh = bound(r, _REFRESH_LUA)

    def hold(self) -> bool:
        return bool(self._refresh(keys=[self.key], args=[self.value, self.ttl_ms, 1]))

    def holder(self) -> str | None:
        value = self.r.get(self.key)
        return value.decode() if value is not None else None

    def release(self) -> None:
        delete_if_equal(self.r, self.key, self.value)


# --- rq helpers ------------------------------------------------------------------------------------


def job_states(r: redis.Redis, job_ids: Sequence[str | None]) -> list[tuple[str | None, float | None]]:
    """(status, started_at as a unix time) of each job id, (None, None) for a missing job.

    One pipelined HMGET per job instead of Job.fetch, which would also load every payload; this
    reads rq's job hash fields `status` and `started_at` (rq==2.12, pinned).
    """
    pipe = r.pipeline()
    for job_id in job_ids:
        if job_id:
            pipe.hmget(Job.key_for(job_id), ["status", "started_at"])
    answers = iter(pipe.execute())
    out: list[tuple[str | None, float | None]] = []
    for job_id in job_ids:
        if not job_id:
            out.append((None, None))
            continue
        status, started = next(answers)
        started_at = None
        if started:
            try:
                started_at = utcparse(started.decode()).timestamp()
            except ValueError:
                started_at = None
        out.append((status.decode() if status else None, started_at))
    return out


def is_alive(status: str | None, started_at: float | None, *, now: float, grace_s: float) -> bool:
    """Will this job run (or is it running) without help? Started jobs get grace_s to show a heartbeat."""
    if status in _WAITING:
        return True
    if status == JobStatus.STARTED.value:
        return started_at is not None and now - started_at < grace_s
    return False


def job_options(settings: Settings) -> dict:
    return {"timeout": settings.job_timeout_s, "result_ttl": RESULT_TTL_S, "failure_ttl": FAILURE_TTL_S}


def enqueue_job(r: redis.Redis, queue_name: str, func: str, payload: dict, job_id: str, *,
                settings: Settings, description: str) -> Job:
    """Enqueue func(payload) under job_id; an ended job (finished, failed...) of that id is replaced."""
    queue = Queue(queue_name, connection=r)
    [(status, _)] = job_states(r, [job_id])
    if status is not None:
        if status in _WAITING or status == JobStatus.STARTED.value:
            raise RuntimeError(f"job {job_id} is {status}; refusing to replace it")
        Job.fetch(job_id, connection=r).delete(remove_from_queue=True)
    return queue.enqueue_call(func, args=(payload,), job_id=job_id, description=description,
                              **job_options(settings))


def enqueue_unless_pending(r: redis.Redis, queue_name: str, func: str, payload: dict, job_id: str, *,
                           settings: Settings, description: str) -> str | None:
    """enqueue_job, unless a job of that id is waiting or running (it does the work): the id, or None."""
    [(status, _)] = job_states(r, [job_id])
    if status in _WAITING or status == JobStatus.STARTED.value:
        return None
    enqueue_job(r, queue_name, func, payload, job_id, settings=settings, description=description)
    return job_id


@dataclass
class Unattended:
    """A planned shard that nobody is doing: its last job id and how many attempts it has had."""

    shard: int
    job_id: str | None
    attempts: int
    status: str | None


def unattended_shards(r: redis.Redis, missing: list[int], *, heartbeat_key: Callable[[int], str], jobs_key: str,
                      now: float, grace_s: float) -> list[Unattended]:
    """The shards of `missing` (not done) with no live heartbeat and no job that will run or is running.

    jobs_key is a hash: shard -> its latest job id, '<shard>:attempts', and the time it was planned,
    '<shard>:planned_at' or 'planned_at' for the whole plan; a shard planned less than grace_s ago
    and still without a job is being enqueued right now, so it is not unattended.
    """
    if not missing:
        return []
    pipe = r.pipeline(transaction=False)
    for i in missing:
        pipe.exists(heartbeat_key(i))
    candidates = [i for i, beating in zip(missing, pipe.execute(), strict=True) if not beating]
    if not candidates:
        return []
    fields = r.hmget(jobs_key, ["planned_at"] + [f for i in candidates
                                                 for f in (str(i), f"{i}:attempts", f"{i}:planned_at")])
    plan_wide = float(fields[0] or 0)
    ids = [v.decode() if v else None for v in fields[1::3]]
    out = []
    for i, job_id, attempts, planned_at, (status, started_at) in zip(
            candidates, ids, fields[2::3], fields[3::3], job_states(r, ids), strict=True):
        if is_alive(status, started_at, now=now, grace_s=grace_s):
            continue
        if status is None and now - float(planned_at or plan_wide) < grace_s:
            continue
        out.append(Unattended(i, job_id, int(attempts or 0), status))
    return out
