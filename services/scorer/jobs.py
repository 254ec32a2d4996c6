"""rq job functions of the scorer (score shards, embedding shards, cold-start orders): parse the payload, call the core.

Enqueued by dotted path (`services.scorer.jobs.score_shard`), so the API never imports this module.
The process keeps its models and decoded images from one job to the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from rq import get_current_job

from alpipe import scoring
from alpipe.config import Settings, get_settings
from alpipe.embeddings import EmbeddingCache
from alpipe.errors import UserError
from alpipe.labelstudio import sync as labelstudio_sync
from alpipe.records import read_project
from alpipe.schemas import EmbedJob, ScoreJob
from alpipe.storage import ObjectStore, open_store
from alpipe.tensor_cache import TensorCache
from alpipe.training import resolve_device


@dataclass
class ScorerContext:
    """What a scorer process keeps between jobs: clients, loaded models and the decoded-image cache."""

    settings: Settings
    redis: redis.Redis
    store: ObjectStore
    models: scoring.ModelCache
    tensors: TensorCache
    embeddings: EmbeddingCache


_context: ScorerContext | None = None


def configure(settings: Settings, *, redis_client: redis.Redis | None = None,
              store: ObjectStore | None = None) -> ScorerContext:
    """Build this process's context (the worker calls it once at start; tests call it directly)."""
    global _context
    if redis_client is None:
        if not settings.redis_url:
            raise UserError("set REDIS_URL (or ALPIPE_REDIS_URL) to the Redis the scorer takes jobs from")
        redis_client = redis.Redis.from_url(settings.redis_url)
    _context = ScorerContext(settings=settings, redis=redis_client, store=store or open_store(settings),
                             models=scoring.ModelCache(device=resolve_device(settings.device)),
                             tensors=TensorCache.from_megabytes(settings.tensor_cache_mb),
                             embeddings=EmbeddingCache(settings.embedding_cache_mb * 1024 * 1024))
    return _context


def context() -> ScorerContext:
    return _context if _context is not None else configure(get_settings())


def score_shard(payload: dict) -> dict:
    """rq job: score one shard of a model version's ranking."""
    job = ScoreJob.model_validate(payload)
    ctx = context()
    current = get_current_job()
    result = scoring.score_shard(job, r=ctx.redis, store=ctx.store, models=ctx.models, tensors=ctx.tensors,
                                 embeddings=ctx.embeddings, batch_size=ctx.settings.score_batch_size,
                                 heartbeat_ttl_s=ctx.settings.heartbeat_ttl_s,
                                 job_id=current.id if current is not None else None,
                                 delay_s=ctx.settings.test_score_delay_s)
    if result["made_live"]:
        labelstudio_sync.enqueue_push(ctx.store, ctx.redis, job.project, settings=ctx.settings)
    return result


def embed_shard(payload: dict) -> dict:
    """rq job: embed one shard of a project's embedding pass."""
    job = EmbedJob.model_validate(payload)
    ctx = context()
    current = get_current_job()
    return scoring.embed_shard(job, r=ctx.redis, store=ctx.store, embeddings=ctx.embeddings, device=ctx.models.device,
                               settings=ctx.settings, job_id=current.id if current is not None else None)


def cold_start(payload: dict) -> dict:
    """rq job: move TypiClust's picks to the top of a project's cold-start ranking."""
    ctx = context()
    project = read_project(ctx.store, payload["project"])
    result = scoring.order_cold_start(project, r=ctx.redis, store=ctx.store, tensors=ctx.tensors,
                                      embeddings=ctx.embeddings)
    labelstudio_sync.enqueue_push(ctx.store, ctx.redis, project.name, settings=ctx.settings)
    return result


def labelstudio_ingest(payload: dict) -> dict:
    """rq job: ingest a Label Studio project's tasks, secure its webhook, push predictions."""
    ctx = context()
    return labelstudio_sync.sync_project(payload["project"], r=ctx.redis, store=ctx.store, settings=ctx.settings)


def labelstudio_push(payload: dict) -> dict:
    """rq job: push the live ranking's predictions to the Label Studio project."""
    ctx = context()
    return labelstudio_sync.push_predictions(payload["project"], r=ctx.redis, store=ctx.store,
                                                  settings=ctx.settings)
