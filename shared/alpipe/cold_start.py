"""A project's cold start in the services: a TypiClust order at the top of ranking v0 (torch-free:
the API queues the job; the scorer's side is alpipe.scoring.order_cold_start).

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

import numpy as np
import redis

from . import embed_pass, keys
from .config import Settings
from .model_specs import AUTO
from .schemas import Project
from .state import ProjectState
from .strategies import cold_start_for
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
    return cold_start_for(project.strategy, project.cold_start) == "typiclust"


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
    if state.live_version() not in (None, 0) or state.model_version() > 0 or not embed_pass.is_complete(r, project):
        return None  # a model (or its ranking) exists: the cold start is over
    total = _pool_total(state)
    done = state.cold_start_ordered()
    if total == 0 or (done is not None and total < done * REORDER_GROWTH):
        return None
    jid = job_id(project.name, total)
    [(status, _)] = job_states(r, [jid])
    # A failed job is not retried for the same pool (the random order stays; its error is in the scorer's
    # log and rq's failed registry): a poison pool must not be re-queued every reconciler pass.
    if status is not None:
        return None
    enqueue_job(r, keys.QUEUE_SCORE, keys.JOB_COLD_START, {"project": project.name, "pool_total": total},
                jid, settings=settings, description=f"{project.name}: cold-start order over {total} images")
    return state.cold_start_job(jid)


def status(r: redis.Redis, project: Project) -> str:
    """'random' (the strategy's own), 'typiclust' (an order is there), 'failed' (the job queued for it failed)
    or 'pending' (it is being made, or waits for images or the embedding pass)."""
    if not uses_typiclust(project):
        return "random"
    state = ProjectState(r, project.name)
    if state.cold_start_ordered() is not None:
        return "typiclust"
    [(job_status, _)] = job_states(r, [state.cold_start_job()])
    return "failed" if job_status == "failed" else "pending"


def pool_for_order(state: ProjectState, *, seed: int) -> tuple[list[str], list[str], int]:
    """(labeled-like ids, unlabeled ids, pool total) for an order: labeled and leased samples (about to be
    labeled) cover their clusters; the picks are among the rest, a seeded subset of MAX_FEATURE_POOL at most."""
    total = _pool_total(state)
    leased = state.leased_ids()
    unlabeled = sorted(set(state.pool_ids()) - set(leased))
    labeled = state.labels()
    splits = state.sample_splits(list(labeled))
    covered = leased + sorted(sid for sid, split in zip(labeled, splits, strict=True) if split == "pool")
    if len(unlabeled) > MAX_FEATURE_POOL:
        rng = np.random.default_rng([seed, 7])
        unlabeled = sorted(rng.choice(unlabeled, size=MAX_FEATURE_POOL, replace=False).tolist())
    return covered[:MAX_FEATURE_POOL], unlabeled, total
