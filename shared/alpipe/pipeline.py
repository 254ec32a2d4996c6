"""Orchestration of the trainer and scorer jobs: enqueueing, fan-out, heartbeats and the reconciler.

Imported by the API, so nothing here imports torch: jobs are enqueued by dotted path.

Who does what
- `maybe_enqueue_train` (the API, after labels; the trainer, after a round) queues one train job
  when `query_size` new labels arrived, holding the project's train slot so that at most one train
  job per project waits in the queue.
- The trainer (alpipe.trainer_core) takes the project's train lock, releases the slot, trains,
  writes checkpoint vN, moves the pointer, then calls `enqueue_scoring(vN)`.
- `enqueue_scoring` plans the shards of ranking vN once (stored in Redis, so a lost shard can be
  re-sent with the same samples) and queues one score job per shard.
- Scorers (alpipe.scoring) keep a heartbeat key alive while they work on a shard.
- `reconcile` (the API, every `reconcile_interval_s`) re-enqueues work that nobody is doing: a due
  train with no live job and no live trainer, and shards of the current model's ranking that are
  neither done, nor waiting in the queue, nor covered by a live heartbeat. A worker killed mid-job
  (SIGKILL, lost node) is therefore replaced within heartbeat_ttl_s + reconcile_interval_s plus
  the time the new job takes.

Job ids are deterministic: `train-{p}-n{labeled}` and `score-{p}-v{version}-s{shard}`; a retry
appends `-a{attempt}` (rq 2 allows only letters, digits, '_' and '-' in job ids; read from the
right, the fixed suffix keeps ids of different projects apart). Retries per shard (and per labeled
count for training) stop after `max_job_attempts`, so a job that always fails is reported instead
of looping.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import redis
from rq import Queue
from rq.job import JobStatus

from . import cold_start, embed_pass, keys
from .config import Settings, get_settings
from .errors import NotFound, StoreUnavailable
from .records import read_project
from .redis_lua import delete_if_equal
from .schemas import Project, ScoreJob, TrainJob
from .state import ProjectState, TrainMarks, project_names
from .storage import ObjectStore
from .strategies import subsample_pool
from .work import (  # noqa: F401  (re-exported: the orchestration's public names stay here)
    _WAITING,
    FAILURE_TTL_S,
    RESULT_TTL_S,
    Heartbeat,
    enqueue_job,
    is_alive,
    job_options,
    job_states,
    unattended_shards,
    worker_identity,
)

log = logging.getLogger(__name__)


# The slot outlives any sane queue wait; the reconciler frees it sooner when its job is gone.
TRAIN_SLOT_TTL_S = 6 * 3600
FANOUT_LOCK_TTL_S = 300
_PLAN_CHUNK = 500


def train_lock(r: redis.Redis, project: str, *, ttl_s: float, job_id: str | None = None) -> Heartbeat:
    """The per-project training lock; its TTL is the running trainer's heartbeat."""
    value = f"{worker_identity(job_id)}:{uuid.uuid4().hex[:8]}"  # unique even for two calls in one process
    return Heartbeat(r, keys.train_lock_key(project), ttl_s, value=value, exclusive=True)


def score_heartbeat(r: redis.Redis, project: str, version: int, shard: int, *, ttl_s: float,
                    job_id: str | None = None) -> Heartbeat:
    return Heartbeat(r, keys.score_heartbeat_key(project, version, shard), ttl_s, value=worker_identity(job_id))


# --- training ---------------------------------------------------------------------------------------


def train_due(state: ProjectState, project: Project, *, labeled: int | None = None,
              marks: TrainMarks | None = None) -> bool:
    """query_size labels arrived since the current model's labels, or any new label while a
    training request (POST /projects/{p}/train) is pending. labeled and marks: the count and the
    train marks, when read already.

    The one rule for the API, the reconciler and the trainer; the request lives in Redis (not in a
    job), so it survives a trainer that dies with the job. A project in embedding mode trains
    nothing until its embedding pass is complete (the job completing it queues the training).
    """
    if not embed_pass.is_complete(state.r, project):
        return False
    labeled = state.labeled_count() if labeled is None else labeled
    marks = marks or state.train_marks()
    unseen = labeled - marks.model_labels
    return unseen >= project.query_size or (unseen >= 1 and marks.forced_pending)


def maybe_enqueue_train(r: redis.Redis, project: Project, *, settings: Settings | None = None,
                        labeled: int | None = None) -> str | None:
    """Enqueue one train job when training is due and no other one is queued; its job id, or None.

    Called by the API after labels are applied and by the trainer after a round. The project's
    train slot (claimed here, released by the trainer once it holds the train lock) keeps at most
    one train job per project waiting; concurrent callers race on the slot, not on the queue.
    While a trainer holds the project's train lock nothing is queued: that trainer calls this
    again after releasing the lock, so labels applied before this call are never left behind.
    labeled: the labeled count, when the caller has it (the API, right after applying labels).
    """
    settings = settings or get_settings()
    state = ProjectState(r, project.name)
    if labeled is None:
        labeled = state.labeled_count()
    marks = state.train_marks()
    if marks.busy:  # queued or training: that job, or its trainer's next call, covers these labels
        return None
    if not train_due(state, project, labeled=labeled, marks=marks):
        return None
    attempts_key = keys.train_attempts_key(project.name)
    attempt = int(r.hget(attempts_key, labeled) or 0) + 1
    if attempt > settings.max_job_attempts:
        log.warning("%s: %d train jobs at %d labels ended without a model; waiting for more labels",
                    project.name, attempt - 1, labeled)
        return None
    job_id = f"train-{project.name}-n{labeled}" + (f"-a{attempt}" if attempt > 1 else "")
    [(status, _)] = job_states(r, [job_id])
    if status in _WAITING or status == JobStatus.STARTED.value:  # attempt counts were lost (Redis rebuilt)
        job_id = f"{job_id}-{uuid.uuid4().hex[:8]}"
    if not state.claim_train_slot(job_id, TRAIN_SLOT_TTL_S):
        return None
    try:
        pipe = r.pipeline()
        pipe.hincrby(attempts_key, labeled, 1)
        pipe.expire(attempts_key, 24 * 3600)
        pipe.execute()
        payload = TrainJob(project=project.name, requested_at=time.time()).model_dump(mode="json")
        enqueue_job(r, keys.QUEUE_TRAIN, keys.JOB_TRAIN, payload, job_id, settings=settings,
                    description=f"train {project.name} on {labeled} labels")
    except BaseException:
        state.release_train_slot(job_id)
        raise
    log.info("%s: queued %s", project.name, job_id)
    return job_id


def embedding_pass_complete(r: redis.Redis, store: ObjectStore, project: Project, *, settings: Settings) -> dict:
    """Called by the job that completed a project's embedding pass: queue what waited for it."""
    version = ProjectState(r, project.name).model_version()
    shards = None
    if version > 0:
        shards = enqueue_scoring(r, store, project, version, settings=settings)
    return {"train_job": maybe_enqueue_train(r, project, settings=settings), "score_shards": shards,
            "cold_start_job": cold_start.maybe_enqueue(r, project, settings=settings)}


def _reconcile_training(r: redis.Redis, project: Project, *, settings: Settings, now: float) -> str | None:
    state = ProjectState(r, project.name)
    if not train_due(state, project):
        return None
    if r.exists(keys.train_lock_key(project.name)):
        return None  # a live trainer; it re-checks for new labels when it is done
    queued = state.queued_train_job()
    if queued:
        [(status, started_at)] = job_states(r, [queued])
        if is_alive(status, started_at, now=now, grace_s=settings.heartbeat_ttl_s):
            return None
        log.warning("%s: train job %s is %s with no live trainer; replacing it",
                    project.name, queued, status or "missing")
        state.release_train_slot(queued)
    return maybe_enqueue_train(r, project, settings=settings)


# --- scoring ----------------------------------------------------------------------------------------


def _plan_shards(state: ProjectState, project: Project, version: int, shard_size: int) -> list[list[str]]:
    pool = state.pool_ids()  # sorted, so shards are reproducible
    if project.pool_size:
        rng = np.random.default_rng([project.seed, version])
        pool = [str(s) for s in subsample_pool(np.asarray(pool, dtype=object), project.pool_size, rng)]
    size = max(1, shard_size)
    return [pool[i:i + size] for i in range(0, len(pool), size)]


def _score_job_id(project: str, version: int, shard: int, attempt: int) -> str:
    base = f"score-{project}-v{version}-s{shard}"
    return base if attempt <= 1 else f"{base}-a{attempt}"


def enqueue_scoring(r: redis.Redis, store: ObjectStore, project: Project, version: int, *,
                    settings: Settings) -> int:
    """Fan out score jobs of model `version` over the unlabeled pool; returns the number of shards.

    The shards (the pool, or a seeded random `pool_size` subsample of it, cut into shard_size
    pieces) are planned once per version and kept in Redis; calling this again for the same version
    re-sends only shards that are neither done, queued nor running, with the same samples. An empty
    pool gives 0 shards and the (empty) ranking of `version` goes live at once, so the live ranking
    always belongs to the newest scored model. `store` is unused today (the pool lives in Redis)
    and kept for backends that plan shards from object storage. In embedding mode nothing is
    planned while the embedding pass runs (0 is returned); the job completing it calls this again.
    """
    del store
    if not embed_pass.is_complete(r, project):
        log.info("%s: v%d: scoring waits for the embedding pass", project.name, version)
        return 0
    state = ProjectState(r, project.name)
    n_shards = state.n_shards(version)
    if n_shards is None:
        n_shards = _fan_out(r, state, project, version, settings=settings)
        if n_shards is not None:
            return n_shards
        n_shards = state.n_shards(version) or 0
    _revive_shards(r, project, version, n_shards, settings=settings, now=time.time())
    return n_shards


def _fan_out(r: redis.Redis, state: ProjectState, project: Project, version: int, *,
             settings: Settings) -> int | None:
    """Plan and enqueue every shard of `version`; None when another caller planned them meanwhile."""
    lock = keys.fanout_lock_key(project.name, version)
    token = worker_identity(uuid.uuid4().hex[:8])
    deadline = time.monotonic() + FANOUT_LOCK_TTL_S
    while not r.set(lock, token, nx=True, ex=FANOUT_LOCK_TTL_S):
        if state.n_shards(version) is not None:
            return None
        if time.monotonic() > deadline:
            raise TimeoutError(f"{project.name}: shards of v{version} still being planned elsewhere")
        time.sleep(0.05)
    try:
        if state.n_shards(version) is not None:
            return None
        shards = _plan_shards(state, project, version, settings.shard_size)
        plan_key, jobs_key = keys.shard_plan_key(project.name, version), keys.shard_jobs_key(project.name, version)
        pipe = r.pipeline(transaction=False)
        pipe.delete(plan_key, jobs_key)
        for start in range(0, len(shards), _PLAN_CHUNK):
            chunk = {str(i): json.dumps(shards[i]) for i in range(start, min(start + _PLAN_CHUNK, len(shards)))}
            pipe.hset(plan_key, mapping=chunk)
            pipe.hset(jobs_key, mapping={**{str(i): _score_job_id(project.name, version, i, 1) for i in chunk},
                                         **{f"{i}:attempts": 1 for i in chunk}})
        # The jobs are enqueued just after n_shards is set: until then a missing job is not lost.
        pipe.hset(jobs_key, "planned_at", time.time())
        pipe.execute()
        # The plan is complete before n_shards exists: n_shards marks a ranking whose shards can be re-sent.
        state.begin_ranking(version, len(shards))
    finally:
        delete_if_equal(r, lock, token)
    if not shards:
        # Nothing to score: shard 0 of 0 completes the ranking at once.
        state.shard_done(version, 0, 0)
        log.info("%s: v%d has an empty pool; its empty ranking is live", project.name, version)
        return 0
    queue = Queue(keys.QUEUE_SCORE, connection=r)
    options = job_options(settings)
    for start in range(0, len(shards), _PLAN_CHUNK):
        batch = [
            Queue.prepare_data(
                keys.JOB_SCORE_SHARD,
                args=(ScoreJob(project=project.name, model_version=version, shard=i, n_shards=len(shards),
                               sample_ids=shards[i]).model_dump(mode="json"),),
                job_id=_score_job_id(project.name, version, i, 1),
                description=f"score {project.name} v{version} shard {i + 1}/{len(shards)}",
                **options)
            for i in range(start, min(start + _PLAN_CHUNK, len(shards)))
        ]
        queue.enqueue_many(batch)
    log.info("%s: v%d: %d score jobs for %d samples", project.name, version, len(shards),
             sum(len(s) for s in shards))
    return len(shards)


def _revive_shards(r: redis.Redis, project: Project, version: int, n_shards: int, *, settings: Settings,
                   now: float) -> dict[str, list[int]]:
    """Re-enqueue shards of `version` that nobody is doing: not done, not queued, no live heartbeat."""
    state = ProjectState(r, project.name)
    done = state.shards_done(version)
    missing = [i for i in range(n_shards) if i not in done]
    report: dict[str, list[int]] = {"resubmitted": [], "gave_up": []}
    if not missing:
        return report
    jobs_key = keys.shard_jobs_key(project.name, version)
    for lost in unattended_shards(r, missing, jobs_key=jobs_key, now=now, grace_s=settings.heartbeat_ttl_s,
                                  heartbeat_key=lambda i: keys.score_heartbeat_key(project.name, version, i)):
        i, job_id, attempt, status = lost.shard, lost.job_id, lost.attempts, lost.status
        if i in state.shards_done(version):  # finished while we looked
            continue
        if attempt >= settings.max_job_attempts:
            report["gave_up"].append(i)
            if r.hsetnx(jobs_key, f"{i}:gave_up", 1):  # log once, not on every pass
                log.error("%s: v%d shard %d: %d attempts failed or died; not retrying (job %s)",
                          project.name, version, i, attempt, job_id)
            continue
        raw = r.hget(keys.shard_plan_key(project.name, version), str(i))
        if raw is None:
            log.error("%s: v%d shard %d has no plan; it cannot be re-sent", project.name, version, i)
            report["gave_up"].append(i)
            continue
        attempt = int(r.hincrby(jobs_key, f"{i}:attempts", 1))
        new_id = _score_job_id(project.name, version, i, attempt)
        r.hset(jobs_key, str(i), new_id)
        payload = ScoreJob(project=project.name, model_version=version, shard=i, n_shards=n_shards,
                           sample_ids=json.loads(raw)).model_dump(mode="json")
        enqueue_job(r, keys.QUEUE_SCORE, keys.JOB_SCORE_SHARD, payload, new_id, settings=settings,
                    description=f"score {project.name} v{version} shard {i + 1}/{n_shards} (attempt {attempt})")
        log.warning("%s: v%d shard %d: job %s was %s with no heartbeat; re-sent as %s",
                    project.name, version, i, job_id, status or "missing", new_id)
        report["resubmitted"].append(i)
    return report


def finish_ranking(r: redis.Redis, project: str, version: int) -> None:
    """Drop the shard plan of a ranking that went live (every shard is done)."""
    r.delete(keys.shard_plan_key(project, version), keys.shard_jobs_key(project, version))


# --- the reconciler -----------------------------------------------------------------------------------


def reconcile(r: redis.Redis, store: ObjectStore, settings: Settings) -> dict:
    """One pass over every project: re-enqueue due training and lost score shards. Safe to run anywhere.

    Returns {"train": {project: job_id}, "fanned_out": {project: version},
    "resubmitted": {project: [shard, ...]}, "gave_up": {project: [shard, ...]}, "errors": {project: why},
    "embedding": {project: {"resubmitted": [...], "gave_up": [...]}}, "cold_start": {project: job_id},
    "rebuilt": {project: recovery report} after a Redis restart that lost writes}, listing only projects where
    something happened. Pending samples of embedding passes are queued here too.
    """
    from .recovery import check_redis_restart

    report: dict[str, dict] = {"train": {}, "fanned_out": {}, "resubmitted": {}, "gave_up": {}, "errors": {},
                               "embedding": {}, "cold_start": {},
                               "rebuilt": check_redis_restart(r, store, settings=settings)}
    now = time.time()
    for name in project_names(r):
        try:
            project = read_project(store, name)
        except NotFound:
            continue  # registered in Redis but being created or deleted
        try:
            embedding = embed_pass.reconcile(r, project, settings=settings, now=now)
            if embedding["resubmitted"] or embedding["gave_up"]:
                report["embedding"][name] = embedding
            job_id = _reconcile_training(r, project, settings=settings, now=now)
            if job_id:
                report["train"][name] = job_id
            cold = cold_start.maybe_enqueue(r, project, settings=settings)
            if cold:
                report["cold_start"][name] = cold
            state = ProjectState(r, name)
            version = state.model_version()
            if version <= 0:
                continue
            n_shards = state.n_shards(version)
            if n_shards is None:
                # The trainer died between moving the pointer and fanning out, or Redis was rebuilt.
                if embed_pass.is_complete(r, project):
                    enqueue_scoring(r, store, project, version, settings=settings)
                    report["fanned_out"][name] = version
                continue
            revived = _revive_shards(r, project, version, n_shards, settings=settings, now=now)
            if revived["resubmitted"]:
                report["resubmitted"][name] = revived["resubmitted"]
            if revived["gave_up"]:
                report["gave_up"][name] = revived["gave_up"]
        except (redis.ConnectionError, redis.TimeoutError, StoreUnavailable):
            raise  # nothing else works either: the caller logs the outage once, not a traceback per project
        except Exception as e:  # one broken project must not stop the others
            log.exception("reconcile %s failed", name)
            report["errors"][name] = f"{type(e).__name__}: {e}"
    return report


# --- workers ------------------------------------------------------------------------------------------


AUTOGROUP = Path("/proc/self/autogroup")


def lower_cpu_priority(nice: int) -> bool:
    """Lower this process's CPU priority by nice; True when its session's autogroup was lowered too.

    With Linux's autogroup scheduling (sched_autogroup_enabled, on in most distributions), the CPU is
    shared fairly between sessions first, and a task's nice value only counts inside its session. A
    worker that `alpipe up` starts in a session of its own would then compete with the API as an
    equal, whatever its nice. So when this process leads its session (its autogroup holds only what
    it started), the autogroup gets the same nice. A worker run in a terminal's session leaves that
    session's group alone: lowering it would slow the shell too.
    """
    if nice <= 0:
        return False
    os.nice(nice)
    if os.getsid(0) != os.getpid() or not AUTOGROUP.exists():
        return False
    for _ in range(20):
        try:
            AUTOGROUP.write_text(str(nice))
            return True
        except BlockingIOError:
            # Without CAP_SYS_ADMIN the kernel takes one autogroup change per 100 ms across the host
            # (EAGAIN): workers started together wait their turn.
            time.sleep(0.11)
        except OSError:
            return False
    return False


def run_worker(kind: str, queue_name: str, r: redis.Redis, *, burst: bool = False, name: str | None = None,
               nice: int = 0) -> None:
    """Run an rq SimpleWorker on one queue until stopped (SIGTERM/SIGINT: finish the job, then exit).

    SimpleWorker runs jobs in this process, without fork: the loaded model and the tensor cache
    stay from one job to the next, and CUDA is never initialized in a parent that later forks.
    nice: how much to lower this process's CPU priority (Settings.worker_nice).
    """
    from rq import SimpleWorker

    lower_cpu_priority(nice)

    worker = SimpleWorker([Queue(queue_name, connection=r)], connection=r,
                          name=name or f"{kind}-{socket.gethostname()}-{os.getpid()}")
    log.info("%s worker %s on queue %r", kind, worker.name, queue_name)
    worker.work(burst=burst, logging_level="INFO", with_scheduler=False)
