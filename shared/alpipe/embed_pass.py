"""The embedding pass of a project: every image through the frozen backbone once, as sharded rq jobs.

Imported by the API, so nothing here imports torch; the scorer's side is alpipe.scoring.embed_shard.

How it runs
- Samples added to a project in embedding mode join the pass's `pending` set (`add_samples`).
  `flush` cuts pending into shards of embed_shard_size, atomically (a Lua SPOP), so every image
  lands in exactly one shard; each shard is planned in Redis and queued as one job on the `score`
  queue, job id `embed-{p}-s{shard}` (`-a{attempt}` for a retry). Imports flush at once; single
  uploads flush when a shard is full, and the reconciler flushes the rest every pass.
- A scorer keeps a heartbeat key alive while it embeds a shard, writes each embedding with
  put_if_absent (so an image is stored once however often its shard runs), reports progress, and
  marks the shard done in one atomic step that also adds its counts (so a shard counts once).
- `reconcile` re-sends shards that are neither done, queued nor covered by a live heartbeat, as
  the scoring reconciler does, and gives up after max_job_attempts.
- Until the pass is complete the project trains nothing (pipeline.train_due) and serves its
  cold-start order; the job that completes the pass queues the training that is due.

After a Redis wipe, recovery re-adds every sample: the shards then find the embeddings in
object storage and complete without a backbone forward.
"""

from __future__ import annotations

import json
import logging
import time

import redis

from . import keys
from .config import Settings
from .model_specs import embed_input_size, project_uses_embeddings
from .schemas import EmbeddingProgress, EmbedJob, Project
from .state import in_chunks
from .work import enqueue_job, unattended_shards

log = logging.getLogger(__name__)


# Pops up to ARGV[1] pending ids into a new shard; restarts the speed clock when the pass had ended.
# KEYS: pending, meta, plan, jobs, done. ARGV: shard size, job id prefix, now. Returns {shard, n} or nil.
_FLUSH_LUA = """
local ids = redis.call('SPOP', KEYS[1], tonumber(ARGV[1]))
if #ids == 0 then return nil end
table.sort(ids)
local before = tonumber(redis.call('HGET', KEYS[2], 'shards') or '0')
if redis.call('SCARD', KEYS[5]) >= before then
  redis.call('HDEL', KEYS[2], 'started_at', 'finished_at')
  local done = tonumber(redis.call('HGET', KEYS[2], 'done') or '0')
  redis.call('HSET', KEYS[2], 'base', done + tonumber(redis.call('HGET', KEYS[2], 'failed') or '0'))
end
local shard = redis.call('HINCRBY', KEYS[2], 'shards', 1) - 1
redis.call('HSET', KEYS[3], shard, cjson.encode(ids))
redis.call('HSET', KEYS[4], shard, ARGV[2] .. shard, shard .. ':attempts', 1, shard .. ':planned_at', ARGV[3])
return {shard, #ids}
"""

# Marks a shard done and adds its counts, once. KEYS: done, meta, progress, pending.
# ARGV: shard, embedded, failed, now. Returns -1 (already done), 0, or 1 (this completed the pass).
_DONE_LUA = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return -1 end
redis.call('HINCRBY', KEYS[2], 'done', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'failed', ARGV[3])
redis.call('HDEL', KEYS[3], ARGV[1])
local shards = tonumber(redis.call('HGET', KEYS[2], 'shards') or '0')
if redis.call('SCARD', KEYS[1]) >= shards and redis.call('SCARD', KEYS[4]) == 0 then
  redis.call('HSET', KEYS[2], 'finished_at', ARGV[4])
  return 1
end
return 0
"""


def _key(project: str, part: str) -> str:
    return keys.embed_key(project, part)


def planned_backbone(project: Project) -> str:
    """What the API can say about the backbone before a scorer has digested its weights."""
    return f"{project.model}@{embed_input_size(project.model, project.input_size)}"


def add_samples(r: redis.Redis, project: Project, sample_ids: list[str], *, settings: Settings,
                flush_now: bool = True) -> int:
    """Put new samples of an embedding-mode project into its pass; with flush_now, queue their shards.

    Without flush_now (single uploads) only full shards are queued; the reconciler queues the rest.
    Returns the number of shards queued.
    """
    if not sample_ids or not project_uses_embeddings(project):
        return 0
    added = 0
    for chunk in in_chunks(sample_ids):
        added += int(r.sadd(_key(project.name, "pending"), *chunk))
    pipe = r.pipeline()
    pipe.hincrby(_key(project.name, "meta"), "total", added)
    pipe.hsetnx(_key(project.name, "meta"), "planned", planned_backbone(project))
    pipe.execute()
    if flush_now or r.scard(_key(project.name, "pending")) >= settings.embed_shard_size:
        return flush(r, project, settings=settings, partial=flush_now)
    return 0


def flush(r: redis.Redis, project: Project, *, settings: Settings, partial: bool = True) -> int:
    """Cut pending samples into shards and queue one job each; partial=False keeps a last short shard back."""
    name = project.name
    size = max(1, settings.embed_shard_size)
    queued = 0
    while partial or r.scard(_key(name, "pending")) >= size:
        planned = r.eval(_FLUSH_LUA, 5, _key(name, "pending"), _key(name, "meta"), _key(name, "plan"),
                         _key(name, "jobs"), _key(name, "done"), size, f"embed-{name}-s", time.time())
        if not planned:
            break
        shard = int(planned[0])
        _enqueue(r, project, shard, attempt=1, settings=settings)
        queued += 1
    return queued


def _job_id(project: str, shard: int, attempt: int) -> str:
    base = f"embed-{project}-s{shard}"
    return base if attempt <= 1 else f"{base}-a{attempt}"


def _enqueue(r: redis.Redis, project: Project, shard: int, *, attempt: int, settings: Settings) -> None:
    raw = r.hget(_key(project.name, "plan"), shard)
    if raw is None:
        raise RuntimeError(f"{project.name}: embedding shard {shard} has no plan")
    payload = EmbedJob(project=project.name, backbone=planned_backbone(project), shard=shard,
                       sample_ids=json.loads(raw)).model_dump(mode="json")
    enqueue_job(r, keys.QUEUE_SCORE, keys.JOB_EMBED_SHARD, payload, _job_id(project.name, shard, attempt),
                settings=settings,
                description=f"embed {project.name} shard {shard}" + (f" (attempt {attempt})" if attempt > 1 else ""))


def is_complete(r: redis.Redis, project: Project) -> bool:
    """True when every image added so far has been through the pass (or failed); always True outside
    embedding mode."""
    if not project_uses_embeddings(project):
        return True
    name = project.name
    pipe = r.pipeline()
    pipe.hget(_key(name, "meta"), "shards")
    pipe.scard(_key(name, "done"))
    pipe.scard(_key(name, "pending"))
    shards, done, pending = pipe.execute()
    return shards is not None and pending == 0 and done >= int(shards)


# --- the scorer's side: progress and completion ---------------------------------------------------------


def shard_is_done(r: redis.Redis, project: str, shard: int) -> bool:
    return bool(r.sismember(_key(project, "done"), shard))


def shard_started(r: redis.Redis, project: str, backbone_id: str) -> None:
    """A scorer began a shard: start the speed clock (once per run of the pass) and name the backbone."""
    pipe = r.pipeline()
    pipe.hsetnx(_key(project, "meta"), "started_at", time.time())
    pipe.hset(_key(project, "meta"), "backbone", backbone_id)
    pipe.execute()


def shard_progress(r: redis.Redis, project: str, shard: int, *, handled: int, computed: int, stored: int,
                   failed: dict[str, str]) -> None:
    """Images of a running shard handled so far (overwritten, so a retried shard does not count twice);
    `computed`: images this scorer just ran through the backbone; `stored`: embeddings it wrote (over
    all attempts, each image once)."""
    pipe = r.pipeline()
    pipe.hset(_key(project, "progress"), shard, handled)
    if computed:
        pipe.hincrby(_key(project, "meta"), "computed", computed)
    if stored:
        pipe.hincrby(_key(project, "meta"), "stored", stored)
    if failed:
        pipe.hset(_key(project, "failed"), mapping=failed)
    pipe.execute()


def shard_done(r: redis.Redis, project: str, shard: int, *, embedded: int, failed: int) -> bool:
    """Mark a shard done (counting it once); True when this completed the pass."""
    return int(r.eval(_DONE_LUA, 4, _key(project, "done"), _key(project, "meta"), _key(project, "progress"),
                      _key(project, "pending"), shard, embedded, failed, time.time())) == 1


def claim_images(r: redis.Redis, backbone_id: str, sample_ids: list[str], *, owner: str,
                 ttl_s: float) -> tuple[list[str], dict[str, str]]:
    """Claim the computing of these images' embeddings: (ids claimed now, {id: holder} of the rest).

    A claim lapses after ttl_s, so the images of a scorer that died are claimed by the next one to ask.
    """
    pipe = r.pipeline(transaction=False)
    for sid in sample_ids:
        pipe.set(keys.embed_claim_key(backbone_id, sid), owner, nx=True, px=max(1, int(ttl_s * 1000)))
    taken = pipe.execute()
    others = [sid for sid, ok in zip(sample_ids, taken, strict=True) if not ok]
    holders = r.mget([keys.embed_claim_key(backbone_id, sid) for sid in others]) if others else []
    return ([sid for sid, ok in zip(sample_ids, taken, strict=True) if ok],
            {sid: (h or b"").decode() for sid, h in zip(others, holders, strict=True)})


def mark_failed_claims(r: redis.Redis, backbone_id: str, failed: dict[str, str], *, ttl_s: float) -> None:
    """Tell scorers waiting on these images that they cannot be decoded (so they stop waiting)."""
    pipe = r.pipeline(transaction=False)
    for sid, why in failed.items():
        pipe.set(keys.embed_claim_key(backbone_id, sid), f"failed {why}", px=max(1, int(ttl_s * 1000)))
    pipe.execute()


def failures(r: redis.Redis, project: str) -> dict[str, str]:
    """Images the pass could not embed, with why."""
    return {k.decode(): v.decode() for k, v in r.hgetall(_key(project, "failed")).items()}


def computed(r: redis.Redis, project: str) -> int:
    """Images this project's pass ran through the backbone (0 when every embedding was stored already)."""
    return int(r.hget(_key(project, "meta"), "computed") or 0)


def stored(r: redis.Redis, project: str) -> int:
    """Embeddings this project's pass wrote to object storage (each image at most once)."""
    return int(r.hget(_key(project, "meta"), "stored") or 0)


def progress(r: redis.Redis, project: Project, *, now: float | None = None) -> EmbeddingProgress | None:
    """The pass's progress for GET /projects/{p} and /metrics; None outside embedding mode."""
    if not project_uses_embeddings(project):
        return None
    now = time.time() if now is None else now
    name = project.name
    pipe = r.pipeline()
    pipe.hgetall(_key(name, "meta"))
    pipe.hvals(_key(name, "progress"))
    meta_raw, running = pipe.execute()
    meta = {k.decode(): v.decode() for k, v in meta_raw.items()}
    total, done, failed = (int(meta.get(k, 0)) for k in ("total", "done", "failed"))
    in_flight = sum(int(v) for v in running)
    complete = is_complete(r, project)
    handled = min(total, done + failed + in_flight)
    rate = eta = None
    started = float(meta["started_at"]) if "started_at" in meta else None
    if started is not None:
        elapsed = (float(meta["finished_at"]) if "finished_at" in meta else now) - started
        this_run = handled - int(meta.get("base", 0))
        if elapsed > 0 and this_run > 0:
            rate = round(this_run / elapsed, 1)
            eta = 0.0 if complete else round((total - handled) / rate, 1)
    return EmbeddingProgress(backbone=meta.get("backbone") or meta.get("planned") or planned_backbone(project),
                             total=total, done=min(done + in_flight, total), failed=failed, images_per_s=rate,
                             eta_s=eta, complete=complete)


# --- the reconciler -------------------------------------------------------------------------------------


def reconcile(r: redis.Redis, project: Project, *, settings: Settings, now: float) -> dict[str, list[int]]:
    """Queue pending samples, and re-send shards nobody is doing; {"queued": n, "resubmitted": [...], ...}."""
    report: dict[str, list[int]] = {"resubmitted": [], "gave_up": []}
    if not project_uses_embeddings(project):
        return report
    name = project.name
    if r.scard(_key(name, "pending")):
        flush(r, project, settings=settings)
    shards = int(r.hget(_key(name, "meta"), "shards") or 0)
    done = {int(s) for s in r.smembers(_key(name, "done"))}
    missing = [i for i in range(shards) if i not in done]
    if not missing:
        return report
    jobs_key = _key(name, "jobs")
    for lost in unattended_shards(r, missing, jobs_key=jobs_key, now=now, grace_s=settings.heartbeat_ttl_s,
                                  heartbeat_key=lambda i: keys.embed_heartbeat_key(name, i)):
        i, job_id, attempt, status = lost.shard, lost.job_id, lost.attempts, lost.status
        if shard_is_done(r, name, i):
            continue
        if attempt >= settings.max_job_attempts:
            # Its images count as failed, so the pass (and training, which waits for it) can finish.
            report["gave_up"].append(i)
            sample_ids = json.loads(r.hget(_key(name, "plan"), i) or "[]")
            why = f"its shard failed {attempt} times (last job {job_id}); see the scorer's log"
            if sample_ids:
                r.hset(_key(name, "failed"), mapping=dict.fromkeys(sample_ids, why))
            shard_done(r, name, i, embedded=0, failed=len(sample_ids))
            log.error("%s: embedding shard %d: %d attempts failed or died; its %d images are skipped",
                      name, i, attempt, len(sample_ids))
            continue
        attempt = int(r.hincrby(jobs_key, f"{i}:attempts", 1))
        r.hset(jobs_key, str(i), _job_id(name, i, attempt))
        _enqueue(r, project, i, attempt=attempt, settings=settings)
        log.warning("%s: embedding shard %d: job %s was %s with no heartbeat; re-sent", name, i, job_id,
                    status or "missing")
        report["resubmitted"].append(i)
    return report
