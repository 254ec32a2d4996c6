"""A project's live state in Redis: pool, labels, leases, rankings, model pointer, counters.

Everything here can be rebuilt from object storage (see recovery): Redis holds what makes the
loop fast, object storage holds what makes it correct. Keys come from keys.redis_key, so all of
one project's keys share a Redis Cluster hash slot and the Lua scripts below stay legal there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis
from redis.commands.core import Script

from .keys import redis_key, shard_jobs_key, shard_plan_key, train_lock_key
from .redis_lua import DELETE_IF_EQUAL_LUA, bound
from .schemas import COLD_START_PICK_FLOOR

PROJECTS_KEY = "alpipe:projects"
# Redis pipelines and HMGETs over many samples go in chunks of this many, so a big import or a rebuild is a
# few round trips without one giant command.
SAMPLE_CHUNK = 5000
_VOTES_CHUNK = 500  # votes read per HMGET: a 10,000-label import does not make one huge reply
_WRITE_SLICE = 250  # samples per ranking write, so no single Redis command holds up labelers' requests

def in_chunks(items: list, size: int = SAMPLE_CHUNK) -> Iterator[list]:
    """items in consecutive slices of at most size."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


# Leases the top n available samples of the live ranking in one atomic step, so two labelers never
# get the same sample. Falls back to random pool members when the ranking runs dry (a pool_size
# subsample covers only part of the pool). The live version, the leased samples and the model's
# guesses come from this one read, so an answer never mixes two rankings. The ranking and guess keys
# are built here from the live version (ARGV[6] .. version, .. ':guess'); they share the project's
# hash tag, so the script stays in one Redis Cluster slot.
# KEYS: ranking_live, pool, leases, lease_owner. ARGV: n, now, expiry, owner, page, ranking key prefix.
# Returns {live version or '', id, score, guess, id, score, guess, ...} (score and guess '' when none).
_LEASE_LUA = """
local n = tonumber(ARGV[1]); local now = tonumber(ARGV[2]); local expiry = tonumber(ARGV[3])
local owner = ARGV[4]; local page = tonumber(ARGV[5])
local live = redis.call('GET', KEYS[1])
local ranking = ARGV[6] .. (live or 'none')
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
  local page_ids = redis.call('ZREVRANGE', ranking, start, start + page - 1, 'WITHSCORES')
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
local answer = {live or ''}
for i = 1, #out, 2 do
  local guess = ''
  if live and out[i + 1] ~= '' then guess = redis.call('HGET', ranking .. ':guess', out[i]) or '' end
  table.insert(answer, out[i]); table.insert(answer, out[i + 1]); table.insert(answer, guess)
end
return answer
"""

# Ends the leases that ARGV[1] ("<token> <labeler>") holds on the samples ARGV[2..]; leases of anyone
# else, and expired ones taken over since, are left alone. Returns how many were ended.
_RELEASE_LEASES_LUA = """
local released = 0
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[1] then
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i])
    released = released + 1
  end
end
return released
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


# Applies label-log records (votes and retractions) to one project's votes and training labels, in
# order, atomically, so concurrent labelers never lose each other's votes and the live state and a
# replay of the log (recovery) go through the same steps. A sample's votes are a JSON object
# labeler -> {label, at}; its training label is a pure function of them (see `decide`), so equal
# votes give equal labels however they came about. Recency is (at, labeler name), a total order.
# KEYS: votes, labels, pool, leases, lease_owner, ranking_live, labeler_votes, disputed, durable_applied
# ARGV: policy ('latest' | 'majority'), JSON list of records {sample_id, label, labeler, at, retract},
#       lease expiry and owner for a retraction that leaves a sample without votes ('' = none),
#       its score in the live ranking ('' = leave it out of the ranking), the ranking key prefix (the
#       live ranking's key is built here, as in _LEASE_LUA), how many durable batches this applies
# Returns {labeled count, training label of each record's sample after it ('' = none)}.
_APPLY_VOTES_LUA = """
local ranking = ARGV[6] .. (redis.call('GET', KEYS[6]) or 'none')
if tonumber(ARGV[7]) > 0 then redis.call('INCRBY', KEYS[9], ARGV[7]) end
local policy = ARGV[1]
local records = cjson.decode(ARGV[2])
local lease_expiry, lease_owner, rank_score = ARGV[3], ARGV[4], ARGV[5]
local function newer(a_at, a_who, b_at, b_who)
  if a_at ~= b_at then return a_at > b_at end
  return a_who > b_who
end
-- The training label of a set of votes (nil for none), how many distinct labels, the newest vote's time.
local function decide(votes)
  local count, last = {}, {}
  for who, v in pairs(votes) do
    count[v.label] = (count[v.label] or 0) + 1
    local l = last[v.label]
    if l == nil or newer(v.at, who, l[1], l[2]) then last[v.label] = {v.at, who} end
  end
  local top, top_rank, distinct, newest = nil, -1, 0, nil
  for label, n in pairs(count) do
    distinct = distinct + 1
    local l = last[label]
    if newest == nil or newer(l[1], l[2], newest[1], newest[2]) then newest = l end
    local rank = 0
    if policy == 'majority' then rank = n end
    if rank > top_rank or (rank == top_rank and newer(l[1], l[2], last[top][1], last[top][2])) then
      top, top_rank = label, rank
    end
  end
  return top, distinct, newest and newest[1]
end
local out = {0}
for i, rec in ipairs(records) do
  local sid, who = rec.sample_id, rec.labeler
  local raw = redis.call('HGET', KEYS[1], sid)
  local votes = {}
  if raw then votes = cjson.decode(raw) end
  local changed = true
  if rec.retract then
    if votes[who] == nil then
      changed = false
    else
      votes[who] = nil
      if redis.call('HINCRBY', KEYS[7], who, -1) <= 0 then redis.call('HDEL', KEYS[7], who) end
    end
  else
    if votes[who] == nil then redis.call('HINCRBY', KEYS[7], who, 1) end
    votes[who] = {label = rec.label, at = rec.at}
  end
  if not changed then
    out[i + 1] = redis.call('HGET', KEYS[2], sid) or ''
  else
    local label, distinct, newest = decide(votes)
    if label == nil then
      redis.call('HDEL', KEYS[1], sid)
      redis.call('HDEL', KEYS[2], sid)
      redis.call('ZREM', KEYS[8], sid)
      redis.call('SADD', KEYS[3], sid)
      if lease_expiry ~= '' then
        redis.call('ZADD', KEYS[4], lease_expiry, sid)
        redis.call('HSET', KEYS[5], sid, lease_owner)
      end
      if rank_score ~= '' then redis.call('ZADD', ranking, rank_score, sid) end
      out[i + 1] = ''
    else
      redis.call('HSET', KEYS[1], sid, cjson.encode(votes))
      redis.call('HSET', KEYS[2], sid, label)
      if distinct > 1 then redis.call('ZADD', KEYS[8], newest, sid) else redis.call('ZREM', KEYS[8], sid) end
      -- Out of the served ranking too, so leasing never walks over labeled samples.
      redis.call('ZREM', ranking, sid)
      redis.call('SREM', KEYS[3], sid)
      redis.call('ZREM', KEYS[4], sid)
      redis.call('HDEL', KEYS[5], sid)
      out[i + 1] = label
    end
  end
end
out[1] = redis.call('HLEN', KEYS[2])
return out
"""

# Raises a number key to ARGV[1] (never lowers it): a newer request on more labels wins.
_RAISE_TO_LUA = """
local value = redis.call('GET', KEYS[1])
if not value or tonumber(value) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
"""

# Deletes a number key only while its value is at most ARGV[1] (a larger, newer request is kept).
_DELETE_IF_AT_MOST_LUA = """
local value = redis.call('GET', KEYS[1])
if value and tonumber(value) <= tonumber(ARGV[1]) then return redis.call('DEL', KEYS[1]) end
return 0
"""


_SCRIPT_TEXTS = {"lease": _LEASE_LUA, "release_leases": _RELEASE_LEASES_LUA, "apply_votes": _APPLY_VOTES_LUA,
                 "shard_done": _SHARD_DONE_LUA, "delete_if_equal": DELETE_IF_EQUAL_LUA,
                 "delete_if_at_most": _DELETE_IF_AT_MOST_LUA, "raise_to": _RAISE_TO_LUA}


def _scripts(r: redis.Redis) -> dict[str, Script]:
    """The Lua scripts bound to a client (a ProjectState is made per request; the scripts once per client)."""
    return {name: bound(r, text) for name, text in _SCRIPT_TEXTS.items()}


@dataclass(frozen=True)
class LeaseAnswer:
    """What one lease call read and took: the live ranking version (None before any), and each leased
    sample with its score (None for a random fill-in) and that ranking's guess ((class index,
    probability), None where the model has none)."""

    version: int | None
    samples: list[tuple[str, float | None, tuple[int, float] | None]]


@dataclass(frozen=True)
class TrainMarks:
    """The current model's labels, the labels a pending forced-training request covers (None: none), and
    whether a train job is queued or a trainer holds the project."""

    model_labels: int
    forced: int | None
    busy: bool

    @property
    def forced_pending(self) -> bool:
        """A forced-training request covers labels the current model has not seen."""
        return self.forced is not None and self.forced > self.model_labels


@dataclass(frozen=True)
class LabelCheck:
    """What validating a label batch reads, in one round trip: each sample's split (None: not in the
    project), its live lease holder ((token, labeler) or None) and its votes."""

    splits: list[str | None]
    holders: list[tuple[str, str] | None]
    votes: list[dict[str, dict]]


class ProjectState:
    """Redis operations of one project; every method is safe to repeat."""

    def __init__(self, r: redis.Redis, project: str, *, label_policy: str | None = None):
        self.r = r
        self.project = project
        # How votes become training labels; None: the registered project's (or 'latest').
        self.label_policy = label_policy
        scripts = _scripts(r)
        self._lease = scripts["lease"]
        self._release_leases = scripts["release_leases"]
        self._apply_votes = scripts["apply_votes"]
        self._shard_done = scripts["shard_done"]
        self._release_if = scripts["delete_if_equal"]
        self._delete_if_at_most = scripts["delete_if_at_most"]
        self._raise_to = scripts["raise_to"]

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

    # How many durable batches (sample batches and label-log objects) Redis has applied: fewer than the
    # store holds after a Redis restart means Redis lost writes (alpipe.recovery.check_redis_restart).
    def count_applied(self, batches: int = 1) -> None:
        self.r.incrby(self.key("durable_applied"), batches)

    def set_applied(self, batches: int) -> None:
        self.r.set(self.key("durable_applied"), batches)

    def applied(self) -> int:
        return int(self.r.get(self.key("durable_applied")) or 0)

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

    def sample_ids(self) -> list[str]:
        """Every sample of the project, pool and test, sorted."""
        return sorted(k.decode() for k in self.r.hkeys(self.key("samples")))

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
        answer = self.lease_ranked(n, token=token, labeler=labeler, ttl_s=ttl_s, now=now, page=page)
        return [(sid, score) for sid, score, _ in answer.samples]

    def lease_ranked(self, n: int, *, token: str, labeler: str, ttl_s: float, now: float | None = None,
                     page: int = 256) -> LeaseAnswer:
        """Lease up to n samples from the top of the live ranking, with that ranking's version and guesses,
        all read in one atomic step."""
        now = time.time() if now is None else now
        flat = self._lease(keys=[self.key("ranking_live"), self.key("pool"), self.key("leases"),
                                 self.key("lease_owner")],
                           args=[n, now, now + ttl_s, f"{token} {labeler}", page, self.key("ranking", "")])
        live = int(flat[0]) if flat[0] else None
        samples = [(flat[i].decode(), float(flat[i + 1]) if flat[i + 1] else None, _parse_guess(flat[i + 2]))
                   for i in range(1, len(flat), 3)]
        return LeaseAnswer(live, samples)

    def release(self, sample_ids: list[str], *, token: str, labeler: str) -> int:
        """End the leases held under token by labeler on sample_ids, at once; how many were ended."""
        if not sample_ids:
            return 0
        return int(self._release_leases(keys=[self.key("leases"), self.key("lease_owner")],
                                        args=[f"{token} {labeler}", *sample_ids]))

    def leased_ids(self, now: float | None = None) -> list[str]:
        """Samples under a live lease, sorted."""
        now = time.time() if now is None else now
        return sorted(m.decode() for m in self.r.zrangebyscore(self.key("leases"), now, "+inf"))

    def lease_holder(self, sample_id: str, now: float | None = None) -> tuple[str, str] | None:
        """(token, labeler) of a live lease on the sample, None when it is not leased."""
        return self.lease_holders([sample_id], now)[0]

    def lease_holders(self, sample_ids: list[str], now: float | None = None) -> list[tuple[str, str] | None]:
        """lease_holder for many samples in one round trip."""
        if not sample_ids:
            return []
        pipe = self.r.pipeline()
        pipe.zmscore(self.key("leases"), sample_ids)
        pipe.hmget(self.key("lease_owner"), sample_ids)
        expiries, owners = pipe.execute()
        return _holders(expiries, owners, time.time() if now is None else now)

    def check_labels(self, sample_ids: list[str], now: float | None = None) -> LabelCheck:
        """Splits, live lease holders and votes of the samples of a label batch, in one round trip."""
        if not sample_ids:
            return LabelCheck([], [], [])
        pipe = self.r.pipeline(transaction=False)
        pipe.hmget(self.key("samples"), sample_ids)
        pipe.zmscore(self.key("leases"), sample_ids)
        pipe.hmget(self.key("lease_owner"), sample_ids)
        for chunk in range(0, len(sample_ids), _VOTES_CHUNK):
            pipe.hmget(self.key("votes"), sample_ids[chunk:chunk + _VOTES_CHUNK])
        splits, expiries, owners, *vote_chunks = pipe.execute()
        votes = [json.loads(v) if v is not None else {} for chunk in vote_chunks for v in chunk]
        return LabelCheck([v.decode() if v is not None else None for v in splits],
                          _holders(expiries, owners, time.time() if now is None else now), votes)

    def labels(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.r.hgetall(self.key("labels")).items()}

    def current_labels(self, sample_ids: list[str]) -> list[str | None]:
        """The training label of each sample, None where it has none."""
        if not sample_ids:
            return []
        return [v.decode() if v is not None else None for v in self.r.hmget(self.key("labels"), sample_ids)]

    def _policy(self) -> str:
        if self.label_policy is None:
            meta = self.meta()
            self.label_policy = json.loads(meta).get("label_policy", "latest") if meta else "latest"
        return self.label_policy

    def apply_labels(self, records: list[dict], *, batches: int = 0) -> int:
        """Record labels already durable in object storage; returns the labeled count after.

        records are label-log records (LabelRecord dicts), votes and retractions, applied in order.
        batches: how many label-log objects they are, counted as applied in the same step (count_applied).
        """
        return self.apply_votes(records, batches=batches)[0]

    def apply_votes(self, records: list[dict], *, relet: tuple[str, str, float] | None = None,
                    rank_score: float | None = None, batches: int = 0) -> tuple[int, list[str | None]]:
        """Apply label-log records in order, atomically: (labeled count, each record's sample's training label).

        A vote sets its labeler's vote on the sample; a retraction removes it. The training label
        follows the policy (latest: the most recent vote; majority: the most common label, ties to
        the most recent). A sample left without votes goes back to the unlabeled pool; with relet
        (token, labeler, expiry) it is leased to that labeler at once, and with rank_score it is put
        back into the live ranking with that score. batches: as for apply_labels.
        """
        if not records:
            if batches:
                self.count_applied(batches)
            return int(self.r.hlen(self.key("labels"))), []
        payload = json.dumps([{"sample_id": rec["sample_id"], "label": rec["label"], "labeler": rec["labeler"],
                               "at": float(rec["at"]), "retract": bool(rec.get("retract", False))}
                              for rec in records])
        lease_expiry, lease_owner = ("", "") if relet is None else (repr(float(relet[2])), f"{relet[0]} {relet[1]}")
        out = self._apply_votes(
            keys=[self.key("votes"), self.key("labels"), self.key("pool"), self.key("leases"),
                  self.key("lease_owner"), self.key("ranking_live"), self.key("labeler_votes"), self.key("disputed"),
                  self.key("durable_applied")],
            args=[self._policy(), payload, lease_expiry, lease_owner, "" if rank_score is None else repr(rank_score),
                  self.key("ranking", ""), batches])
        return int(out[0]), [v.decode() or None for v in out[1:]]

    def votes(self, sample_ids: list[str]) -> list[dict[str, dict]]:
        """Each sample's votes, labeler -> {"label", "at"} ({} where it has none)."""
        if not sample_ids:
            return []
        return [json.loads(v) if v is not None else {} for v in self.r.hmget(self.key("votes"), sample_ids)]

    def all_votes(self) -> dict[str, dict[str, dict]]:
        """Every labeled sample's votes: sample_id -> labeler -> {"label", "at"}."""
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(self.key("votes")).items()}

    def labeler_counts(self) -> dict[str, int]:
        """Labeler -> how many samples it has a vote on."""
        return {k.decode(): int(v) for k, v in self.r.hgetall(self.key("labeler_votes")).items()}

    def disagreements(self, limit: int = 50) -> tuple[int, list[tuple[str, dict[str, dict]]]]:
        """(how many samples have votes that differ, the `limit` most recently voted on with their votes)."""
        pipe = self.r.pipeline()
        pipe.zcard(self.key("disputed"))
        pipe.zrevrange(self.key("disputed"), 0, max(0, limit - 1))
        count, ids = pipe.execute()
        ids = [i.decode() for i in ids][:limit]
        return int(count), list(zip(ids, self.votes(ids), strict=True))

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

    def promote_cold_start(self, order: list[str], *, pool_total: int) -> None:
        """Move `order` to the top of the cold-start ranking, first first, and record that the order covers a
        pool of pool_total samples. Only samples still in the ranking move (ZADD XX): one labeled meanwhile has
        left it and stays out. Their scores lie above COLD_START_PICK_FLOOR, the random order's below."""
        pipe = self.r.pipeline()  # MULTI: the order and its record land together
        if order:
            n = len(order)
            pipe.zadd(self.ranking_key(0), {sid: COLD_START_PICK_FLOOR + (n - i) / n for i, sid in enumerate(order)},
                      xx=True)
        pipe.set(self.key("cold_start", "ordered"), pool_total)
        pipe.execute()

    def cold_start_ordered(self) -> int | None:
        """The pool size the current cold-start order was made for; None when there is none yet."""
        value = self.r.get(self.key("cold_start", "ordered"))
        return int(value) if value is not None else None

    def cold_start_job(self, job_id: str | None = None) -> str | None:
        """The id of the cold-start job queued last (set it by passing one)."""
        if job_id is not None:
            self.r.set(self.key("cold_start", "job"), job_id)
            return job_id
        value = self.r.get(self.key("cold_start", "job"))
        return value.decode() if value is not None else None

    def begin_ranking(self, version: int, n_shards: int) -> None:
        self.r.set(self.key("ranking", version, "n_shards"), n_shards)

    def guess_key(self, version: int) -> str:
        return self.key("ranking", version, "guess")

    def add_scores(self, version: int, scores: dict[str, float],
                   guesses: dict[str, tuple[int, float]] | None = None) -> None:
        """Add a shard's scores to ranking `version`, with the model's guesses (class index, probability).

        In slices of _WRITE_SLICE samples: one 2,000-member ZADD holds Redis for milliseconds, and every
        labeler's request waits behind it. The ranking is read only once live (all shards done)."""
        guesses = guesses or {}
        ids = list(dict.fromkeys([*scores, *guesses]))
        for start in range(0, len(ids), _WRITE_SLICE):
            part = ids[start:start + _WRITE_SLICE]
            pipe = self.r.pipeline()  # MULTI: a sample's score and its guess land together
            slice_scores = {sid: scores[sid] for sid in part if sid in scores}
            if slice_scores:
                pipe.zadd(self.ranking_key(version), slice_scores)
            slice_guesses = {sid: f"{int(guesses[sid][0])} {float(guesses[sid][1]):.6f}" for sid in part
                             if sid in guesses}
            if slice_guesses:
                pipe.hset(self.guess_key(version), mapping=slice_guesses)
            pipe.execute()

    def guesses(self, version: int, sample_ids: list[str]) -> list[tuple[int, float] | None]:
        """The model's (class index, probability) for each sample in ranking `version`, None where unknown."""
        if not sample_ids:
            return []
        return [_parse_guess(raw) for raw in self.r.hmget(self.guess_key(version), sample_ids)]

    def ranking_places(self, version: int, sample_ids: list[str]) -> tuple[list[tuple[float, int] | None], int]:
        """([(score, place from the top) or None where unranked] for each sample, the ranking's size)."""
        pipe = self.r.pipeline(transaction=False)
        for sid in sample_ids:
            pipe.zscore(self.ranking_key(version), sid)
            pipe.zrevrank(self.ranking_key(version), sid)
        pipe.zcard(self.ranking_key(version))
        *found, size = pipe.execute()
        places = [(float(score), int(place)) if score is not None and place is not None else None
                  for score, place in zip(found[0::2], found[1::2], strict=True)]
        return places, int(size)

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
            # UNLINK: Redis frees a big ranking in the background instead of between two requests.
            self.r.unlink(self.ranking_key(old), self.key("ranking", old, "done"), self.guess_key(old),
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

    def model_snapshot(self) -> tuple[int, int, int | None]:
        """(model version, its n_labeled, live ranking version) read together, never from two moments."""
        version, labels, live = self.r.mget(self.key("model_version"), self.key("model_labels"),
                                            self.key("ranking_live"))
        return int(version or 0), int(labels or 0), int(live) if live is not None else None

    def labeled_count(self) -> int:
        return int(self.r.hlen(self.key("labels")))

    def train_marks(self) -> TrainMarks:
        """What deciding on a train job reads, in one round trip (see TrainMarks)."""
        model_labels, forced, queued, locked = self.r.mget(
            self.key("model_labels"), self.key("train_forced"), self.key("train_queued"), train_lock_key(self.project))
        return TrainMarks(int(model_labels or 0), int(forced) if forced is not None else None,
                          queued is not None or locked is not None)

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

    def request_forced_training(self, labeled: int) -> None:
        """Remember that training on `labeled` labels was asked for, even short of query_size.

        The request outlives the train job it queues: if that job's trainer dies, the reconciler
        still sees training as due, and a later round that covers the labels clears it.
        """
        self._raise_to(keys=[self.key("train_forced")], args=[labeled])

    def clear_forced_training(self, trained_on: int) -> None:
        """A model on `trained_on` labels answers every forced request up to that many labels."""
        self._delete_if_at_most(keys=[self.key("train_forced")], args=[trained_on])

    def wipe(self) -> None:
        """Delete every Redis key of the project (object storage is untouched)."""
        for key in self.r.scan_iter(match=redis_key(self.project, "*")):
            self.r.delete(key)
        self.r.srem(PROJECTS_KEY, self.project)


def _parse_guess(raw: bytes | None) -> tuple[int, float] | None:
    """A stored guess, "<class index> <probability>", as a tuple; None for a missing or empty one."""
    if not raw:
        return None
    index, _, prob = raw.decode().partition(" ")
    return int(index), float(prob)


def _holders(expiries: list, owners: list, now: float) -> list[tuple[str, str] | None]:
    """(token, labeler) of each live lease (ZMSCORE of leases, HMGET of lease_owner), None where none."""
    out: list[tuple[str, str] | None] = []
    for expiry, owner in zip(expiries, owners, strict=True):
        if expiry is None or expiry <= now or owner is None:
            out.append(None)
            continue
        token, _, labeler = owner.decode().partition(" ")
        out.append((token, labeler))
    return out


def project_names(r: redis.Redis) -> list[str]:
    return sorted(m.decode() for m in r.smembers(PROJECTS_KEY))
