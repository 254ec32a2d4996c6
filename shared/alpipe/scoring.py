"""The scorer's core: score one shard of the pool with model vN and add it to ranking vN.

Collaborators (Redis, object store, model and tensor caches) come in as keyword arguments; the rq
job function in services/scorer/jobs.py builds them once per process.

Idempotent under at-least-once delivery: a shard already marked done is skipped; running a shard
again re-adds the same members with the same scores (inference is deterministic, the random
strategy is seeded by (project seed, version, shard)) and marks the same shard again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import numpy as np
import redis
import torch

from . import cold_start, embed_pass, keys
from .checkpoints import LoadedModel, model_from_checkpoint, read_checkpoint
from .config import Settings
from .embeddings import Backbone, EmbeddingCache, EmbedResult, backbone_identity, load_backbone
from .image_probe import image_kind
from .model_specs import model_spec, project_uses_embeddings
from .pipeline import embedding_pass_complete, finish_ranking, score_heartbeat
from .records import read_project
from .schemas import EmbedJob, Project, ScoreJob
from .state import ProjectState
from .storage import ObjectStore
from .strategies import Strategy, get_strategy
from .strategies.features import label_free_features
from .strategies.representative import lift_picks, picks_per_shard, shard_seed
from .strategies.typiclust import typiclust_order
from .tensor_cache import TensorCache
from .training import predict_mc_proba, predict_proba, round_seed
from .work import Heartbeat, worker_identity

log = logging.getLogger(__name__)


class ModelCache:
    """Models loaded in this process, keyed by (project, version); only the last few used are kept."""

    def __init__(self, *, device: torch.device, max_entries: int = 3):
        self.device = device
        self.max_entries = max(1, max_entries)
        self._models: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, store: ObjectStore, project: str, version: int) -> LoadedModel:
        key = (project, version)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            checkpoint = read_checkpoint(store, keys.checkpoint_key(project, version))
            loaded = model_from_checkpoint(checkpoint, project=project, device=self.device)
            self.loads += 1
            self._models[key] = loaded
            # Least recently used goes first: a scorer moves on to newer versions and rarely back.
            while len(self._models) > self.max_entries:
                self._models.popitem(last=False)
            return loaded


def strategy_scores(strategy: Strategy, probs: np.ndarray, *, seed: int, version: int, shard: int) -> np.ndarray:
    """The strategy's scores of a shard, with an rng fixed by (seed, version, shard) so reruns agree."""
    return np.asarray(strategy.score(probs, rng=np.random.default_rng([seed, version, shard])), dtype=np.float64)


def top_guesses(sample_ids: list[str], probs: np.ndarray) -> dict[str, tuple[int, float]]:
    """Each sample's most likely class index and its probability (ties to the lower index)."""
    if not sample_ids:
        return {}
    top = np.argmax(probs, axis=1)
    confidence = np.clip(probs[np.arange(len(sample_ids)), top], 0.0, 1.0)
    return {sid: (int(c), float(p)) for sid, c, p in zip(sample_ids, top, confidence, strict=True)}


def score_shard(job: ScoreJob, *, r: redis.Redis, store: ObjectStore, models: ModelCache, tensors: TensorCache,
                embeddings: EmbeddingCache, batch_size: int, heartbeat_ttl_s: float, job_id: str | None = None,
                delay_s: float = 0.0) -> dict:
    """Score job.sample_ids with model job.model_version, add them to its ranking, mark the shard done.

    delay_s (tests only) sleeps after the heartbeat is up and before anything is written, so a
    test can kill the worker mid-job.
    """
    state = ProjectState(r, job.project)
    version, shard = job.model_version, job.shard
    if shard in state.shards_done(version):
        return {"project": job.project, "version": version, "shard": shard, "skipped": "already done"}
    live = state.live_version()
    if live is not None and live > version:
        # A newer ranking is live and this one's keys were dropped: scoring it would only leave garbage.
        return {"project": job.project, "version": version, "shard": shard, "skipped": f"v{live} is live"}
    started = time.perf_counter()
    heartbeat = score_heartbeat(r, job.project, version, shard, ttl_s=heartbeat_ttl_s, job_id=job_id)
    with heartbeat:
        if delay_s > 0:
            log.info("%s v%d shard %d: test delay %.1fs", job.project, version, shard, delay_s)
            time.sleep(delay_s)
        project = read_project(store, job.project)
        strategy = get_strategy(project.strategy)
        ids = list(job.sample_ids)
        if strategy.needs_model:
            loaded = models.get(store, job.project, version)
            if loaded.backbone is not None:
                # Embedding mode: the head over stored embeddings, no backbone forward. An image the
                # embedding pass could not read has none and stays out of the ranking.
                inputs, ok, _ = embeddings.get_many(store, ids, backbone=loaded.backbone)
                if not ok.all():
                    log.warning("%s v%d shard %d: %d images have no embedding; left out", job.project, version,
                                shard, int((~ok).sum()))
                    ids, inputs = [sid for sid, good in zip(ids, ok, strict=True) if good], inputs[ok]
            else:
                inputs = tensors.get_many(store, ids, size=loaded.spec.input_size, channels=loaded.in_channels)
            if strategy.needs_mc:
                # The strategy scores the passes; the guess is their mean prediction.
                strategy_input = predict_mc_proba(loaded.model, inputs, spec=loaded.spec, device=models.device,
                                                  samples=project.mc_samples, batch_size=batch_size,
                                                  seed=project.seed * 1_000_003 + version * 1009 + shard)
                probs = strategy_input.mean(axis=0)
            else:
                probs = strategy_input = predict_proba(loaded.model, inputs, spec=loaded.spec, device=models.device,
                                                       batch_size=batch_size)
        else:
            probs = strategy_input = np.zeros((len(ids), len(project.classes)), dtype=np.float32)
        scores = (strategy_scores(strategy, strategy_input, seed=project.seed, version=version, shard=shard)
                  if ids else [])
        if strategy.representative_picks and len(ids):
            # The shard's share of the query, from its own most uncertain images (strategies.representative).
            scores = lift_picks(scores, inputs.numpy(), picks_per_shard(project.query_size, job.n_shards),
                                seed=shard_seed(round_seed(project.seed, version), shard))
        guesses = top_guesses(ids, probs) if strategy.needs_model else None
        state.add_scores(version, {sid: float(s) for sid, s in zip(ids, scores, strict=True)}, guesses=guesses)
        made_live = state.shard_done(version, shard, job.n_shards)
    if made_live:
        finish_ranking(r, job.project, version)
        log.info("%s: ranking v%d is live", job.project, version)
    seconds = time.perf_counter() - started
    log.info("%s v%d shard %d/%d: %d samples in %.2fs", job.project, version, shard + 1, job.n_shards,
             len(ids), seconds)
    return {"project": job.project, "version": version, "shard": shard, "scored": len(ids),
            "made_live": made_live, "seconds": round(seconds, 3)}


def _embed_claimed(r: redis.Redis, store: ObjectStore, ids: list[str], *, embeddings: EmbeddingCache,
                   backbone: Backbone, owner: str, ttl_s: float, poll_s: float = 0.2) -> EmbedResult:
    """Embeddings of ids, each computed by one scorer however many passes (projects) contain it.

    This scorer computes (or reads) the images it claims; for those claimed by another it waits
    until their embeddings are stored, or their claim lapses (that scorer died) and it claims them.
    """
    bid = backbone.identity.id
    total = EmbedResult()
    pending = list(ids)
    while pending:
        mine, holders = embed_pass.claim_images(r, bid, pending, owner=owner, ttl_s=ttl_s)
        if mine:
            _, _, result = embeddings.get_many(store, mine, backbone=backbone)
            total.computed += result.computed
            total.stored += result.stored
            total.found += result.found
            total.failed.update(result.failed)
            if result.failed:
                embed_pass.mark_failed_claims(r, bid, result.failed, ttl_s=ttl_s)
        for sid, holder in holders.items():
            if holder.startswith("failed "):
                total.failed[sid] = holder.removeprefix("failed ")
        waiting = [sid for sid in holders if sid not in total.failed]
        if not waiting:
            break
        _, ok, _ = embeddings.get_many(store, waiting, backbone=backbone.identity)
        total.found += int(ok.sum())
        pending = [sid for sid, good in zip(waiting, ok, strict=True) if not good]
        if pending:
            time.sleep(poll_s)
    return total


def embed_shard(job: EmbedJob, *, r: redis.Redis, store: ObjectStore, embeddings: EmbeddingCache,
                device: torch.device, settings: Settings, job_id: str | None = None) -> dict:
    """Embed one shard of a project's embedding pass (alpipe.embed_pass), mark it done.

    Safe to repeat: embeddings already stored are read instead of computed, each is written with
    put_if_absent, and the shard's counts are added once. An image that cannot be decoded is
    reported (in the pass's `failed` and the log) and skipped. settings.test_score_delay_s (tests
    only) sleeps between batches, so a test can kill the worker mid-shard.
    """
    name, shard = job.project, job.shard
    if embed_pass.shard_is_done(r, name, shard):
        return {"project": name, "shard": shard, "skipped": "already done"}
    project = read_project(store, name)
    if not project_uses_embeddings(project):
        return {"project": name, "shard": shard, "skipped": "not in embedding mode"}
    started = time.perf_counter()
    heartbeat = Heartbeat(r, keys.embed_heartbeat_key(name, shard), settings.heartbeat_ttl_s,
                          value=worker_identity(job_id))
    with heartbeat:
        backbone = load_backbone(project.model, input_size=project.input_size, device=device,
                                 batch_size=settings.embed_batch_size)
        embed_pass.shard_started(r, name, backbone.identity.id)
        handled, embedded, computed, failed = 0, 0, 0, {}
        # Progress is written every few batches; within a step, decoding overlaps the backbone.
        step = backbone.batch_size * 4
        for start in range(0, len(job.sample_ids), step):
            if settings.test_score_delay_s > 0:
                time.sleep(settings.test_score_delay_s)
            chunk = job.sample_ids[start:start + step]
            result = _embed_claimed(r, store, chunk, embeddings=embeddings, backbone=backbone,
                                    owner=heartbeat.value, ttl_s=4 * settings.heartbeat_ttl_s)
            handled += len(chunk)
            embedded += len(chunk) - len(result.failed)
            computed += result.computed
            failed.update(result.failed)
            embed_pass.shard_progress(r, name, shard, handled=handled, computed=result.computed, stored=result.stored,
                                      failed=result.failed)
        completed = embed_pass.shard_done(r, name, shard, embedded=embedded, failed=len(failed))
    seconds = time.perf_counter() - started
    log.info("%s: embedding shard %d: %d images (%d computed, %d failed) in %.2fs by %s", name, shard,
             len(job.sample_ids), computed, len(failed), seconds, backbone.identity.id)
    out = {"project": name, "shard": shard, "embedded": embedded, "computed": computed, "failed": len(failed),
           "seconds": round(seconds, 3), "completed_pass": completed}
    if completed:
        log.info("%s: embedding pass complete", name)
        out.update(embedding_pass_complete(r, store, project, settings=settings))
    return out


def order_cold_start(project: Project, *, r: redis.Redis, store: ObjectStore, tensors: TensorCache,
                     embeddings: EmbeddingCache) -> dict:
    """The cold-start job (alpipe.cold_start): TypiClust's picks over the pool's label-free features,
    moved to the top of ranking v0."""
    state = ProjectState(r, project.name)
    if state.live_version() not in (None, 0) or state.model_version() > 0:
        return {"project": project.name, "skipped": "a model exists"}
    started = time.perf_counter()
    covered, unlabeled, total = cold_start.pool_for_order(state, seed=project.seed)
    ids = covered + unlabeled
    inputs, ok = _label_free_inputs(project, ids, store=store, tensors=tensors, embeddings=embeddings)
    is_covered = np.flatnonzero(ok) < len(covered)
    ids = [sid for sid, good in zip(ids, ok, strict=True) if good]
    picks = typiclust_order(label_free_features(inputs, seed=project.seed), cold_start.COLD_START_PICKS,
                            first=project.query_size, labeled=is_covered, seed=project.seed)
    order = [ids[i] for i in picks]
    state.promote_cold_start(order, pool_total=total)
    seconds = time.perf_counter() - started
    log.info("%s: cold-start order: %d TypiClust picks over %d images in %.2fs", project.name, len(order),
             len(ids), seconds)
    return {"project": project.name, "picks": len(order), "images": len(ids), "seconds": round(seconds, 3)}


def _label_free_inputs(project: Project, ids: list[str], *, store: ObjectStore, tensors: TensorCache,
                       embeddings: EmbeddingCache) -> tuple[np.ndarray, np.ndarray]:
    """(what the features are made of, usable mask): the pass's embeddings in embedding mode, else pixels
    at no more than cold_start.THUMBNAIL_SIZE."""
    if project_uses_embeddings(project):
        identity = backbone_identity(project.model, input_size=project.input_size)
        vectors, ok, _ = embeddings.get_many(store, ids, backbone=identity)
        return vectors[torch.from_numpy(ok)].float().numpy(), ok
    spec = model_spec(project.model, project.input_size)
    # The first images' headers decide the channels: clustering needs no exact answer, and reading every
    # image's header (trainer_core.dataset_channels) would fetch the whole pool twice.
    channels = 3 if spec.rgb or not image_kind(store, ids)[0] else 1
    pixels = tensors.get_many(store, ids, size=min(spec.input_size, cold_start.THUMBNAIL_SIZE), channels=channels)
    return pixels.numpy(), np.ones(len(ids), dtype=bool)
