"""A project's cold start in the services: a TypiClust order at the top of ranking v0.

Until the first model's ranking is live, labelers lease from the cold-start ranking (version 0),
which starts as a seeded random order so labeling can begin the moment images arrive. A scorer
then runs one `coldstart-{p}-n{N}` job: label-free features of the pool (pixels reduced with PCA,
or the embedding pass's embeddings), and TypiClust's picks in stages (typiclust_order), which are
moved to the top of ranking v0 in that order. Samples labeled or leased by then count as labeled
(their clusters are covered) and keep their places.

Queued when images are imported, when an embedding pass completes, and by the reconciler whenever
there is no order yet or the pool has grown 10% since (uploads, a Redis rebuilt by recovery), while
v0 is served.
Strategies whose cold start is random (the `random` baseline, or a project's cold_start: random)
keep the random order.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import redis

from . import embed_pass, keys
from .config import Settings
from .model_specs import AUTO, model_spec, project_uses_embeddings
from .schemas import Project
from .state import ProjectState
from .storage import ObjectStore
from .strategies import get_strategy
from .work import enqueue_job, job_states

log = logging.getLogger(__name__)

# How many samples get a TypiClust place: enough for a team's first rounds before a model's ranking
# is live (twenty labelers taking ten each); beyond it, the random order continues.
COLD_START_PICKS = 300
# Features are computed for at most this many pool images (a seeded random subset): k-means and
# neighbours stay within seconds, and typical samples of big clusters are found in a subset too.
MAX_FEATURE_POOL = 20_000
# The order is recomputed when the pool has grown by this factor since (uploads arrive one by one).
REORDER_GROWTH = 1.1
# Pixels are clustered at no more than this size (a 224-px RGB image is 150k numbers; 32 px keeps the layout).
THUMBNAIL_SIZE = 32


def uses_typiclust(project: Project) -> bool:
    return (project.cold_start or get_strategy(project.strategy).cold_start) == "typiclust"


def _ordered_key(project: str) -> str:
    return keys.redis_key(project, "cold_start_n")


def _pool_total(state: ProjectState) -> int:
    counts = state.counts()
    return counts["pool"] + counts["labeled"]


def job_id(project: str, pool_total: int) -> str:
    return f"coldstart-{project}-n{pool_total}"


def maybe_enqueue(r: redis.Redis, project: Project, *, settings: Settings) -> str | None:
    """Queue the cold-start job when v0 is served and its order is older than the pool; its id, or None."""
    if project.model == AUTO or not uses_typiclust(project):
        return None  # no images yet, or nothing to order
    state = ProjectState(r, project.name)
    if state.live_version() not in (None, 0) or not embed_pass.is_complete(r, project):
        return None
    total = _pool_total(state)
    done = r.get(_ordered_key(project.name))
    if total == 0 or (done is not None and total < int(done) * REORDER_GROWTH):
        return None
    jid = job_id(project.name, total)
    [(status, _)] = job_states(r, [jid])
    if status in ("queued", "started", "deferred", "scheduled", "finished"):
        return None
    enqueue_job(r, "score", "services.scorer.jobs.cold_start", {"project": project.name, "pool_total": total},
                jid, settings=settings, description=f"{project.name}: cold-start order over {total} images")
    return jid


def status(r: redis.Redis, project: Project) -> str:
    """'random' (the strategy's own), 'pending' (the TypiClust order is not there yet) or 'typiclust'."""
    if not uses_typiclust(project):
        return "random"
    return "typiclust" if r.exists(_ordered_key(project.name)) else "pending"


def order_pool(project: Project, *, r: redis.Redis, store: ObjectStore, tensors, embeddings) -> dict:
    """The job's work: TypiClust picks over the pool, moved to the top of ranking v0 (see the module doc).

    tensors and embeddings are the scorer's caches (TensorCache, EmbeddingCache).
    """
    from .strategies.features import label_free_features
    from .strategies.typiclust import typiclust_order

    state = ProjectState(r, project.name)
    if state.live_version() not in (None, 0):
        return {"project": project.name, "skipped": "a model's ranking is live"}
    started = time.perf_counter()
    total = _pool_total(state)
    # Labeled and leased samples (about to be labeled) cover their clusters; the picks are among the rest.
    leased = state.leased_ids()
    unlabeled = sorted(set(state.pool_ids()) - set(leased))
    labeled = leased + sorted(sid for sid, split in zip(*_pool_labels(state), strict=True) if split == "pool")
    rng = np.random.default_rng([project.seed, 7])
    if len(unlabeled) > MAX_FEATURE_POOL:
        unlabeled = sorted(rng.choice(unlabeled, size=MAX_FEATURE_POOL, replace=False).tolist())
    labeled = labeled[:MAX_FEATURE_POOL]
    ids = labeled + unlabeled
    inputs, ok = _inputs(project, ids, store=store, tensors=tensors, embeddings=embeddings)
    is_labeled = np.flatnonzero(ok) < len(labeled)
    ids = [sid for sid, good in zip(ids, ok, strict=True) if good]
    features = label_free_features(inputs, seed=project.seed)
    picks = typiclust_order(features, COLD_START_PICKS, first=project.query_size, labeled=is_labeled,
                            seed=project.seed)
    order = [ids[i] for i in picks]
    state.promote_cold_start(order)
    r.set(_ordered_key(project.name), total)
    seconds = time.perf_counter() - started
    log.info("%s: cold-start order: %d TypiClust picks over %d images in %.2fs", project.name, len(order),
             len(ids), seconds)
    return {"project": project.name, "picks": len(order), "images": len(ids), "seconds": round(seconds, 3)}


def _pool_labels(state: ProjectState) -> tuple[list[str], list[str | None]]:
    labeled = list(state.labels())
    return labeled, state.sample_splits(labeled)


def _inputs(project: Project, ids: list[str], *, store: ObjectStore, tensors,
            embeddings) -> tuple[np.ndarray, np.ndarray]:
    """(features' raw material, usable mask): the pass's embeddings in embedding mode, else small pixels."""
    if project_uses_embeddings(project):
        from .embeddings import backbone_identity

        identity = backbone_identity(project.model, input_size=project.input_size)
        vectors, ok, _ = embeddings.get_many(store, ids, backbone=identity)
        return vectors[ok].float().numpy(), ok
    from .trainer_core import dataset_channels

    spec = model_spec(project.model, project.input_size)
    channels = 3 if spec.rgb else dataset_channels(store, ids)
    pixels = tensors.get_many(store, ids, size=min(spec.input_size, THUMBNAIL_SIZE), channels=channels)
    return pixels.numpy(), np.ones(len(ids), dtype=bool)
