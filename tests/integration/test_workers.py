"""Trainer and scorer workers against a real redis-server and real object stores.

Worker processes are the real thing (`python -m alpipe.cli worker trainer|scorer`); crash tests
kill them with SIGKILL mid-job and check that the reconciler (run here in a loop, as the API does)
finishes their work. The data is 150 generated 28x28 grayscale images of three classes (a bright
block top-left, top-right or at the bottom), so small_cnn learns them in two short epochs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from PIL import Image
from rq import Queue, SimpleWorker, Worker
from rq.registry import FinishedJobRegistry

from alpipe import keys, pipeline, trainer_core
from alpipe.checkpoints import read_checkpoint
from alpipe.config import Settings
from alpipe.projects import request_training
from alpipe.records import ModelPointer, read_pointer, stored_versions
from alpipe.schemas import CurvePointOut, Project, TrainOptions
from alpipe.state import ProjectState
from alpipe.storage import LocalStore, ObjectStore, S3Store
from alpipe.tensor_cache import TensorCache
from alpipe.training import torch_threads
from tests.helpers import die_with_parent, stop_process

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["left", "right", "bottom"]
N_POOL, N_TEST = 120, 30
HEARTBEAT_TTL_S = 2.0
RECONCILE_INTERVAL_S = 0.5
SHARD_SIZE = 40


# --- data and project set-up (directly through the store and ProjectState) -------------------------


def _image(cls: int, rng: np.random.Generator) -> bytes:
    pixels = rng.integers(0, 40, (28, 28)).astype(np.uint8)
    value = int(rng.integers(170, 256))
    dy, dx = (int(v) for v in rng.integers(-2, 3, 2))
    if cls == 0:
        pixels[3 + dy:14 + dy, 3 + dx:14 + dx] = value
    elif cls == 1:
        pixels[3 + dy:14 + dy, 14 + dx:25 + dx] = value
    else:
        pixels[16 + dy:25 + dy, 5 + dx:23 + dx] = value
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Setup:
    project: Project
    state: ProjectState
    truth: dict[str, str]  # every sample's true class (the simulated oracle)


def make_project(store: ObjectStore, r: redis.Redis, *, name: str = "shapes", query_size: int = 10,
                 strategy: str = "margin") -> Setup:
    rng = np.random.default_rng(7)
    truth: dict[str, str] = {}
    records: list[tuple[str, str, str | None]] = []
    lines = []
    for i in range(N_POOL + N_TEST):
        data = _image(i % 3, rng)
        sample_id = hashlib.sha256(data).hexdigest()
        store.put_if_absent(keys.image_key(sample_id), data)
        split = "test" if i >= N_POOL else "pool"
        truth[sample_id] = CLASSES[i % 3]
        records.append((sample_id, split, CLASSES[i % 3]))
        lines.append(json.dumps({"id": sample_id, "name": f"{CLASSES[i % 3]}/{i}.png",
                                 "label": CLASSES[i % 3], "split": split}))
    project = Project(name=name, classes=CLASSES, strategy=strategy, query_size=query_size, model="small_cnn",
                      pretrained=False, training=TrainOptions(stop="epochs:2"), seed=0, created_at=time.time())
    store.put_bytes(keys.project_key(name), project.model_dump_json().encode())
    store.put_bytes(keys.sample_batch_key(name, "0000", "setup"), "\n".join(lines).encode())
    state = ProjectState(r, name)
    state.register(project.model_dump_json())
    state.add_samples(records)
    state.count_applied()  # as the API does: one durable batch applied
    return Setup(project, state, truth)


def give_labels(store: ObjectStore, setup: Setup, n: int, *, batch: str) -> list[str]:
    """Label the first n unlabeled pool samples: the label log object first, then Redis."""
    ids = setup.state.pool_ids()[:n]
    records = [{"sample_id": s, "label": setup.truth[s], "labeler": "oracle", "at": time.time(), "batch": batch}
               for s in ids]
    body = "\n".join(json.dumps(rec) for rec in records).encode()
    store.put_bytes(keys.label_log_key(setup.project.name, f"{time.time_ns()}", batch), body)
    setup.state.apply_labels(records)
    setup.state.count_applied()  # as the API does: one durable batch applied
    return ids


# --- settings, worker processes, polling ----------------------------------------------------------


def store_settings(store: ObjectStore, s3_server=None) -> dict:
    if isinstance(store, S3Store):
        return {"s3_endpoint": s3_server.endpoint, "s3_access_key": s3_server.access_key,
                "s3_secret_key": s3_server.secret_key, "s3_bucket": store.bucket, "s3_region": s3_server.region}
    assert isinstance(store, LocalStore)
    return {"data_dir": str(store.root.parent)}  # open_store() uses <data_dir>/store


def make_settings(redis_url: str, store_fields: dict, **extra) -> Settings:
    fields = {"redis_url": redis_url, "shard_size": SHARD_SIZE, "heartbeat_ttl_s": HEARTBEAT_TTL_S,
              "reconcile_interval_s": RECONCILE_INTERVAL_S, "device": "cpu", "torch_threads": 1,
              "tensor_cache_mb": 64, "job_timeout_s": 300, **store_fields, **extra}
    return Settings(**fields)


class Workers:
    """Worker subprocesses of one test; all are stopped at the end of the test."""

    def __init__(self, tmp_path: Path, base_env: dict[str, str]):
        self.tmp_path = tmp_path
        self.base_env = base_env
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[int, Path] = {}

    def start(self, kind: str, name: str, **env_extra: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALPIPE_") and k != "REDIS_URL"}
        env.update(self.base_env)
        env.update(env_extra)
        log = self.tmp_path / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "alpipe.cli", "worker", kind, "--name", name],
                                    cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    def log_text(self, proc: subprocess.Popen) -> str:
        return self.logs[proc.pid].read_text(errors="replace")

    def all_logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}" for p in self.logs.values())

    def stop_all(self) -> None:
        # SIGTERM all first (a warm shutdown each), then wait: the workers wind down in parallel.
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            stop_process(proc)


def env_for(settings: Settings) -> dict[str, str]:
    env = {}
    for field in ("redis_url", "shard_size", "heartbeat_ttl_s", "reconcile_interval_s", "device", "torch_threads",
                  "tensor_cache_mb", "job_timeout_s", "data_dir", "s3_endpoint", "s3_access_key", "s3_secret_key",
                  "s3_bucket", "s3_region"):
        env[f"ALPIPE_{field.upper()}"] = str(getattr(settings, field))
    return env


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[[Settings], Workers]]:
    made: list[Workers] = []

    def factory(settings: Settings) -> Workers:
        w = Workers(tmp_path, env_for(settings))
        made.append(w)
        return w

    yield factory
    for w in made:
        w.stop_all()


def wait_for(check: Callable[[], bool], *, timeout: float, what: str, every: float = 0.1,
             on_tick: Callable[[], None] | None = None, logs: Callable[[], str] | None = None) -> float:
    """Poll check() until true; returns the seconds it took. on_tick runs between polls (the reconciler)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f}s" + (f"\n{logs()}" if logs else ""))
        if on_tick is not None:
            on_tick()
        time.sleep(every)
    return time.monotonic() - started


def one_torch_thread() -> AbstractContextManager:
    """Like a worker with ALPIPE_TORCH_THREADS=1: on a busy 2-core box more threads only contend."""
    return torch_threads(1)


def in_process_trainer_round(store: ObjectStore, r: redis.Redis, settings: Settings, project: str) -> dict:
    with one_torch_thread():
        return trainer_core.train_project(project, r=r, store=store, tensors=TensorCache(64 * 2**20),
                                          device=torch.device("cpu"), settings=settings)


def run_burst(r: redis.Redis, queue_name: str) -> None:
    """Drain a queue with an in-process SimpleWorker; rq's signal handlers are put back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with one_torch_thread():
            SimpleWorker([Queue(queue_name, connection=r)], connection=r).work(burst=True)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def assert_checkpoints_sound(store: ObjectStore, project: str) -> list[int]:
    """Every checkpoint object loads and names its own version; the pointer names a stored one."""
    versions = stored_versions(store, project)
    for v in versions:
        checkpoint = read_checkpoint(store, keys.checkpoint_key(project, v))
        assert checkpoint["model_version"] == v
        assert checkpoint["classes"] == CLASSES and checkpoint["in_channels"] == 1
    pointer = read_pointer(store, project)
    if pointer is not None:
        assert pointer.version in versions
        assert pointer.key == keys.checkpoint_key(project, pointer.version)
    assert versions == sorted(set(versions))
    return versions


def ranking(r: redis.Redis, state: ProjectState, version: int) -> list[tuple[bytes, float]]:
    return r.zrange(state.ranking_key(version), 0, -1, withscores=True)


# --- tests ----------------------------------------------------------------------------------------------


def test_round_with_real_workers_s3(redis_url, redis_client, s3_store, s3_server, workers):
    """labels -> train job -> v1 checkpoint, metrics, pointer -> score jobs on 2 scorers -> ranking v1 live."""
    r = redis_client
    settings = make_settings(redis_url, store_settings(s3_store, s3_server))
    setup = make_project(s3_store, r)
    name = setup.project.name
    give_labels(s3_store, setup, 20, batch="b1")
    pool_after_labels = set(setup.state.pool_ids())
    job_id = pipeline.maybe_enqueue_train(r, setup.project, settings=settings)
    assert job_id == f"train-{name}-n20"
    assert pipeline.maybe_enqueue_train(r, setup.project, settings=settings) is None  # coalesced

    w = workers(settings)
    w.start("trainer", "trainer-1")
    w.start("scorer", "scorer-1")
    w.start("scorer", "scorer-2")
    wait_for(lambda: setup.state.live_version() == 1, timeout=60, what="ranking v1 live", logs=w.all_logs)

    assert assert_checkpoints_sound(s3_store, name) == [1]
    assert read_pointer(s3_store, name) == ModelPointer(version=1, n_labeled=20, key=keys.checkpoint_key(name, 1))
    metrics = CurvePointOut.model_validate(s3_store.get_json(keys.model_metrics_key(name, 1)))
    assert metrics.model_version == 1 and metrics.n_labeled == 20
    assert metrics.test_accuracy is not None and 0.0 <= metrics.test_accuracy <= 1.0
    assert setup.state.model_version() == 1 and setup.state.model_labels() == 20

    n_shards = -(-len(pool_after_labels) // SHARD_SIZE)
    assert setup.state.n_shards(1) == n_shards == 3
    assert setup.state.shards_done(1) == set(range(n_shards))
    scored = ranking(r, setup.state, 1)
    assert len(scored) == len(pool_after_labels)
    assert {m.decode() for m, _ in scored} == pool_after_labels
    assert all(0.0 <= s <= 1.0 for _, s in scored)  # margin scores
    assert len(FinishedJobRegistry(keys.QUEUE_SCORE, connection=r)) == n_shards  # each shard ran once
    curve = setup.state.curve()
    assert [(p["model_version"], p["n_labeled"]) for p in curve] == [(1, 20)]
    assert not r.exists(keys.train_lock_key(name))
    assert setup.state.queued_train_job() is None
    # Nothing left for the reconciler.
    report = pipeline.reconcile(r, s3_store, settings)
    assert not any(report.values()), report


def test_label_bursts_coalesce_and_last_model_sees_every_label(redis_url, redis_client, local_store, workers):
    r = redis_client
    settings = make_settings(redis_url, store_settings(local_store))
    setup = make_project(local_store, r)
    name = setup.project.name
    w = workers(settings)
    trainer = w.start("trainer", "trainer-1", ALPIPE_TEST_TRAIN_EPOCH_DELAY_S="0.4")
    wait_for(lambda: any(x.name == "trainer-1" for x in Worker.all(connection=r)), timeout=30,
             what="the trainer worker", logs=w.all_logs)
    train_queue = Queue(keys.QUEUE_TRAIN, connection=r)
    enqueued = []
    max_waiting = 0
    batches = 8
    for b in range(batches):  # every batch alone makes a round due (query_size labels)
        give_labels(local_store, setup, setup.project.query_size, batch=f"b{b}")
        job_id = pipeline.maybe_enqueue_train(r, setup.project, settings=settings)
        if job_id:
            enqueued.append(job_id)
        max_waiting = max(max_waiting, train_queue.count)
        time.sleep(0.3)
    total = batches * setup.project.query_size

    def settled() -> bool:
        nonlocal max_waiting
        max_waiting = max(max_waiting, train_queue.count)
        return (setup.state.model_labels() == total and train_queue.count == 0
                and not r.exists(keys.train_lock_key(name)))

    wait_for(settled, timeout=60, what=f"a model on all {total} labels", logs=lambda: w.log_text(trainer))
    assert max_waiting <= 1
    versions = assert_checkpoints_sound(local_store, name)
    assert len(versions) < batches  # rounds took several batches each
    pointer = read_pointer(local_store, name)
    assert pointer.version == versions[-1] and pointer.n_labeled == total
    last = read_checkpoint(local_store, pointer.key)
    assert last["config"]["n_labeled"] == total
    # The loop's shape too (test_simulate_cli): how it trained, on how many labels, seed, source; no optimizer.
    assert set(last["config"]) == {"train", "n_labeled", "seed", "source"} and last["config"]["source"] == name
    assert "optimizer" not in last
    curve = setup.state.curve()
    assert [p["model_version"] for p in curve] == versions
    labeled = [p["n_labeled"] for p in curve]
    assert labeled == sorted(labeled) and labeled[-1] == total


def test_scorer_killed_mid_shard_is_replaced(redis_url, redis_client, local_store, workers):
    r = redis_client
    settings = make_settings(redis_url, store_settings(local_store))
    setup = make_project(local_store, r)
    name = setup.project.name
    give_labels(local_store, setup, 20, batch="b1")
    assert in_process_trainer_round(local_store, r, settings, name)["version"] == 1
    pool = set(setup.state.pool_ids())
    n_shards = setup.state.n_shards(1)

    w = workers(settings)
    slow = w.start("scorer", "scorer-slow", ALPIPE_TEST_SCORE_DELAY_S="60")

    def slow_heartbeat() -> str | None:
        for key in r.scan_iter(match=keys.score_heartbeat_key(name, 1, 0).rsplit(":", 1)[0] + ":*"):
            value = r.get(key)
            if value is not None and f":{slow.pid}:" in value.decode():
                return key.decode()
        return None

    wait_for(lambda: slow_heartbeat() is not None, timeout=30, what="the slow scorer's heartbeat",
             logs=w.all_logs)
    held = slow_heartbeat()
    shard = int(held.rsplit(":", 1)[1])
    w.start("scorer", "scorer-2")
    wait_for(lambda: setup.state.shards_done(1) == set(range(n_shards)) - {shard}, timeout=30,
             what="the other shards", logs=w.all_logs)
    assert r.exists(held), "heartbeat live when the scorer is killed"
    os.killpg(slow.pid, signal.SIGKILL)
    slow.wait(timeout=10)
    killed_at = time.monotonic()

    reports = []
    last = [0.0]

    def reconcile_tick() -> None:
        if time.monotonic() - last[0] >= settings.reconcile_interval_s:
            last[0] = time.monotonic()
            reports.append(pipeline.reconcile(r, local_store, settings))

    wait_for(lambda: setup.state.live_version() == 1, timeout=40, what="ranking v1 after the kill",
             on_tick=reconcile_tick, logs=w.all_logs)
    recovered_s = time.monotonic() - killed_at
    # Bound: the heartbeat lapses within its TTL, the next reconcile pass re-sends the shard, and the
    # idle surviving scorer scores it at once (slack for a busy test machine).
    assert recovered_s < HEARTBEAT_TTL_S + RECONCILE_INTERVAL_S + 8
    assert any(rep["resubmitted"].get(name) == [shard] for rep in reports), reports
    assert setup.state.shards_done(1) == set(range(n_shards))
    scored = ranking(r, setup.state, 1)
    assert len(scored) == len(pool) and {m.decode() for m, _ in scored} == pool


@pytest.mark.parametrize("second_batch", [10, 4], ids=["full-batch", "forced-partial-batch"])
def test_trainer_killed_mid_fit_leaves_no_partial_model(redis_url, redis_client, local_store, workers,
                                                        second_batch):
    """A full batch queues itself; a partial one (4 < query_size 10) is queued by POST /train.

    Either way the reconciler replaces the killed trainer's round.
    """
    r = redis_client
    settings = make_settings(redis_url, store_settings(local_store))
    setup = make_project(local_store, r)
    name = setup.project.name
    give_labels(local_store, setup, 20, batch="b1")
    assert in_process_trainer_round(local_store, r, settings, name)["version"] == 1
    pointer_v1 = read_pointer(local_store, name)
    give_labels(local_store, setup, second_batch, batch="b2")
    total = 20 + second_batch
    if second_batch < setup.project.query_size:
        assert pipeline.maybe_enqueue_train(r, setup.project, settings=settings) is None  # not due on its own
        requested = request_training(r, setup.project, settings=settings)
        assert requested.job_id == f"train-{name}-n{total}" and requested.model_labels == 20
    else:
        assert pipeline.maybe_enqueue_train(r, setup.project, settings=settings) == f"train-{name}-n{total}"

    w = workers(settings)
    slow = w.start("trainer", "trainer-slow", ALPIPE_TEST_TRAIN_EPOCH_DELAY_S="60")
    wait_for(lambda: "epoch 1 loss" in w.log_text(slow), timeout=40, what="the slow trainer inside fit",
             logs=w.all_logs)
    # The replacement starts while the slow one holds the job, so it is idle when the kill comes.
    w.start("trainer", "trainer-2")
    wait_for(lambda: any(x.name == "trainer-2" for x in Worker.all(connection=r)), timeout=30,
             what="the second trainer", logs=w.all_logs)
    assert r.exists(keys.train_lock_key(name))
    os.killpg(slow.pid, signal.SIGKILL)
    slow.wait(timeout=10)
    killed_at = time.monotonic()

    assert assert_checkpoints_sound(local_store, name) == [1]
    assert read_pointer(local_store, name) == pointer_v1
    assert setup.state.model_version() == 1

    reports = []
    last = [0.0]

    def reconcile_tick() -> None:
        if time.monotonic() - last[0] >= settings.reconcile_interval_s:
            last[0] = time.monotonic()
            reports.append(pipeline.reconcile(r, local_store, settings))
        # The pointer names v1 until the replacement publishes its complete v2; it never names the
        # killed round. (The replacement writes the pointer just before it moves Redis's version, so
        # a v2 pointer beside version 1 in Redis is the publish in progress, not a partial model.)
        pointer = read_pointer(local_store, name)
        if pointer != pointer_v1:
            assert pointer.version == 2 and pointer.n_labeled == total, pointer
            assert assert_checkpoints_sound(local_store, name) == [1, 2]

    wait_for(lambda: setup.state.model_version() == 2, timeout=45, what="v2 after the kill",
             on_tick=reconcile_tick, logs=w.all_logs)
    # Bound: lock TTL + one reconcile pass + one training round of the idle replacement.
    assert time.monotonic() - killed_at < HEARTBEAT_TTL_S + RECONCILE_INTERVAL_S + 20
    assert any(name in rep["train"] for rep in reports), reports
    assert assert_checkpoints_sound(local_store, name) == [1, 2]
    pointer = read_pointer(local_store, name)
    assert pointer.version == 2 and pointer.n_labeled == total
    assert [p["model_version"] for p in setup.state.curve()] == [1, 2]
    # The model answered the request: nothing is due any more.
    assert not setup.state.train_marks().forced_pending
    assert not pipeline.train_due(setup.state, setup.project)


def test_jobs_run_twice_change_nothing(redis_url, redis_client, local_store):
    from services.scorer import jobs as scorer_jobs
    from services.trainer import jobs as trainer_jobs

    r = redis_client
    settings = make_settings(redis_url, store_settings(local_store))
    scorer_jobs.configure(settings, redis_client=r, store=local_store)
    trainer_jobs.configure(settings, redis_client=r, store=local_store)
    setup = make_project(local_store, r, strategy="random")  # random needs the seeded rng to agree too
    name = setup.project.name
    give_labels(local_store, setup, 20, batch="b1")
    pipeline.maybe_enqueue_train(r, setup.project, settings=settings)
    run_burst(r, keys.QUEUE_TRAIN)
    run_burst(r, keys.QUEUE_SCORE)
    assert setup.state.live_version() == 1
    first = ranking(r, setup.state, 1)
    assert len(first) == len(setup.state.pool_ids())

    assert not r.exists(keys.shard_plan_key(name, 1))  # the plan is dropped once the ranking is live

    # The same score job again (a redelivery): it sees its shard done and changes nothing.
    payload = Queue(keys.QUEUE_SCORE, connection=r).fetch_job(f"score-{name}-v1-s0").args[0]
    pipeline.enqueue_job(r, keys.QUEUE_SCORE, keys.JOB_SCORE_SHARD, payload, f"score-{name}-v1-s0",
                      settings=settings, description="again")
    run_burst(r, keys.QUEUE_SCORE)
    assert ranking(r, setup.state, 1) == first

    # A redelivery after scores were written but before the shard was marked done: same scores again.
    r.srem(setup.state.key("ranking", 1, "done"), 0)
    pipeline.enqueue_job(r, keys.QUEUE_SCORE, keys.JOB_SCORE_SHARD, payload, f"score-{name}-v1-s0",
                      settings=settings, description="again")
    run_burst(r, keys.QUEUE_SCORE)
    assert ranking(r, setup.state, 1) == first
    assert setup.state.shards_done(1) == set(range(setup.state.n_shards(1)))

    # A train job with nothing due is a no-op: no checkpoint, no pointer move, no new scoring.
    assert pipeline.maybe_enqueue_train(r, setup.project, settings=settings) is None
    pipeline.enqueue_job(r, keys.QUEUE_TRAIN, keys.JOB_TRAIN, {"project": name, "requested_at": time.time()},
                      f"train-{name}-manual", settings=settings, description="nothing due")
    run_burst(r, keys.QUEUE_TRAIN)
    result = Queue(keys.QUEUE_TRAIN, connection=r).fetch_job(f"train-{name}-manual").return_value()
    assert result["trained"] is False
    assert stored_versions(local_store, name) == [1]
    assert setup.state.model_version() == 1 and Queue(keys.QUEUE_SCORE, connection=r).count == 0


def test_reconcile_resends_lost_work_and_gives_up_on_poison(redis_url, redis_client, local_store):
    """No workers at all: the reconciler's decisions on jobs that are missing, dead, failed or alive."""
    from rq.job import Job

    from services.trainer import jobs as trainer_jobs

    r = redis_client
    settings = make_settings(redis_url, store_settings(local_store), max_job_attempts=3)
    trainer_jobs.configure(settings, redis_client=r, store=local_store)
    setup = make_project(local_store, r)
    name, state = setup.project.name, setup.state
    give_labels(local_store, setup, 20, batch="b1")
    # A model whose pointer moved but whose trainer died before fanning out (no checkpoint needed:
    # no scorer runs here).
    state.set_model(1, 20, CurvePointOut(model_version=1, n_labeled=20, test_accuracy=0.5).model_dump_json())
    report = pipeline.reconcile(r, local_store, settings)
    assert report["fanned_out"] == {name: 1} and report["train"] == {}
    score_queue = Queue(keys.QUEUE_SCORE, connection=r)
    assert state.n_shards(1) == 3 and score_queue.count == 3
    assert not any(pipeline.reconcile(r, local_store, settings).values())  # queued jobs are left alone

    # A shard whose job vanished is re-sent, with the same samples, under a new attempt id; not in
    # the first heartbeat TTL after the fan-out though, while the fan-out may still be enqueueing.
    first = Job.fetch(f"score-{name}-v1-s1", connection=r)
    samples = first.args[0]["sample_ids"]
    first.delete()
    assert pipeline.reconcile(r, local_store, settings)["resubmitted"] == {}
    r.hset(keys.shard_jobs_key(name, 1), "planned_at", time.time() - HEARTBEAT_TTL_S)
    assert pipeline.reconcile(r, local_store, settings)["resubmitted"] == {name: [1]}
    again = Job.fetch(f"score-{name}-v1-s1-a2", connection=r)
    assert again.args[0]["sample_ids"] == samples and again.get_status() == "queued"

    # A worker killed mid-job leaves its job "started": resent once its heartbeat is gone and the
    # start is older than the heartbeat TTL; left alone while the start is recent.
    job = Job.fetch(f"score-{name}-v1-s2", connection=r)
    score_queue.remove(job)
    for started, expect in (("2020-01-01T00:00:00.000000Z", {name: [2]}), (None, {})):
        if started is None:
            job = Job.fetch(f"score-{name}-v1-s2-a2", connection=r)
            score_queue.remove(job)
            started = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        r.hset(Job.key_for(job.id), mapping={"status": "started", "started_at": started})
        assert pipeline.reconcile(r, local_store, settings)["resubmitted"] == expect

    # Lost again and again: after max_job_attempts the shard is reported, not retried forever.
    Job.fetch(f"score-{name}-v1-s1-a2", connection=r).delete()
    assert pipeline.reconcile(r, local_store, settings)["resubmitted"] == {name: [1]}
    Job.fetch(f"score-{name}-v1-s1-a3", connection=r).delete()
    report = pipeline.reconcile(r, local_store, settings)
    assert report["resubmitted"] == {} and report["gave_up"] == {name: [1]}

    # A due train whose queued job failed: the slot is freed and a new job queued.
    give_labels(local_store, setup, 10, batch="b2")
    assert state.claim_train_slot("train-bogus", 600)
    pipeline.enqueue_job(r, keys.QUEUE_TRAIN, keys.JOB_TRAIN, {"project": "no-such", "requested_at": 0.0},
                         "train-bogus", settings=settings, description="fails")
    assert pipeline.reconcile(r, local_store, settings)["train"] == {}  # queued: it will run
    run_burst(r, keys.QUEUE_TRAIN)
    assert Job.fetch("train-bogus", connection=r).get_status() == "failed"
    assert pipeline.reconcile(r, local_store, settings)["train"] == {name: f"train-{name}-n30"}
    assert state.queued_train_job() == f"train-{name}-n30"
    # ...but never while a trainer holds the project's lock (its heartbeat).
    state.release_train_slot()
    r.set(keys.train_lock_key(name), "someone", px=5000)
    assert pipeline.reconcile(r, local_store, settings)["train"] == {}

    # An empty pool: no shards, and the (empty) ranking of the version is live at once.
    give_labels(local_store, setup, N_POOL, batch="all")
    state.set_model(2, N_POOL, CurvePointOut(model_version=2, n_labeled=N_POOL, test_accuracy=None).model_dump_json())
    assert pipeline.enqueue_scoring(r, local_store, setup.project, 2, settings=settings) == 0
    assert state.live_version() == 2 and state.n_shards(2) == 0


def test_fan_out_of_a_pool_subsample_is_seeded_and_planned_once(redis_url, redis_client, local_store):
    r = redis_client
    settings = make_settings(redis_url, store_settings(local_store))
    setup = make_project(local_store, r)
    project = setup.project.model_copy(update={"pool_size": 50})
    pool = set(setup.state.pool_ids())

    def planned(version: int) -> list[str]:
        plan = r.hgetall(keys.shard_plan_key(project.name, version))
        return [sid for shard in sorted(plan, key=int) for sid in json.loads(plan[shard])]

    assert pipeline.enqueue_scoring(r, local_store, project, 1, settings=settings) == 2  # 40 + 10
    first = planned(1)
    assert len(first) == len(set(first)) == 50 and set(first) <= pool
    give_labels(local_store, setup, 30, batch="b1")  # the pool changes; v1's plan does not
    assert pipeline.enqueue_scoring(r, local_store, project, 1, settings=settings) == 2
    assert planned(1) == first and Queue(keys.QUEUE_SCORE, connection=r).count == 2
    pipeline.enqueue_scoring(r, local_store, project, 2, settings=settings)
    assert set(planned(2)) <= set(setup.state.pool_ids()) and set(planned(2)) != set(first)
    assert len(planned(2)) == 50
    replan = pipeline._plan_shards(setup.state, project, 2, SHARD_SIZE)  # seeded by (project seed, version)
    assert [sid for shard in replan for sid in shard] == planned(2)
