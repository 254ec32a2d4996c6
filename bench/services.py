"""Service-level figures of the pipeline on mnist5k with small_cnn, each beside a baseline measured
in the same run (timings are printed, never asserted):

1. scorer throughput through the full job path (ScoreJob payloads on the rq queue `score`, run by
   an in-process rq SimpleWorker with warm model and tensor caches) vs a bare torch forward loop
   over the same uint8 tensors, model, batch size and torch threads;
2. 1 vs 2 scorer worker processes (`alpipe worker scorer`) on the same pool, cold (process start,
   model load and decoding inside the timing) and warm (long-lived workers, caches filled);
3. round turnaround through the local stack (redis-server, API, trainer, 2 scorers): label POST
   until the new ranking is live, split into train, score and orchestration;
The API under load (closed and open loop, several worker processes) is bench/api_load.py.

Everything lives in a temporary directory (a redis-server of its own for parts 1-2, LocalStack's
for part 3). `--quick` shrinks every part.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import redis
import torch
from rq import Queue, SimpleWorker
from rq.exceptions import NoSuchJobError
from rq.job import Job

from alpipe import keys, pipeline
from alpipe.api_client import ApiClient
from alpipe.checkpoints import checkpoint_bytes
from alpipe.config import Settings
from alpipe.data import load_dataset, materialize_builtin, stratified_split
from alpipe.models import build_model, get_model_spec, normalize_batch
from alpipe.procs import die_with_parent, find_redis_server, free_port, stop_process
from alpipe.schemas import CurvePointOut, Project, TrainOptions
from alpipe.stack import LocalStack
from alpipe.state import ProjectState
from alpipe.storage import LocalStore, ObjectStore
from alpipe.tensor_cache import TensorCache
from alpipe.training import TrainConfig, fit, make_checkpoint

log = logging.getLogger("bench.services")

DATASET = "mnist5k"
MODEL = "small_cnn"
REPO = Path(__file__).resolve().parents[1]


# --- small helpers ------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def fmt(value: float | None, spec: str = ".2f", width: int = 9) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return f"{'n/a':>{width}}"
    return f"{value:>{width}{spec}}"


def unix(dt: datetime | None) -> float | None:
    """rq's timestamps (UTC datetimes) as unix seconds."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


@dataclass
class JobTimes:
    job_id: str
    enqueued: float | None
    started: float | None
    ended: float | None
    worker: str | None

    @property
    def duration(self) -> float | None:
        return self.ended - self.started if self.started is not None and self.ended is not None else None


def fetch_job(r: redis.Redis, job_id: str) -> JobTimes | None:
    try:
        job = Job.fetch(job_id, connection=r)
    except NoSuchJobError:
        return None
    return JobTimes(job_id, unix(job.enqueued_at), unix(job.started_at), unix(job.ended_at), job.worker_name)


def score_jobs(r: redis.Redis, project: str, version: int, n_shards: int) -> list[JobTimes | None]:
    """The finished score jobs of a version, by their deterministic ids (latest attempt found wins)."""
    out = []
    for shard in range(n_shards):
        found = None
        for attempt in range(1, 6):
            times = fetch_job(r, pipeline._score_job_id(project, version, shard, attempt))
            if times is None:
                break
            found = times
        out.append(found)
    return out


def ended_score_jobs(r: redis.Redis, project: str, version: int, n_shards: int,
                     timeout_s: float = 10.0) -> list[JobTimes | None]:
    """score_jobs once rq has recorded every end: the ranking goes live inside the last job, a moment
    before rq writes that job's ended_at."""
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = score_jobs(r, project, version, n_shards)
        if all(j is not None and j.ended is not None for j in jobs) or time.monotonic() > deadline:
            return jobs
        time.sleep(0.01)


def span(jobs: list[JobTimes | None]) -> tuple[float | None, float | None]:
    """(first start, last end) of a set of jobs, None when one is missing."""
    if not jobs or any(j is None or j.duration is None for j in jobs):
        return None, None
    return min(j.started for j in jobs), max(j.ended for j in jobs)


def wait_until(predicate: Callable[[], bool], *, timeout_s: float, poll_s: float = 0.005,
               what: str = "condition", alive: Callable[[], None] | None = None) -> float:
    """Poll predicate; returns time.time() when it first held."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return time.time()
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A private redis-server (no persistence) for parts 1-2."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                             "--save", "", "--appendonly", "no", "--daemonize", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=die_with_parent)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
        wait_until(lambda: _pings(client), timeout_s=20, poll_s=0.05, what="redis-server")
        yield url
    finally:
        stop_process(proc)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


# --- a project scored directly by workers (parts 1 and 2) --------------------------------------------


@dataclass
class Fixture:
    r: redis.Redis
    redis_url: str
    data_dir: Path
    store: ObjectStore
    project: Project
    pool_ids: list[str]
    model: torch.nn.Module
    in_channels: int
    next_version: int = 1

    @property
    def state(self) -> ProjectState:
        return ProjectState(self.r, self.project.name)


def build_fixture(r: redis.Redis, redis_url: str, data_dir: Path, cache_dir: Path, *, pool_limit: int) -> Fixture:
    """mnist5k in a fresh LocalStore, a margin project over its pool split (test_fraction 0.2, as the API
    does), and a small_cnn briefly trained on 200 test-split images, so the checkpoints are real ones."""
    store = LocalStore(data_dir / "store")  # where open_store(Settings(data_dir=...)) looks, as the workers do
    manifest = load_dataset(DATASET, store=store, cache_dir=cache_dir)
    known = [s for s in manifest.samples if s.label is not None]
    is_test = stratified_split([s.label for s in known], test_fraction=0.2, seed=0)
    pool = [s for s, t in zip(known, is_test, strict=True) if not t]
    test = [s for s, t in zip(known, is_test, strict=True) if t]
    if pool_limit and pool_limit < len(pool):
        pool = pool[:pool_limit]
    name = f"bench-score-{uuid.uuid4().hex[:6]}"
    project = Project(name=name, classes=manifest.classes, strategy="margin", query_size=10, model=MODEL,
                      pretrained=False, training=TrainOptions(stop="epochs:2"), seed=0, created_at=time.time())
    store.put_bytes(keys.project_key(name), project.model_dump_json().encode())
    state = ProjectState(r, name)
    state.register(project.model_dump_json())
    state.add_samples([(s.id, "pool", s.label) for s in pool] + [(s.id, "test", s.label) for s in test])

    spec = get_model_spec(MODEL)
    in_channels = 1  # mnist is grayscale; small_cnn takes it as is
    train = test[:200]
    x = TensorCache(64 << 20).get_many(store, [s.id for s in train], size=spec.input_size, channels=in_channels)
    y = torch.tensor([manifest.classes.index(s.label) for s in train])
    torch.manual_seed(0)
    model = build_model(MODEL, len(manifest.classes), in_channels=in_channels, pretrained=False)
    fit(model, x, y, spec=spec, config=TrainConfig(stop="epochs:2"), device=torch.device("cpu"), seed=0)
    model.eval()
    return Fixture(r, redis_url, data_dir, store, project, state.pool_ids(), model, in_channels)


def publish_version(fx: Fixture) -> int:
    """Checkpoint vN + metrics + pointer + Redis model version, laid out as trainer_core writes them.

    Every version carries the same weights: scoring cost does not depend on them."""
    version = fx.next_version
    fx.next_version += 1
    name = fx.project.name
    checkpoint = make_checkpoint(fx.model, model_name=MODEL, model_version=version, classes=fx.project.classes,
                                 in_channels=fx.in_channels, config={"bench": True, "n_labeled": 200})
    if not fx.store.put_if_absent(keys.checkpoint_key(name, version), checkpoint_bytes(checkpoint)):
        raise RuntimeError(f"checkpoint v{version} of {name} exists already")
    point = CurvePointOut(model_version=version, n_labeled=0, test_accuracy=None, train_s=0.0, created_at=time.time())
    fx.store.put_json(keys.model_metrics_key(name, version), point.model_dump(mode="json"))
    fx.store.put_json(keys.current_model_key(name),
                      {"version": version, "n_labeled": 0, "key": keys.checkpoint_key(name, version)})
    fx.state.set_model(version, 0, point.model_dump_json())
    return version


def scoring_settings(fx: Fixture, args: argparse.Namespace) -> Settings:
    return Settings(redis_url=fx.redis_url, data_dir=fx.data_dir, device="cpu", torch_threads=args.threads,
                    score_batch_size=args.batch_size, shard_size=args.shard_size, test_score_delay_s=0.0)


# --- part 1: scorer throughput, job path vs bare forward ---------------------------------------------


@dataclass
class ThroughputResult:
    images: int
    shards: int
    cold_s: float
    job_s: list[float] = field(default_factory=list)
    enqueue_s: list[float] = field(default_factory=list)
    inside_jobs_s: list[float] = field(default_factory=list)
    bare_s: list[float] = field(default_factory=list)
    timed_misses: int = 0
    profile: str = ""


@dataclass
class PassTimes:
    live_s: float  # enqueue_scoring called -> last score job ended (the ranking went live inside it)
    enqueue_s: float  # enqueue_scoring alone (plan the shards, enqueue their jobs)
    inside_s: float  # sum of the score jobs' own durations (rq started_at..ended_at)
    shards: int


def run_in_process_pass(fx: Fixture, settings: Settings) -> PassTimes:
    """Enqueue the scoring of a new version and run a burst SimpleWorker here until the queue is empty.

    The end point is the last score job's end (rq's ended_at): the burst worker's teardown afterwards
    (rq joins its pub/sub thread, up to ~1s) is not part of the job path of a long-lived worker."""
    version = publish_version(fx)
    started = time.time()
    n_shards = pipeline.enqueue_scoring(fx.r, fx.store, fx.project, version, settings=settings)
    enqueued = time.time()
    worker = SimpleWorker([Queue(keys.QUEUE_SCORE, connection=fx.r)], connection=fx.r,
                          name=f"bench-inproc-{os.getpid()}-v{version}")
    worker.work(burst=True, logging_level="WARNING", with_scheduler=False)
    if fx.state.live_version() != version:
        raise RuntimeError(f"v{version} is not live after the burst (live: {fx.state.live_version()}); "
                           "a score job failed? see rq's failed job registry")
    jobs = ended_score_jobs(fx.r, fx.project.name, version, n_shards)
    _, last = span(jobs)
    if last is None:
        raise RuntimeError(f"v{version}: rq has no start/end times of every score job")
    inside = sum(j.duration for j in jobs if j is not None and j.duration is not None)
    return PassTimes(last - started, enqueued - started, inside, n_shards)


def bare_forward(model: torch.nn.Module, images: torch.Tensor, *, batch_size: int) -> float:
    """normalize + forward + softmax over the uint8 tensors, nothing else."""
    spec = get_model_spec(MODEL)
    model.eval()
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = normalize_batch(images[start:start + batch_size], spec)
            torch.softmax(model(x).float(), dim=1)
    return time.perf_counter() - started


def profile_text(profiler: cProfile.Profile, *, top: int = 18) -> str:
    """Hotspots by own time, with file:function, from a profile of one job-path pass."""
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
        short = filename
        for marker in ("site-packages/", "/work/main/", str(REPO) + "/"):
            if marker in short:
                short = short.split(marker, 1)[1]
        rows.append((tottime, cumtime, ncalls, f"{short}:{line}({func})"))
    total = sum(r[0] for r in rows) or 1.0
    rows.sort(reverse=True)
    out = [f"    {'own s':>7} {'own %':>6} {'cum s':>7} {'calls':>8}  function"]
    for tottime, cumtime, ncalls, where in rows[:top]:
        out.append(f"    {tottime:7.3f} {tottime / total:6.1%} {cumtime:7.3f} {ncalls:8d}  {where}")
    # Where the job path spends its time, by layer (cumulative, so nested entries overlap).
    ours = sorted((r for r in rows if any(k in r[3] for k in ("alpipe/", "services/", "rq/"))),
                  key=lambda r: r[1], reverse=True)[:14]
    out.append(f"    -- alpipe/services/rq functions by cumulative time (of {total:.2f}s profiled) --")
    for tottime, cumtime, ncalls, where in ours:
        out.append(f"    {tottime:7.3f} {'':6} {cumtime:7.3f} {ncalls:8d}  {where}")
    return "\n".join(out)


def part_throughput(fx: Fixture, args: argparse.Namespace) -> ThroughputResult:
    from services.scorer import jobs as scorer_jobs

    settings = scoring_settings(fx, args)
    torch.set_num_threads(args.threads)
    ctx = scorer_jobs.configure(settings, redis_client=fx.r, store=fx.store)
    # Warm-up: v1 loads its model and decodes the whole pool into the tensor cache (the cold pass).
    cold = run_in_process_pass(fx, settings)
    log.info("part 1: cold pass %.2fs (%d shards, tensor cache %d images)", cold.live_s, cold.shards,
             len(ctx.tensors))
    spec = get_model_spec(MODEL)
    images = ctx.tensors.get_many(fx.store, fx.pool_ids, size=spec.input_size, channels=fx.in_channels)
    model = ctx.models.get(fx.store, fx.project.name, fx.next_version - 1).model  # the scorer's own model object
    result = ThroughputResult(images=len(fx.pool_ids), shards=cold.shards, cold_s=cold.live_s)
    bare_forward(model, images[: args.batch_size * 2], batch_size=args.batch_size)  # first-call allocations
    misses_before = ctx.tensors.misses
    for i in range(args.repeats):  # interleaved, so drift in machine load hits both sides alike
        result.bare_s.append(bare_forward(model, images, batch_size=args.batch_size))
        times = run_in_process_pass(fx, settings)
        result.job_s.append(times.live_s)
        result.enqueue_s.append(times.enqueue_s)
        result.inside_jobs_s.append(times.inside_s)
        log.info("part 1: repeat %d: bare %.2fs, job path %.2fs (enqueue %.3fs, inside jobs %.2fs)", i + 1,
                 result.bare_s[-1], times.live_s, times.enqueue_s, times.inside_s)
    result.timed_misses = ctx.tensors.misses - misses_before
    ratio = (len(images) / median(result.job_s)) / (len(images) / median(result.bare_s))
    if args.profile or ratio < args.profile_below:
        profiler = cProfile.Profile()
        profiler.enable()
        run_in_process_pass(fx, settings)
        profiler.disable()
        result.profile = profile_text(profiler)
    return result


def print_throughput(res: ThroughputResult, args: argparse.Namespace) -> None:
    n = res.images
    job, bare, inside = median(res.job_s), median(res.bare_s), median(res.inside_jobs_s)
    enqueue = median(res.enqueue_s)
    dispatch = median([j - e - i for j, e, i in zip(res.job_s, res.enqueue_s, res.inside_jobs_s, strict=True)])
    print(f"\n[1] scorer throughput on {n} pool images ({MODEL}, batch {args.batch_size}, {args.threads} torch "
          f"thread(s), {res.shards} shard(s) of <= {args.shard_size}), median of {len(res.job_s)}")
    print(f"    {'path':<58}{'seconds':>9}{'images/s':>11}")
    print(f"    {'bare torch loop (normalize+forward+softmax, inference_mode)':<58}{fmt(bare)}"
          f"{fmt(n / bare, '.0f', 11)}")
    print(f"    {'job path: enqueue -> SimpleWorker -> ranking live':<58}{fmt(job)}{fmt(n / job, '.0f', 11)}")
    print(f"    {'  enqueue_scoring (plan shards, enqueue their jobs)':<58}{fmt(enqueue)}")
    print(f"    {'  rq: worker start, dequeue, between jobs':<58}{fmt(dispatch)}")
    print(f"    {'  inside the score jobs (rq started_at..ended_at)':<58}{fmt(inside)}"
          f"{fmt(n / inside, '.0f', 11)}")
    print(f"    {'cold first pass (model load + decode the pool, same path)':<58}{fmt(res.cold_s)}"
          f"{fmt(n / res.cold_s, '.0f', 11)}")
    print(f"    ratio job path / bare = {bare / job:.2f}  (target >= 0.9); warm: every timed pass scores a new "
          f"version (its checkpoint load is inside the timing)\n    over images already in the tensor cache "
          f"({res.timed_misses} misses in the timed passes); bare and job passes alternate; the job path ends at the "
          "last score job's rq ended_at")
    if res.profile:
        print("    profile of one more warm job-path pass (cProfile, own time; it also covers the burst worker's "
              "teardown, e.g. rq joining its pub/sub thread in unsubscribe, which comes after the ranking is live):")
        print(res.profile)


# --- part 2: 1 vs 2 scorer worker processes -----------------------------------------------------------


def worker_env(fx: Fixture, args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"REDIS_URL": fx.redis_url, "ALPIPE_REDIS_URL": fx.redis_url, "ALPIPE_DATA_DIR": str(fx.data_dir),
                "ALPIPE_TORCH_THREADS": "1", "ALPIPE_DEVICE": "cpu", "ALPIPE_S3_ENDPOINT": "",
                "ALPIPE_SCORE_BATCH_SIZE": str(args.batch_size), "ALPIPE_TEST_SCORE_DELAY_S": "0",
                "PYTHONUNBUFFERED": "1"})
    return env


def spawn_scorers(fx: Fixture, args: argparse.Namespace, n: int, *, burst: bool, tag: str,
                  first: int = 0) -> list[subprocess.Popen]:
    procs = []
    log_dir = fx.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + n):
        name = f"bench-{tag}-{i + 1}-{os.getpid()}"
        cmd = [sys.executable, "-m", "alpipe.cli", "worker", "scorer", "--name", name] + (["--burst"] if burst else [])
        with open(log_dir / f"{name}.log", "ab") as out:
            procs.append(subprocess.Popen(cmd, env=worker_env(fx, args), stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True,
                                          preexec_fn=die_with_parent))
    return procs


def _check_procs(procs: list[subprocess.Popen], *, burst: bool) -> Callable[[], None]:
    def check() -> None:
        dead = [p for p in procs if p.poll() is not None]
        if (burst and len(dead) == len(procs)) or (not burst and dead):
            raise RuntimeError(f"scorer process exited with {[p.returncode for p in dead]} before the ranking "
                               "went live (see the logs folder of the temp dir; run with --keep)")
    return check


@dataclass
class ScaleRun:
    workers: int
    total_s: float
    to_first_job_s: float | None
    jobs_span_s: float | None
    per_worker: dict[str, int]
    note: str = ""


def cold_run(fx: Fixture, args: argparse.Namespace, n_workers: int) -> ScaleRun:
    settings = scoring_settings(fx, args)
    version = publish_version(fx)
    t0 = time.time()
    n_shards = pipeline.enqueue_scoring(fx.r, fx.store, fx.project, version, settings=settings)
    procs = spawn_scorers(fx, args, n_workers, burst=True, tag=f"cold{n_workers}")
    try:
        t1 = wait_until(lambda: fx.state.live_version() == version, timeout_s=300, what=f"ranking v{version}",
                        alive=_check_procs(procs, burst=True))
        for p in procs:
            p.wait(timeout=60)
    finally:
        for p in procs:
            stop_process(p)
    jobs = ended_score_jobs(fx.r, fx.project.name, version, n_shards)
    first, last = span(jobs)
    per_worker: dict[str, int] = {}
    for j in jobs:
        if j is not None:
            per_worker[j.worker or "?"] = per_worker.get(j.worker or "?", 0) + 1
    return ScaleRun(n_workers, t1 - t0, None if first is None else first - t0,
                    None if first is None else last - first, per_worker)


def hold_worker(redis_url: str, key: str, timeout_s: float) -> str:
    """rq job run by a scorer in part 2: keeps that worker busy until `key` gets an item."""
    client = redis.Redis.from_url(redis_url)  # redis-py 8 reads with a 5 s socket timeout: block in short steps
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if client.blpop([key], timeout=1):
                return "released"
    finally:
        client.close()
    return "timed out"


def _all_status(jobs: list[Job], status: str) -> bool:
    return all(job.get_status(refresh=True) == status for job in jobs)


def warm_runs(fx: Fixture, args: argparse.Namespace, n_workers: int) -> ScaleRun:
    """Long-lived workers, each with the whole pool decoded, then timed passes of new versions
    (checkpoint load inside the timing, decoding not).

    rq hands shards to whichever worker asks first, so warm-up passes alone leave a worker's cache
    partial at random. Each worker is therefore warmed alone: the ones already warm are parked on a
    hold_worker job while the new one scores a whole warm-up pass, then released."""
    settings = scoring_settings(fx, args)
    procs: list[subprocess.Popen] = []
    queue = Queue(keys.QUEUE_SCORE, connection=fx.r)
    note = ""

    def check() -> None:
        _check_procs(procs, burst=False)()

    def one_pass() -> tuple[float, float, list[JobTimes | None]]:
        version = publish_version(fx)
        t0 = time.time()
        n_shards = pipeline.enqueue_scoring(fx.r, fx.store, fx.project, version, settings=settings)
        t1 = wait_until(lambda: fx.state.live_version() == version, timeout_s=300, what=f"ranking v{version}",
                        alive=check)
        return t0, t1 - t0, ended_score_jobs(fx.r, fx.project.name, version, n_shards)

    try:
        for k in range(n_workers):
            release = f"bench:release:{uuid.uuid4().hex[:8]}"
            holds = [queue.enqueue("bench.services.hold_worker", fx.redis_url, release, 300, job_timeout=360,
                                   result_ttl=60) for _ in range(k)]
            wait_until(lambda holds=holds: _all_status(holds, "started"), timeout_s=60,
                       poll_s=0.02, what="the warm workers to take their hold jobs", alive=check)
            procs += spawn_scorers(fx, args, 1, burst=False, tag=f"warm{n_workers}", first=k)
            _, _, jobs = one_pass()  # only the new worker is free: it decodes every shard
            workers = {j.worker for j in jobs if j is not None}
            if len(workers) != 1:
                note = f"warm-up of worker {k + 1} was shared by {sorted(workers)}: its cache may be partial"
            if holds:
                fx.r.lpush(release, *(["go"] * len(holds)))
            wait_until(lambda holds=holds: _all_status(holds, "finished"), timeout_s=60,
                       poll_s=0.02, what="the hold jobs to end", alive=check)
        totals, firsts, spans = [], [], []
        per_worker: dict[str, int] = {}
        for _ in range(args.repeats):
            t0, total, jobs = one_pass()
            totals.append(total)
            first, last = span(jobs)
            if first is not None:
                firsts.append(first - t0)
                spans.append(last - first)
            for j in jobs:
                if j is not None:
                    per_worker[j.worker or "?"] = per_worker.get(j.worker or "?", 0) + 1
    finally:
        for p in procs:
            stop_process(p, timeout=15)
    return ScaleRun(n_workers, median(totals), median(firsts) if firsts else None, median(spans) if spans else None,
                    per_worker, note)


def _bare_child(n_images: int, batch_size: int, repeats: int, barrier, results) -> None:
    """One process of the ceiling: a 1-thread bare forward loop over its share, started on a barrier."""
    torch.set_num_threads(1)
    spec = get_model_spec(MODEL)
    torch.manual_seed(0)
    model = build_model(MODEL, 10, in_channels=1, pretrained=False).eval()
    images = torch.randint(0, 256, (n_images, 1, spec.input_size, spec.input_size), dtype=torch.uint8)
    bare_forward(model, images[: batch_size * 2], batch_size=batch_size)
    for _ in range(repeats):
        barrier.wait()
        results.put(bare_forward(model, images, batch_size=batch_size))


def bare_processes(n_procs: int, n_images: int, args: argparse.Namespace) -> ScaleRun:
    """The machine's ceiling for part 2: n processes (1 torch thread each) running the bare loop over
    n_images / n each at the same moment; wall time from the common start to the last one done."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(n_procs + 1), ctx.Queue()
    procs = [ctx.Process(target=_bare_child, args=(n_images // n_procs, args.batch_size, args.repeats, barrier,
                                                   results), daemon=True) for _ in range(n_procs)]
    for p in procs:
        p.start()
    walls = []
    try:
        for _ in range(args.repeats):
            barrier.wait(timeout=120)
            t0 = time.perf_counter()
            for _ in procs:
                results.get(timeout=300)
            walls.append(time.perf_counter() - t0)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    return ScaleRun(n_procs, median(walls), None, None, {})


def part_scaling(fx: Fixture, args: argparse.Namespace) -> dict[str, list[ScaleRun]]:
    out: dict[str, list[ScaleRun]] = {"bare": [], "cold": [], "warm": []}
    for n in (1, 2):
        run = bare_processes(n, len(fx.pool_ids), args)
        log.info("part 2: bare loop in %d process(es): %.2fs", n, run.total_s)
        out["bare"].append(run)
    for n in (1, 2):
        run = cold_run(fx, args, n)
        log.info("part 2: cold, %d worker(s): %.2fs", n, run.total_s)
        out["cold"].append(run)
    if not args.no_warm:
        for n in (1, 2):
            run = warm_runs(fx, args, n)
            log.info("part 2: warm, %d worker(s): %.2fs", n, run.total_s)
            out["warm"].append(run)
    return out


def print_scaling(res: dict[str, list[ScaleRun]], n_images: int, args: argparse.Namespace) -> None:
    print(f"\n[2] 1 vs 2 scorer processes (`alpipe worker scorer`, ALPIPE_TORCH_THREADS=1) on {n_images} images, "
          f"shards of <= {args.shard_size}: enqueue_scoring -> ranking live")
    print(f"    {'mode':<6}{'workers':>8}{'total s':>9}{'images/s':>10}{'to 1st job':>11}{'jobs span':>10}"
          f"{'speedup':>9}  jobs per worker (all timed passes)")
    for mode, runs in res.items():
        if not runs:
            continue
        base = runs[0].total_s
        for run in runs:
            shares = ", ".join(str(v) for v in sorted(run.per_worker.values(), reverse=True))
            print(f"    {mode:<6}{run.workers:>8}{fmt(run.total_s)}{fmt(n_images / run.total_s, '.0f', 10)}"
                  f"{fmt(run.to_first_job_s, '.2f', 11)}{fmt(run.jobs_span_s, '.2f', 10)}"
                  f"{fmt(base / run.total_s, '.2f')}x  {shares}")
            if run.note:
                print(f"          ({run.note})")
    print(f"    bare: the machine's ceiling, n processes x 1 torch thread running the bare forward loop of [1] on "
          f"{n_images}/n images each at once (median of {args.repeats});\n          its speedup is what 2 scorers can "
          "hope for here.")
    print("    cold: burst processes spawned after the enqueue; process start, imports, rq registration, model load "
          "and decoding of every image are inside (to 1st job = enqueue -> first job started, mostly start-up).")
    if res.get("warm"):
        print(f"    warm: long-lived workers that already decoded every shard; median of {args.repeats} passes, each a "
              "new version, so its checkpoint load is inside, decoding is not.")


# --- part 3: the local stack over HTTP -----------------------------------------------------------


def create_http_project(api: ApiClient, name: str, *, classes: list[str], query_size: int, stop: str,
                        dataset: str) -> dict:
    api.json("POST", "/projects", json={"name": name, "classes": classes, "strategy": "margin",
                                        "query_size": query_size, "model": MODEL, "pretrained": False,
                                        "training": {"stop": stop}, "seed": 0})
    return api.json("POST", f"/projects/{name}/samples/import", json={"dataset": dataset})


def label_queries(api: ApiClient, project: str, oracle: dict[str, str], n: int,
                  labeler: str = "bench") -> tuple[int, float]:
    """Query n samples and post their true labels; (labeled count after, time.time() just before the POST)."""
    queries = api.json("GET", f"/projects/{project}/queries", params={"n": n, "labeler": labeler})
    answers = [{"sample_id": s["sample_id"], "label": oracle[s["sample_id"]], "lease_token": queries["lease_token"]}
               for s in queries["samples"]]
    posted = time.time()
    result = api.json("POST", f"/projects/{project}/labels", json={"labels": answers, "labeler": labeler})
    return result["labeled"], posted


def wait_for_live_model(api: ApiClient, project: str, *, n_labeled: int, after_version: int, timeout_s: float) -> dict:
    last: dict = {}

    def ready() -> bool:
        nonlocal last
        last = api.json("GET", f"/projects/{project}")
        model = last["model"]
        return (model["version"] > after_version and model["n_labeled"] >= n_labeled
                and last["live_ranking_version"] == model["version"])

    try:
        wait_until(ready, timeout_s=timeout_s, poll_s=0.02, what=f"{project}: a live model on {n_labeled} labels")
    except TimeoutError as e:
        raise TimeoutError(f"{e}; last state: model={last.get('model')}, live={last.get('live_ranking_version')}, "
                           f"queues={last.get('queues')}") from None
    last["seen_at"] = time.time()
    return last


@dataclass
class RoundTimes:
    round: int
    labels: int
    version: int
    total: float
    train: float | None
    score: float | None
    to_train_start: float | None
    train_job_extra: float | None
    train_to_score: float | None
    score_to_seen: float | None
    shards: int

    @property
    def orchestration(self) -> float | None:
        if self.train is None or self.score is None:
            return None
        return self.total - self.train - self.score


def round_times(r: redis.Redis, project: str, info: dict, *, round_no: int, labeled: int, posted: float) -> RoundTimes:
    version = info["model"]["version"]
    point = next((p for p in info["curve"] if p["model_version"] == version), {})
    train_s = point.get("train_s")
    n_shards = ProjectState(r, project).n_shards(version) or 0
    jobs = ended_score_jobs(r, project, version, n_shards)
    first, last = span(jobs)
    train_job = None
    for suffix in ("", "-a2", "-a3"):
        found = fetch_job(r, f"train-{project}-n{labeled}{suffix}")
        train_job = found or train_job
    to_train = train_extra = train_to_score = None
    if train_job is not None and train_job.duration is not None:
        to_train = train_job.started - posted
        train_extra = train_job.duration - train_s if train_s is not None else None
        train_to_score = first - train_job.ended if first is not None else None
    return RoundTimes(round_no, labeled, version, info["seen_at"] - posted, train_s,
                      None if first is None else last - first, to_train, train_extra, train_to_score,
                      None if last is None else info["seen_at"] - last, n_shards)


def part_rounds(stack: LocalStack, api: ApiClient, oracle: dict[str, str], classes: list[str],
                args: argparse.Namespace) -> tuple[list[RoundTimes], dict]:
    r = redis.Redis.from_url(stack.redis_url)
    name = f"bench-rounds-{uuid.uuid4().hex[:6]}"
    imported = create_http_project(api, name, classes=classes, query_size=10, stop=args.stop, dataset=DATASET)
    log.info("part 3: %s: pool %d, test %d", name, imported["pool"], imported["test"])
    labeled, posted = label_queries(api, name, oracle, 20)
    info = wait_for_live_model(api, name, n_labeled=labeled, after_version=0, timeout_s=args.round_timeout_s)
    rounds = [round_times(r, name, info, round_no=0, labeled=labeled, posted=posted)]
    log.info("part 3: first model v%d after %.2fs", info["model"]["version"], rounds[0].total)
    for round_no in range(1, args.rounds + 1):
        version = info["model"]["version"]
        labeled, posted = label_queries(api, name, oracle, 10)
        info = wait_for_live_model(api, name, n_labeled=labeled, after_version=version,
                                   timeout_s=args.round_timeout_s)
        rounds.append(round_times(r, name, info, round_no=round_no, labeled=labeled, posted=posted))
        log.info("part 3: round %d: v%d live %.2fs after the POST", round_no, info["model"]["version"],
                 rounds[-1].total)
    r.close()
    return rounds, imported


def print_rounds(rounds: list[RoundTimes], imported: dict, args: argparse.Namespace) -> None:
    print(f"\n[3] round turnaround through the local stack (API, 1 trainer, 2 scorers, 1 torch thread each): "
          f"{DATASET} pool {imported['pool']}, test {imported['test']}, margin, query_size 10, stop {args.stop}")
    print("    total = POST of the batch-completing label -> GET /projects shows live_ranking_version == model.version")
    print(f"    {'round':<7}{'labels':>7}{'v':>4}{'total s':>9}{'train':>8}{'score':>8}{'orch.':>8}"
          f"  | {'POST->train':>11}{'job-train':>10}{'train->scr':>11}{'scr->seen':>10}{'shards':>7}")
    for t in rounds:
        label = "0 (init)" if t.round == 0 else str(t.round)
        print(f"    {label:<7}{t.labels:>7}{t.version:>4}{fmt(t.total)}{fmt(t.train, '.2f', 8)}{fmt(t.score, '.2f', 8)}"
              f"{fmt(t.orchestration, '.2f', 8)}  | {fmt(t.to_train_start, '.3f', 11)}"
              f"{fmt(t.train_job_extra, '.3f', 10)}{fmt(t.train_to_score, '.3f', 11)}{fmt(t.score_to_seen, '.3f', 10)}"
              f"{t.shards:>7}")
    later = [t for t in rounds if t.round > 0]
    if later:
        def mean(get: Callable[[RoundTimes], float | None]) -> float | None:
            values = [v for v in (get(t) for t in later) if v is not None]
            return float(np.mean(values)) if values else None
        print(f"    {'mean 1+':<7}{'':>7}{'':>4}{fmt(mean(lambda t: t.total))}{fmt(mean(lambda t: t.train), '.2f', 8)}"
              f"{fmt(mean(lambda t: t.score), '.2f', 8)}{fmt(mean(lambda t: t.orchestration), '.2f', 8)}  | "
              f"{fmt(mean(lambda t: t.to_train_start), '.3f', 11)}{fmt(mean(lambda t: t.train_job_extra), '.3f', 10)}"
              f"{fmt(mean(lambda t: t.train_to_score), '.3f', 11)}{fmt(mean(lambda t: t.score_to_seen), '.3f', 10)}")
    print("    train = the curve point's train_s (decode + fit + test eval in the trainer); score = first score job "
          "start .. last end (rq timestamps);\n    orch. = the rest. Right of '|': POST->train job start, train job "
          "duration - train_s (checkpoint I/O, fan-out), train job end -> 1st score job start, last score job end "
          "-> seen live by the client (20 ms polling). Round 0 has cold worker caches.")


# --- main -----------------------------------------------------------------------------------------------


def main() -> None:
    defaults = Settings(_env_file=None)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller everything (pool 2000, fewer repeats and "
                                                             "rounds): about 2 minutes instead of 3")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run, e.g. 1,3")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for part 1 (both sides)")
    parser.add_argument("--batch-size", type=int, default=defaults.score_batch_size, help="score batch size")
    parser.add_argument("--shard-size", type=int, default=defaults.shard_size, help="pool samples per score job")
    parser.add_argument("--pool-limit", type=int, default=0, help="parts 1-2: score only this many pool images")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes in parts 1 and 2 (warm)")
    parser.add_argument("--no-warm", action="store_true", help="part 2: skip the warm long-lived workers")
    parser.add_argument("--profile", action="store_true", help="part 1: always profile a job-path pass")
    parser.add_argument("--profile-below", type=float, default=0.8,
                        help="part 1: profile when job path / bare is below this")
    parser.add_argument("--rounds", type=int, default=4, help="part 3: rounds after the first model")
    parser.add_argument("--stop", default="no_improvement", help="training stop rule of the HTTP projects")
    parser.add_argument("--round-timeout-s", type=float, default=300.0)
    parser.add_argument("--cache-dir", type=Path, help="keep the materialized dataset PNGs here between runs")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, store) and print its path")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.pool_limit = args.pool_limit or 2000
        if args.shard_size == defaults.shard_size:
            args.shard_size = args.pool_limit // 2  # still two shards, so that two workers can share them
        args.repeats = min(args.repeats, 2)
        args.rounds = min(args.rounds, 2)
        if args.stop == "no_improvement":
            args.stop = "epochs:3"
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    for noisy in ("rq", "alpipe", "services", "httpx"):
        logging.getLogger(noisy).setLevel(logging.INFO if args.verbose else logging.WARNING)

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="alpipe-bench-"))
    cache_dir = (args.cache_dir or tmp / "stack" / "datasets").resolve()
    printers: list[Callable[[], None]] = []
    try:
        # The PNGs are written once; the stack's API finds them in <its data dir>/datasets.
        materialize_builtin(DATASET, cache_dir)
        stack_datasets = tmp / "stack" / "datasets"
        if cache_dir != stack_datasets.resolve():
            stack_datasets.parent.mkdir(parents=True, exist_ok=True)
            stack_datasets.symlink_to(cache_dir, target_is_directory=True)
        print(f"alpipe services bench: {DATASET}, {MODEL}, cpu, {os.cpu_count()} cores, torch "
              f"{torch.__version__}, temp dir {tmp}", flush=True)
        if parts & {1, 2}:
            # Parts 1-2 use their own store and Redis: the stack's API recovers every project it finds in its
            # store at start-up, and its reconciler would then fan out scoring of these ones.
            with redis_server(tmp / "workers" / "redis") as url:
                r = redis.Redis.from_url(url)
                fx = build_fixture(r, url, tmp / "workers", cache_dir, pool_limit=args.pool_limit)
                log.info("parts 1-2: %s with %d pool images (%.0fs so far)", fx.project.name, len(fx.pool_ids),
                         time.perf_counter() - started)
                if 1 in parts:
                    res1 = part_throughput(fx, args)
                    print_throughput(res1, args)
                    printers.append(lambda: print_throughput(res1, args))
                if 2 in parts:
                    res2 = part_scaling(fx, args)
                    print_scaling(res2, len(fx.pool_ids), args)
                    printers.append(lambda: print_scaling(res2, len(fx.pool_ids), args))
                r.close()
        if 3 in parts:
            settings = Settings(_env_file=None, data_dir=tmp / "stack", redis_url="")
            extra = {"ALPIPE_SHARD_SIZE": str(args.shard_size), "ALPIPE_SCORE_BATCH_SIZE": str(args.batch_size),
                     "ALPIPE_DEVICE": "cpu", "ALPIPE_S3_ENDPOINT": "", "ALPIPE_TEST_SCORE_DELAY_S": "0",
                     "ALPIPE_TEST_TRAIN_EPOCH_DELAY_S": "0"}
            log.info("starting the local stack (%.0fs so far)", time.perf_counter() - started)
            with LocalStack(settings, scorers=2, echo=args.verbose, extra_env=extra) as stack:
                api = ApiClient(stack.api_url, timeout_s=120.0)
                try:
                    # Ingested here (untimed) into the stack's store; the API's imports then find it there.
                    manifest = load_dataset(DATASET, store=LocalStore(tmp / "stack" / "store"),
                                            cache_dir=tmp / "stack" / "datasets")
                    oracle = {s.id: s.label for s in manifest.samples if s.label is not None}
                    if 3 in parts:
                        res3, imported = part_rounds(stack, api, oracle, manifest.classes, args)
                        print_rounds(res3, imported, args)
                        printers.append(lambda: print_rounds(res3, imported, args))
                    stack.check_alive()
                finally:
                    api.close()
    finally:
        wrap_up(tmp, keep=args.keep)
    print_summary(printers, started)


def wrap_up(tmp: Path, *, keep: bool) -> None:
    """Remove the bench's temp dir, or say where it was kept."""
    if keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def print_summary(printers: list[Callable[[], None]], started: float) -> None:
    """Every part's table again at the end, so the figures stand together after the logs."""
    if len(printers) > 1:
        print(f"\n{'=' * 30} summary ({time.perf_counter() - started:.0f}s in all) {'=' * 30}")
        for show in printers:
            show()
    else:
        print(f"\n{time.perf_counter() - started:.0f}s in all")


if __name__ == "__main__":
    main()
