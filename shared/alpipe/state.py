"""A project's live state in Redis: pool, labels, leases, rankings, model pointer, counters.

Everything here can be rebuilt from object storage (see recovery): Redis holds what makes the
loop fast, object storage holds what makes it correct. Keys come from keys.redis_key, so all of
one project's keys share a Redis Cluster hash slot and the Lua scripts below stay legal there.
"""

from __future__ import annotations

import json
import time

import redis

from .keys import redis_key, shard_jobs_key, shard_plan_key

PROJECTS_KEY = "alpipe:projects"

# Leases the top n available samples of a ranking in one atomic step, so two labelers never
# get the same sample. Falls back to random pool members when the ranking runs dry (a pool_size
# subsample covers only part of the pool). Returns a flat list: id, score, id, score, ...
_LEASE_LUA = """
local n = tonumber(ARGV[1]); local now = tonumber(ARGV[2]); local expiry = tonumber(ARGV[3])
local owner = ARGV[4]; local page = tonumber(ARGV[5])
local out = {}; local taken = {}
local function try(id, score)
  if taken[id] then return end
  if redis.call('SISMEMBER', KEYS[2], id) == 0 then return end
  local exp = redis.call('ZSCORE', KEYS[3], id)
  if exp and tonumber(exp) > now then return end
  redis.call('ZADD', KEYS[3], expiry, id)
  redis.call('HSET', KEYS[4], id, owner)
  taken[id] = true
  table.insert(out, id); table.insert(out, score)
end
local start = 0
while #out < 2 * n do
  local page_ids = redis.call('ZREVRANGE', KEYS[1], start, start + page - 1, 'WITHSCORES')
  if #page_ids == 0 then break end
  for i = 1, #page_ids, 2 do
    try(page_ids[i], page_ids[i + 1])
    if #out >= 2 * n then break end
  end
  start = start + page
end
if #out < 2 * n then
  for _, id in ipairs(redis.call('SRANDMEMBER', KEYS[2], 4 * n + 64)) do
    try(id, '')
    if #out >= 2 * n then break end
  end
end
return out
"""

# Marks one shard of a ranking done; when it is the last one, makes that ranking live unless a
# newer one already is. Returns 1 when this call made the ranking live.
_SHARD_DONE_LUA = """
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then return 0 end
local live = tonumber(redis.call('GET', KEYS[2]) or '-1')
if tonumber(ARGV[3]) <= live then return 0 end
redis.call('SET', KEYS[2], ARGV[3])
return 1
"""


# Deletes a key only while it holds the caller's value (a slot or lock someone else took is kept).
_DELETE_IF_EQUAL_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ProjectState:
    """Redis operations of one project; every method is safe to repeat."""

    def __init__(self, r: redis.Redis, project: str):
        self.r = r
        self.project = project
        self._lease = r.register_script(_LEASE_LUA)
        self._shard_done = r.register_script(_SHARD_DONE_LUA)
        self._release_if = r.register_script(_DELETE_IF_EQUAL_LUA)

    def key(self, *parts: object) -> str:
        return redis_key(self.project, *parts)

    # --- project and samples ----------------------------------------------------------------------

    def register(self, project_json: str) -> None:
        pipe = self.r.pipeline()
        pipe.set(self.key("meta"), project_json)
        pipe.sadd(PROJECTS_KEY, self.project)
        pipe.execute()

    def exists(self) -> bool:
        return bool(self.r.exists(self.key("meta")))

    def meta(self) -> str | None:
        value = self.r.get(self.key("meta"))
        return value.decode() if value is not None else None

    def add_samples(self, records: list[tuple[str, str, str | None]]) -> int:
        """Add (sample_id, split, known_label) records; pool samples join the unlabeled pool.

        Returns how many were new. Known labels of test samples are kept for evaluation; those
        of pool samples are never shown to the trainer (only labels posted by labelers are).
        """
        if not records:
            return 0
        pipe = self.r.pipeline()
        for sample_id, split, _ in records:
            pipe.hsetnx(self.key("samples"), sample_id, split)
        created = pipe.execute()
        pipe = self.r.pipeline()
        labeled = self.r.hmget(self.key("labels"), [sid for sid, _, _ in records])
        for (sample_id, split, known), new, already in zip(records, created, labeled, strict=True):
            if not new:
                continue
            if split == "test":
                if known is not None:
                    pipe.hset(self.key("test_labels"), sample_id, known)
            elif already is None:
                pipe.sadd(self.key("pool"), sample_id)
        pipe.execute()
        return sum(bool(c) for c in created)

    def sample_split(self, sample_id: str) -> str | None:
        value = self.r.hget(self.key("samples"), sample_id)
        return value.decode() if value is not None else None

    def sample_splits(self, sample_ids: list[str]) -> list[str | None]:
        """Split of each sample ('pool' or 'test'), None where the project does not have it."""
        if not sample_ids:
            return []
        return [v.decode() if v is not None else None for v in self.r.hmget(self.key("samples"), sample_ids)]

    def test_labels(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.r.hgetall(self.key("test_labels")).items()}

    def pool_ids(self) -> list[str]:
        """Unlabeled pool samples, sorted (deterministic shards)."""
        return sorted(m.decode() for m in self.r.smembers(self.key("pool")))

    def counts(self) -> dict[str, int]:
        pipe = self.r.pipeline()
        pipe.scard(self.key("pool"))
        pipe.hlen(self.key("labels"))
        pipe.hlen(self.key("test_labels"))
        pipe.zcount(self.key("leases"), time.time(), "+inf")
        pool, labeled, test, leased = pipe.execute()
        return {"pool": pool, "labeled": labeled, "test": test, "leased": leased}

    # --- leases and labels -------------------------------------------------------------------------

    def lease(self, n: int, *, token: str, labeler: str, ttl_s: float, now: float | None = None,
              page: int = 256) -> list[tuple[str, float | None]]:
        """Lease up to n samples from the top of the live ranking: [(sample_id, score or None)]."""
        now = time.time() if now is None else now
        live = self.live_version()
        ranking = self.key("ranking", live if live is not None else "none")
        flat = self._lease(keys=[ranking, self.key("pool"), self.key("leases"), self.key("lease_owner")],
                           args=[n, now, now + ttl_s, f"{token} {labeler}", page])
        return [(flat[i].decode(), float(flat[i + 1]) if flat[i + 1] else None) for i in range(0, len(flat), 2)]

    def lease_holder(self, sample_id: str, now: float | None = None) -> tuple[str, str] | None:
        """(token, labeler) of a live lease on the sample, None when it is not leased."""
        now = time.time() if now is None else now
        expiry = self.r.zscore(self.key("leases"), sample_id)
        if expiry is None or expiry <= now:
            return None
        owner = self.r.hget(self.key("lease_owner"), sample_id)
        if owner is None:
            return None
        token, _, labeler = owner.decode().partition(" ")
        return token, labeler

    def lease_holders(self, sample_ids: list[str], now: float | None = None) -> list[tuple[str, str] | None]:
        """lease_holder for many samples in one round trip."""
        if not sample_ids:
            return []
        now = time.time() if now is None else now
        pipe = self.r.pipeline()
        pipe.zmscore(self.key("leases"), sample_ids)
        pipe.hmget(self.key("lease_owner"), sample_ids)
        expiries, owners = pipe.execute()
        out: list[tuple[str, str] | None] = []
        for expiry, owner in zip(expiries, owners, strict=True):
            if expiry is None or expiry <= now or owner is None:
                out.append(None)
                continue
            token, _, labeler = owner.decode().partition(" ")
            out.append((token, labeler))
        return out

    def labels(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.r.hgetall(self.key("labels")).items()}

    def current_labels(self, sample_ids: list[str]) -> list[str | None]:
        if not sample_ids:
            return []
        return [v.decode() if v is not None else None for v in self.r.hmget(self.key("labels"), sample_ids)]

    def apply_labels(self, records: list[dict]) -> int:
        """Record labels already durable in object storage; returns the labeled count after."""
        live = self.live_version()
        pipe = self.r.pipeline()
        for rec in records:
            sid = rec["sample_id"]
            if live is not None:
                # Out of the served ranking too, so leasing never walks over labeled samples.
                pipe.zrem(self.ranking_key(live), sid)
            pipe.hset(self.key("labels"), sid, rec["label"])
            pipe.hset(self.key("label_info"), sid, json.dumps({"labeler": rec["labeler"], "at": rec["at"]}))
            pipe.srem(self.key("pool"), sid)
            pipe.zrem(self.key("leases"), sid)
            pipe.hdel(self.key("lease_owner"), sid)
        pipe.hlen(self.key("labels"))
        return int(pipe.execute()[-1])

    # --- rankings ----------------------------------------------------------------------------------

    def live_version(self) -> int | None:
        value = self.r.get(self.key("ranking_live"))
        return int(value) if value is not None else None

    def ranking_key(self, version: int) -> str:
        return self.key("ranking", version)

    def set_cold_start_ranking(self, scores: dict[str, float]) -> None:
        """Version 0: a seeded random order used until the first model's ranking is live."""
        if scores:
            self.r.zadd(self.ranking_key(0), scores)
        self.r.setnx(self.key("ranking_live"), 0)

    def begin_ranking(self, version: int, n_shards: int) -> None:
        self.r.set(self.key("ranking", version, "n_shards"), n_shards)

    def add_scores(self, version: int, scores: dict[str, float]) -> None:
        if scores:
            self.r.zadd(self.ranking_key(version), scores)

    def shard_done(self, version: int, shard: int, n_shards: int) -> bool:
        """Mark a shard scored; True when this completed the ranking and made it live."""
        made_live = self._shard_done(keys=[self.key("ranking", version, "done"), self.key("ranking_live")],
                                     args=[shard, n_shards, version])
        if made_live:
            self.drop_rankings_before(version)
        return bool(made_live)

    def shards_done(self, version: int) -> set[int]:
        return {int(s) for s in self.r.smembers(self.key("ranking", version, "done"))}

    def n_shards(self, version: int) -> int | None:
        value = self.r.get(self.key("ranking", version, "n_shards"))
        return int(value) if value is not None else None

    def drop_rankings_before(self, version: int) -> None:
        """Older rankings are never served again once a newer one is live."""
        for old in range(max(0, version - 50), version):
            self.r.delete(self.ranking_key(old), self.key("ranking", old, "done"),
                          self.key("ranking", old, "n_shards"), shard_plan_key(self.project, old),
                          shard_jobs_key(self.project, old))

    # --- models and training triggers ---------------------------------------------------------------

    def model_version(self) -> int:
        value = self.r.get(self.key("model_version"))
        return int(value) if value is not None else 0

    def set_model(self, version: int, n_labeled: int, point_json: str) -> None:
        """Move the model pointer forward (never back) and record the curve point."""
        pipe = self.r.pipeline()
        pipe.hset(self.key("curve"), version, point_json)
        pipe.execute()
        current = self.model_version()
        if version > current:
            pipe = self.r.pipeline()
            pipe.set(self.key("model_version"), version)
            pipe.set(self.key("model_labels"), n_labeled)
            pipe.execute()

    def model_labels(self) -> int:
        value = self.r.get(self.key("model_labels"))
        return int(value) if value is not None else 0

    def curve(self) -> list[dict]:
        points = [json.loads(v) for v in self.r.hvals(self.key("curve"))]
        return sorted(points, key=lambda p: p["model_version"])

    def claim_train_slot(self, job_id: str, ttl_s: int) -> bool:
        """At most one queued train job per project: True when the caller may enqueue job_id."""
        return bool(self.r.set(self.key("train_queued"), job_id, nx=True, ex=ttl_s))

    def queued_train_job(self) -> str | None:
        value = self.r.get(self.key("train_queued"))
        return value.decode() if value is not None else None

    def release_train_slot(self, job_id: str | None = None) -> bool:
        """Free the slot; with job_id, only while that job still holds it. True when this freed it."""
        if job_id is None:
            return bool(self.r.delete(self.key("train_queued")))
        return bool(self._release_if(keys=[self.key("train_queued")], args=[job_id]))

    def wipe(self) -> None:
        """Delete every Redis key of the project (object storage is untouched)."""
        for key in self.r.scan_iter(match=redis_key(self.project, "*")):
            self.r.delete(key)
        self.r.srem(PROJECTS_KEY, self.project)


def project_names(r: redis.Redis) -> list[str]:
    return sorted(m.decode() for m in r.smembers(PROJECTS_KEY))
