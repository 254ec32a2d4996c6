"""rq job functions of the trainer: parse the payload, call the core with this process's collaborators.

Enqueued by dotted path (`services.trainer.jobs.train`), so the API never imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
import torch
from rq import get_current_job

from alpipe import trainer_core
from alpipe.config import Settings, get_settings
from alpipe.embeddings import EmbeddingCache
from alpipe.errors import UserError
from alpipe.schemas import TrainJob
from alpipe.storage import ObjectStore, open_store
from alpipe.tensor_cache import TensorCache
from alpipe.training import resolve_device


@dataclass
class TrainerContext:
    """What a trainer process keeps between jobs: clients, the device and the decoded-image cache."""

    settings: Settings
    redis: redis.Redis
    store: ObjectStore
    tensors: TensorCache
    device: torch.device
    embeddings: EmbeddingCache


_context: TrainerContext | None = None


def configure(settings: Settings, *, redis_client: redis.Redis | None = None,
              store: ObjectStore | None = None) -> TrainerContext:
    """Build this process's context (the worker calls it once at start; tests call it directly)."""
    global _context
    if redis_client is None:
        if not settings.redis_url:
            raise UserError("set REDIS_URL (or ALPIPE_REDIS_URL) to the Redis the trainer takes jobs from")
        redis_client = redis.Redis.from_url(settings.redis_url)
    _context = TrainerContext(settings=settings, redis=redis_client, store=store or open_store(settings),
                              tensors=TensorCache.from_megabytes(settings.tensor_cache_mb),
                              device=resolve_device(settings.device),
                              embeddings=EmbeddingCache(settings.embedding_cache_mb * 1024 * 1024))
    return _context


def context() -> TrainerContext:
    return _context if _context is not None else configure(get_settings())


def train(payload: dict) -> dict:
    """rq job: one training round of payload's project (a no-op when nothing new is due)."""
    job = TrainJob.model_validate(payload)
    ctx = context()
    current = get_current_job()
    return trainer_core.train_project(job.project, r=ctx.redis, store=ctx.store, tensors=ctx.tensors,
                                      device=ctx.device, settings=ctx.settings, embeddings=ctx.embeddings,
                                      job_id=current.id if current is not None else None)
