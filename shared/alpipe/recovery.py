"""Rebuild a project's Redis state from object storage, the source of truth (after a Redis wipe).

What comes back: the project definition, every sample batch (pool and test split), the label
log replayed in write order (every labeler's vote per sample, retractions (undo) applied in turn,
the training label of the votes by the project's label_policy, labeled samples leave the pool), the model
pointer and the learning curve, and a cold-start ranking for the unlabeled pool so labelers are
served at once. When the project has a model, a scoring of it is enqueued, and its ranking
replaces the cold-start one when complete.

The project's `meta` key is written last: a project that exists in Redis is a complete one, so
requests never see a half-rebuilt project, and a crash mid-recovery leaves it to be recovered
again. Every step is idempotent.
"""

from __future__ import annotations

import logging
import time
import uuid

import redis

from . import keys, records
from .config import Settings
from .errors import NotFound, UserError
from .projects import Busy, cold_start_score, load_project
from .redis_lua import delete_if_equal
from .schemas import CurvePointOut, Project, is_project_name
from .state import ProjectState, in_chunks
from .storage import ObjectStore

log = logging.getLogger(__name__)

_LOCK_TTL_S = 600
# How long a project's store may be ahead of Redis while a batch is being written (check_redis_restart).
_SETTLE_S = 2.0


def _rebuild(state: ProjectState, store: ObjectStore, project: Project) -> dict:
    name = project.name
    n_samples = n_batches = 0
    for _key, batch in records.read_sample_batches(store, name):
        n_batches += 1
        for chunk in in_chunks(batch):
            n_samples += state.add_samples([(s.id, s.split, s.label) for s in chunk])
    n_labels = n_log = 0
    for _key, batch in records.read_label_log(store, name):
        n_log += 1
        n_labels += len(batch)
        for chunk in in_chunks(batch):
            state.apply_labels([rec.model_dump() for rec in chunk])

    pointer = records.read_pointer(store, name)
    version, n_labeled = (pointer.version, pointer.n_labeled) if pointer else (0, 0)
    points = records.model_curve(store, name, up_to=version)
    for point in points:
        v = point.model_version
        state.set_model(v, n_labeled if v == version else point.n_labeled, point.model_dump_json())
    if version and version not in {p.model_version for p in points}:
        # The pointer names a version whose metrics object is gone: keep the model, without its accuracy.
        log.warning("%s: model v%d has no metrics object; its accuracy is unknown", name, version)
        state.set_model(version, n_labeled, CurvePointOut(model_version=version, n_labeled=n_labeled,
                                                          test_accuracy=None).model_dump_json())

    pool = state.pool_ids()
    for chunk in in_chunks(pool):
        state.set_cold_start_ranking({sid: cold_start_score(project.seed, sid) for sid in chunk})
    if not pool:
        state.set_cold_start_ranking({})
    state.set_applied(n_batches + n_log)
    state.register(project.model_dump_json())  # last: from here on the project is served
    return {"status": "recovered", "sample_batches": n_batches, "samples": n_samples, "label_batches": n_log,
            "label_records": n_labels, **_present(state)}


def _present(state: ProjectState) -> dict:
    """What a project has in Redis: counts, votes, model version and curve points."""
    counts = state.counts()
    return {"pool": counts["pool"], "labeled": counts["labeled"], "test": counts["test"],
            "votes": sum(len(v) for v in state.all_votes().values()), "model_version": state.model_version(),
            "curve_points": len(state.curve())}


def _restart_work(r: redis.Redis, store: ObjectStore, project: Project, version: int, *,
                  settings: Settings) -> dict:
    """Enqueue the embedding pass (it finds the stored embeddings), a scoring of the current model and
    any training the labels call for."""
    from . import embed_pass
    from .pipeline import enqueue_scoring, maybe_enqueue_train

    out: dict = {}
    try:
        out["embedding_shards"] = embed_pass.add_samples(r, project, ProjectState(r, project.name).sample_ids(),
                                                         settings=settings)
        out["scoring"] = enqueue_scoring(r, store, project, version, settings=settings) if version else None
        out["training"] = maybe_enqueue_train(r, project, settings=settings)
    except redis.RedisError:
        raise
    except Exception as e:  # the state is back; the reconciler retries work that is missing
        log.exception("%s: recovered, but restarting its jobs failed", project.name)
        out["jobs_error"] = f"{e.__class__.__name__}: {e}"
    return out


def recover_project(r: redis.Redis, store: ObjectStore, name: str, *, settings: Settings) -> dict:
    """Rebuild one project's Redis state from object storage; a report of what came back.

    Raises NotFound when the store has no such project, Busy when another process is rebuilding it.
    """
    started = time.perf_counter()
    project = records.read_project(store, name)
    # The policy comes from the definition: Redis has no registered project to read it from yet.
    state = ProjectState(r, name, label_policy=project.label_policy)
    lock = state.key("recovering")
    # The Redis run_id in the token: a lock restored from an older snapshot names another run (see
    # check_redis_restart), so it is told from a rebuild in progress.
    token = f"{r.info('server')['run_id']} {uuid.uuid4().hex}"
    if not r.set(lock, token, nx=True, ex=_LOCK_TTL_S):
        raise Busy(f"project {name!r} is being rebuilt from object storage; retry in a moment")
    try:
        report = _rebuild(state, store, project)
    finally:
        delete_if_equal(r, lock, token)
    report.update(_restart_work(r, store, project, report["model_version"], settings=settings))
    report["seconds"] = round(time.perf_counter() - started, 3)
    log.info("recovered project %s: %s", name, report)
    return report


def _wait_for_rebuild(r: redis.Redis, name: str, *, wait_s: float) -> dict:
    """Another process (an API that got a request first) is rebuilding the project: wait for it to finish,
    then report what the project has. Busy when it is still at it after wait_s."""
    state = ProjectState(r, name)
    deadline = time.monotonic() + wait_s
    while r.exists(state.key("recovering")):
        if time.monotonic() > deadline:
            raise Busy(f"project {name!r} is still being rebuilt by another process after {wait_s:.0f}s")
        time.sleep(0.2)
    if not state.exists():
        raise UserError(f"project {name!r}: the other process's rebuild did not finish (see its log)")
    return {"status": "rebuilt by another process", **_present(state)}


def recover_all(r: redis.Redis, store: ObjectStore, *, settings: Settings, only_missing: bool = False,
                wait_s: float = 0.0) -> dict:
    """recover_project for every project in object storage (only those absent from Redis if only_missing).

    A project another process is rebuilding is waited for up to wait_s and reported with what it has
    then; with wait_s 0 (the API's start-up) it is an error in the report ("being rebuilt").
    """
    report: dict[str, dict] = {}
    for name in records.stored_project_names(store):
        if only_missing and ProjectState(r, name).exists():
            report[name] = {"status": "present"}
            continue
        try:
            try:
                report[name] = recover_project(r, store, name, settings=settings)
            except Busy:
                if wait_s <= 0:
                    raise
                report[name] = _wait_for_rebuild(r, name, wait_s=wait_s)
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # nothing else will work either
        except Exception as e:  # one broken project must not keep the others down
            if isinstance(e, UserError):
                log.warning("could not recover project %s: %s", name, e)
            else:
                log.exception("could not recover project %s", name)
            report[name] = {"status": "error", "error": f"{e}" if isinstance(e, UserError)
                            else f"{e.__class__.__name__}: {e}"}
    return {"projects": report}


def check_redis_restart(r: redis.Redis, store: ObjectStore, *, settings: Settings) -> dict:
    """After Redis restarted (its run_id changed), rebuild every project Redis has lost writes of.

    A Redis that restarts after a host crash (appendfsync everysec can lose the last second) or is
    restored from an older snapshot may lack batches that were acknowledged: each project counts the
    durable batches it applied, and a project whose store holds more (or that Redis lost entirely) is
    rebuilt from the store, so an acknowledged label is never missing from training. The reconciler
    calls this every pass; it costs one INFO unless the run_id changed. {project: what was done}.
    """
    run_id = r.info("server")["run_id"]
    seen = r.get(keys.redis_run_id_key())
    if seen is not None and seen.decode() == run_id:
        return {}

    def behind(names: list[str]) -> dict[str, tuple[int | None, int]]:
        """{project: (batches applied or None when Redis lost it, batches in the store)} where Redis is behind."""
        out = {}
        for name in names:
            state = ProjectState(r, name)
            durable = records.durable_batch_count(store, name)
            applied = state.applied() if state.exists() else None
            if applied is None or applied < durable:
                out[name] = (applied, durable)
        return out

    # A batch being written right now is in the store a moment before Redis counts it: only a gap that
    # is still there a little later is a loss.
    suspects = behind(records.stored_project_names(store))
    if suspects:
        time.sleep(_SETTLE_S)
        suspects = behind(list(suspects))
    report: dict[str, dict] = {}
    for name, (applied, durable) in suspects.items():
        log.warning("Redis restarted (run_id %s) and %s: rebuilding it from object storage", run_id,
                    f"holds {applied} of project {name}'s {durable} batches" if applied is not None
                    else f"lost project {name}")
        lock = ProjectState(r, name).key("recovering")
        holder = r.get(lock)
        if holder is not None and not holder.decode().startswith(f"{run_id} "):
            r.delete(lock)  # restored with an older snapshot: nobody holds it on this Redis
        try:
            report[name] = recover_project(r, store, name, settings=settings)
        except Busy:
            return report  # someone is rebuilding it: check again next pass (run_id not recorded yet)
    r.set(keys.redis_run_id_key(), run_id)
    return report


def describe_recovery(rep: dict) -> str:
    """One line for a project's entry of recover_all's report."""
    status = rep.get("status")
    if status == "error":
        return f"error: {rep.get('error')}"
    if status == "present":
        return "present in Redis (left as it is)"
    model = f"model v{rep['model_version']}" if rep.get("model_version") else "no model yet"
    what = (f"{rep.get('pool', 0)} pool, {rep.get('labeled', 0)} labeled ({rep.get('votes', 0)} votes), "
            f"{rep.get('test', 0)} test; {model}, {rep.get('curve_points', 0)} curve points")
    if status == "recovered":
        return (f"rebuilt from {rep['sample_batches']} sample batches and {rep['label_batches']} label batches "
                f"({rep['label_records']} records): {what} in {rep.get('seconds', 0):.1f}s")
    return f"{status}: {what}"


def load_or_recover(r: redis.Redis, store: ObjectStore, name: str, *, settings: Settings) -> Project:
    """The project from Redis; when Redis lost it but object storage has it, rebuild it first."""
    try:
        return load_project(name, r=r)
    except NotFound:
        if not is_project_name(name) or not records.project_stored(store, name):
            raise
    log.warning("project %s is in object storage but not in Redis: rebuilding it", name)
    try:
        recover_project(r, store, name, settings=settings)
    except Busy:
        if not ProjectState(r, name).exists():
            raise
    return load_project(name, r=r)
