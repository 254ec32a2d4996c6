"""The labeling service's core: projects, samples, queries, labels and curves.

Pure functions: collaborators (object store, Redis client, settings values) come in as keyword
arguments; nothing here reads the environment or opens a connection. Every write follows the
same order: the durable object first (project.json, a sample batch, a label-log batch), then
Redis. A crash between the two loses nothing, because recovery rebuilds Redis from the objects.

The objects' layout is alpipe.records'; the Redis keys' is alpipe.state's.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import secrets
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import redis

from . import cold_start, embed_pass, keys, records
from .config import Settings
from .errors import NotFound, UserError
from .label_commit import GroupCommit
from .schemas import (
    Disagreement,
    Disagreements,
    Guess,
    ImportRequest,
    ImportResult,
    LabelBatch,
    LabelRecord,
    LabelResult,
    LeaseRelease,
    LeaseReleaseResult,
    ModelInfo,
    Project,
    ProjectCounts,
    ProjectCreate,
    ProjectPublic,
    ProjectSummary,
    QueryOut,
    QuerySample,
    SampleRecord,
    TrainRequestResult,
    UndoResult,
    UploadResult,
)
from .state import ProjectState, in_chunks, project_names
from .storage import ObjectStore

log = logging.getLogger(__name__)

# Label posts of this process share label-log writes (alpipe.label_commit).
_GROUP_COMMIT = GroupCommit()


# --- errors the API maps to status codes (all are UserErrors: the CLI prints them on one line) ----


class Invalid(UserError):
    """Well-formed input the project cannot accept (unknown class, test sample, bad option): 422."""


class Conflict(UserError):
    """The request clashes with the current state (name taken, sample leased to someone else): 409."""


class TooLarge(UserError):
    """An upload over the size limit: 413."""


class NotAnImage(UserError):
    """Bytes that PIL cannot decode as an image: 415."""


class Busy(UserError):
    """The project is being rebuilt from object storage; retry in a moment: 503."""


# --- names and small helpers ---------------------------------------------------------------------


ANONYMOUS_LABELER = "anonymous"


def _log_time(now: float | None) -> float:
    """A label-log time: whole milliseconds, which survive Redis' JSON (14 significant digits) exactly."""
    return round(time.time() if now is None else now, 3)


def image_url(project: str, sample_id: str) -> str:
    """The API path that serves a sample's image (relative, so it works behind any proxy)."""
    return f"/projects/{project}/samples/{sample_id}/image"


def cold_start_score(seed: int, sample_id: str) -> float:
    """A sample's score in the cold-start ranking: uniform in [0, 1), fixed by (project seed, id).

    Deterministic, so the import, an upload and recovery all give a sample the same place.
    """
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _name_list(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# --- projects ----------------------------------------------------------------------------------------


def validate_project(body: ProjectCreate) -> None:
    """Names the first thing wrong with a project definition (Invalid), or returns."""
    from .model_specs import check_model_name, check_strategy_fits, uses_embeddings
    from .strategies import get_strategy
    from .train_config import fixed_epochs

    for check in (lambda: get_strategy(body.strategy), lambda: check_model_name(body.model),
                  lambda: uses_embeddings(body.model, finetune=body.finetune, pretrained=body.pretrained),
                  lambda: check_strategy_fits(body.strategy, body.model, finetune=body.finetune,
                                              pretrained=body.pretrained),
                  lambda: fixed_epochs(body.training.stop)):
        try:
            check()
        except UserError as e:
            raise Invalid(str(e)) from None
    blank = [c for c in body.classes if not c.strip()]
    if blank:
        raise Invalid("class names must not be empty")
    control = [c for c in body.classes if any(unicodedata.category(ch) == "Cc" for ch in c)]
    if control:
        raise Invalid(f"class name {control[0]!r} has a control character; use printable characters only")
    from .export import safe_folder

    folders: dict[str, str] = {}
    for c in body.classes:
        other = folders.setdefault(safe_folder(c), c)
        if other != c:
            raise Invalid(f"classes {other!r} and {c!r} would share the folder {safe_folder(c)!r} of an ImageFolder "
                          "export; rename one")
    repeated = sorted(c for c, n in Counter(body.classes).items() if n > 1)
    if repeated:
        raise Invalid(f"duplicate class names: {_name_list(repeated)}; every class must appear once")


def create_project(body: ProjectCreate, *, store: ObjectStore, r: redis.Redis,
                   now: float | None = None) -> Project:
    """Write project.json (create-if-absent, so two racing creates cannot both win), then register it."""
    validate_project(body)
    project = Project(**body.model_dump(), created_at=time.time() if now is None else now)
    state = ProjectState(r, project.name)
    if state.exists() or not records.create_project(store, project):
        raise Conflict(f"project {project.name!r} already exists")
    state.register(project.model_dump_json())
    return project


def load_project(name: str, *, r: redis.Redis) -> Project:
    """The project as registered in Redis; NotFound when it is not."""
    meta = ProjectState(r, name).meta()
    if meta is None:
        raise NotFound(f"project {name!r} not found")
    return parse_project(meta)


@lru_cache(maxsize=256)
def parse_project(meta: str) -> Project:
    """A registered project's JSON as a Project; every request reads it, and it rarely changes, so each
    text is parsed once. Callers treat the Project as read-only (model_copy to change it)."""
    return Project.model_validate_json(meta)


def _counts(state: ProjectState) -> ProjectCounts:
    return ProjectCounts(**state.counts())


def list_projects(*, r: redis.Redis) -> list[ProjectSummary]:
    out = []
    for name in project_names(r):
        try:
            project = load_project(name, r=r)
        except NotFound:  # deleted or half-recovered between the two reads
            continue
        state = ProjectState(r, name)
        out.append(ProjectSummary(name=name, classes=project.classes, strategy=project.strategy,
                                  model=project.model, created_at=project.created_at,
                                  counts=_counts(state), model_version=state.model_version()))
    return out


def queue_depths(*, r: redis.Redis) -> dict[str, int]:
    """Jobs waiting in the train and score queues (all projects share them)."""
    from rq import Queue

    return {name: Queue(name, connection=r).count for name in (keys.QUEUE_TRAIN, keys.QUEUE_SCORE)}


def describe_project(project: Project, *, r: redis.Redis, max_disagreements: int = 50) -> ProjectPublic:
    state = ProjectState(r, project.name)
    version, n_labeled, live = state.model_snapshot()
    curve = state.curve()  # read after the snapshot: it always holds the snapshot's version
    accuracy = next((p.get("test_accuracy") for p in curve if p.get("model_version") == version), None)
    n_disputed, disputed = state.disagreements(max_disagreements)
    return ProjectPublic(
        name=project.name, project=project, counts=_counts(state),
        model=ModelInfo(version=version, n_labeled=n_labeled if version else 0, test_accuracy=accuracy),
        live_ranking_version=live, queues=queue_depths(r=r), curve=curve,
        label_policy=project.label_policy, labelers=state.labeler_counts(),
        embedding=embed_pass.progress(r, project), cold_start=cold_start.status(r, project),
        disagreements=Disagreements(count=n_disputed, samples=[
            Disagreement(sample_id=sid, votes={who: vote["label"] for who, vote in sorted(votes.items())})
            for sid, votes in disputed]))


# --- samples -----------------------------------------------------------------------------------------


def sniff_image(data: bytes) -> str:
    """The PIL format name (PNG, JPEG, ...) of encoded image bytes; NotAnImage when they are not one."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.load()  # a full decode: verify() misses truncated data
    except Image.DecompressionBombError as e:
        raise NotAnImage(f"image rejected: {e}") from None
    except Exception as e:  # PIL raises many types for bad data; all mean "not an image we can use"
        raise NotAnImage(f"not a readable image ({e.__class__.__name__}: {e}); "
                         "upload a file PIL can decode (png, jpg, gif, bmp, webp, ...)") from None
    return fmt or "unknown"


def image_mime(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return Image.MIME.get(img.format or "", "application/octet-stream")
    except Exception:
        return "application/octet-stream"


def _seed_cold_start(state: ProjectState, project: Project, pool_ids: list[str]) -> None:
    """Give new pool samples a cold-start score while the cold-start ranking is the one served."""
    if not pool_ids or state.live_version() not in (None, 0):
        return
    for chunk in in_chunks(pool_ids):
        state.set_cold_start_ranking({sid: cold_start_score(project.seed, sid) for sid in chunk})


def resolve_auto_model(project: Project, sample_ids: list[str], *, store: ObjectStore, r: redis.Redis) -> Project:
    """The project with model 'auto' and an unset input size of a backbone decided by its first images.

    Written once: the first caller to claim the choice in Redis rewrites project.json and the
    registered definition; concurrent callers adopt that choice, so every part of the system sees
    one model at one input size (embeddings are keyed by it).
    """
    from .image_probe import image_kind
    from .model_specs import AUTO, BACKBONES, check_strategy_fits, resolve_auto

    open_size = project.input_size is None and project.model in (AUTO, *BACKBONES)
    if not sample_ids or (project.model != AUTO and not open_size):
        return project
    state = ProjectState(r, project.name)
    grayscale, max_side = image_kind(store, sample_ids)
    model, input_size = resolve_auto(project.model, project.input_size, finetune=project.finetune,
                                     grayscale=grayscale, max_side=max_side)
    try:
        check_strategy_fits(project.strategy, model, finetune=project.finetune, pretrained=project.pretrained)
    except UserError as e:
        raise Invalid(f"these images make model auto choose {model}: {e}") from None
    choice = {"model": model, "input_size": input_size}
    if state.r.set(state.key("resolved"), json.dumps(choice), nx=True):
        resolved = project.model_copy(update=choice)
        records.rewrite_project(store, resolved)
        state.register(resolved.model_dump_json())
        log.info("%s: runs %s at %s px (%s images, up to %d px)", project.name, model,
                 choice["input_size"] or "its default", "grayscale" if grayscale else "colour", max_side)
        return resolved
    return project.model_copy(update=json.loads(state.r.get(state.key("resolved"))))


def add_upload(project: Project, data: bytes, *, filename: str | None, label: str | None, split: str,
               store: ObjectStore, r: redis.Redis, settings: Settings) -> UploadResult:
    """Add one uploaded image. Re-uploading an image the project has is a no-op (created=False)."""
    if split not in ("pool", "test"):
        raise Invalid(f"split must be 'pool' or 'test', got {split!r}")
    if label is not None and label not in project.classes:
        raise Invalid(f"label {label!r} is not a class of project {project.name!r}; "
                      f"allowed: {', '.join(project.classes)}")
    if split == "test" and label is None:
        raise Invalid("a test sample needs its label (form field 'label') to be useful for evaluation")
    sniff_image(data)
    sample_id = hashlib.sha256(data).hexdigest()
    state = ProjectState(r, project.name)
    existing = state.sample_split(sample_id)
    if existing is not None:
        return UploadResult(sample_id=sample_id, split=existing, created=False,
                            image_url=image_url(project.name, sample_id))
    records.put_image(store, sample_id, data)
    # The model is decided (or refused) before the sample is recorded, so a refusal writes nothing.
    project = resolve_auto_model(project, [sample_id], store=store, r=r)
    name = Path(filename).name if filename else sample_id
    records.write_sample_batch(store, project.name, [SampleRecord(id=sample_id, name=name, label=label, split=split)])
    state.add_samples([(sample_id, split, label)])
    state.count_applied()
    if split == "pool":
        _seed_cold_start(state, project, [sample_id])
    embed_pass.add_samples(r, project, [sample_id], settings=settings, flush_now=False)
    return UploadResult(sample_id=sample_id, split=split, created=True, image_url=image_url(project.name, sample_id))


def add_pool_images(project: Project, images: list[tuple[bytes, str]], *, store: ObjectStore, r: redis.Redis,
                    settings: Settings) -> list[str]:
    """Add unlabeled images [(bytes, name)] to the pool in one sample batch; their sample ids, in order.

    Images the project already has keep their split and are not recorded again. Each image must
    have passed sniff_image.
    """
    ids = [hashlib.sha256(data).hexdigest() for data, _ in images]
    state = ProjectState(r, project.name)
    known = dict(zip(ids, state.sample_splits(ids), strict=True))
    new: dict[str, SampleRecord] = {}
    for sid, (data, name) in zip(ids, images, strict=True):
        if known[sid] is None and sid not in new:
            records.put_image(store, sid, data)
            new[sid] = SampleRecord(id=sid, name=name, split="pool")
    if new:
        project = resolve_auto_model(project, list(new), store=store, r=r)
        records.write_sample_batch(store, project.name, list(new.values()))
        state.add_samples([(sid, "pool", None) for sid in new])
        state.count_applied()
        _seed_cold_start(state, project, list(new))
        embed_pass.add_samples(r, project, list(new), settings=settings)
        cold_start.maybe_enqueue(r, project, settings=settings)
    return ids


def import_dataset(project: Project, request: ImportRequest, *, store: ObjectStore, r: redis.Redis,
                   settings: Settings) -> ImportResult:
    """Add a built-in dataset or a server-side ImageFolder to the project, with a stratified test split.

    The split is drawn over the whole dataset by split_seed (the in-process simulate loop draws
    the same one), so a sample's split never depends on `limit` or on the project's classes.
    `limit` takes a seeded random subset (a prefix of the same permutation for every limit),
    not the first files, which would be one class. Re-importing adds only what is new.
    """
    import numpy as np

    from .data import load_dataset, stratified_split

    manifest = load_dataset(request.dataset, store=store, cache_dir=settings.data_dir / "datasets")
    known = [s for s in manifest.samples if s.label is not None]
    is_test = stratified_split([s.label for s in known], test_fraction=request.test_fraction,
                               seed=request.split_seed)
    order: Iterable[int] = range(len(known))
    if request.limit and request.limit < len(known):
        rng = np.random.default_rng(request.split_seed)
        order = sorted(int(i) for i in rng.permutation(len(known))[:request.limit])
    classes = set(project.classes)
    other_classes: Counter[str] = Counter()
    chosen: list[SampleRecord] = []
    for i in order:
        sample = known[i]
        if sample.label not in classes:
            other_classes[sample.label] += 1
            continue
        chosen.append(SampleRecord(id=sample.id, name=sample.name, label=sample.label,
                                   split="test" if is_test[i] else "pool"))
    if not chosen:
        raise Invalid(f"dataset {manifest.name!r} has no images of the classes of project {project.name!r} "
                      f"({', '.join(project.classes)}); its classes are {', '.join(manifest.classes)}")
    skipped = [f"class {c!r} is not a class of the project: {n} images" for c, n in sorted(other_classes.items())]
    skipped += list(manifest.skipped)

    state = ProjectState(r, project.name)
    splits: list[str | None] = []
    for chunk in in_chunks([s.id for s in chosen]):
        splits.extend(state.sample_splits(chunk))
    new = [s for s, split in zip(chosen, splits, strict=True) if split is None]
    project = resolve_auto_model(project, [s.id for s in new], store=store, r=r)
    batch = records.write_sample_batch(store, project.name, new) if new else None
    for chunk in in_chunks(new):
        state.add_samples([(s.id, s.split, s.label) for s in chunk])
    if batch:
        state.count_applied()
    _seed_cold_start(state, project, [s.id for s in new if s.split == "pool"])
    embed_pass.add_samples(r, project, [s.id for s in new], settings=settings)
    cold_start.maybe_enqueue(r, project, settings=settings)
    return ImportResult(dataset=manifest.name, pool=sum(s.split == "pool" for s in new),
                        test=sum(s.split == "test" for s in new), already_present=len(chosen) - len(new),
                        skipped=skipped, batch=batch)


def sample_image(project: Project, sample_id: str, *, store: ObjectStore, r: redis.Redis) -> tuple[bytes, str]:
    """(bytes, content type) of a sample's image; NotFound when the project has no such sample."""
    if ProjectState(r, project.name).sample_split(sample_id) is None:
        raise NotFound(f"sample {sample_id!r} not found in project {project.name!r}")
    data = records.read_image(store, sample_id)
    return data, image_mime(data)


# --- queries and labels ------------------------------------------------------------------------------


def lease_queries(project: Project, *, n: int, labeler: str, ttl_s: float, r: redis.Redis,
                  now: float | None = None) -> QueryOut:
    """The next n samples of the live ranking, leased to the caller under one new token."""
    now = time.time() if now is None else now
    token = secrets.token_urlsafe(16)  # no spaces: the lease owner is stored as "<token> <labeler>"
    # The version, the samples and the guesses come from one atomic read: never from two rankings.
    # Guesses are of ranked samples only: a random fill-in (score None) was not scored by this model.
    answer = ProjectState(r, project.name).lease_ranked(n, token=token, labeler=labeler, ttl_s=ttl_s, now=now)
    return QueryOut(model_version=answer.version, lease_token=token, expires_at=now + ttl_s,
                    samples=[QuerySample(sample_id=sid, score=score, image_url=image_url(project.name, sid),
                                         guess=_guess(project, found if answer.version else None))
                             for sid, score, found in answer.samples])


def release_leases(project: Project, body: LeaseRelease, *, r: redis.Redis) -> LeaseReleaseResult:
    """Hand leased samples back to the pool at once; only the caller's own leases under that token."""
    state = ProjectState(r, project.name)
    released = state.release(list(dict.fromkeys(body.sample_ids)), token=body.lease_token,
                             labeler=body.labeler or ANONYMOUS_LABELER)
    return LeaseReleaseResult(released=released)


def _guess(project: Project, found: tuple[int, float] | None) -> Guess | None:
    """A stored guess (class index, probability) as an answer; None where there is none or it is not a class."""
    if found is None or not 0 <= found[0] < len(project.classes):
        return None
    return Guess(label=project.classes[found[0]], confidence=min(1.0, max(0.0, found[1])))


def model_guesses(state: ProjectState, project: Project, version: int | None,
                  sample_ids: list[str]) -> list[Guess | None]:
    """The served ranking's model's guess for each sample; None before the first model or where unscored."""
    if not version or not sample_ids:
        return [None] * len(sample_ids)
    return [_guess(project, found) for found in state.guesses(version, sample_ids)]


def submit_labels(project: Project, batch: LabelBatch, *, store: ObjectStore, r: redis.Redis,
                  settings: Settings, now: float | None = None, honor_leases: bool = True) -> LabelResult:
    """Validate every label, append the new ones to the label log (durable), then update Redis.

    All or nothing: one bad item rejects the batch before anything is written. Every labeler has
    one vote per sample: a label equal to the labeler's own vote, or repeated in the batch, is a
    no-op; a different one replaces its vote. The project's label_policy makes the training label
    of the votes. Returns only once the batch is durable and applied. honor_leases=False takes labels
    made outside alpipe's leases (Label Studio's annotations) even on samples leased to someone.
    """
    now = _log_time(now)
    labeler = batch.labeler or ANONYMOUS_LABELER
    state = ProjectState(r, project.name, label_policy=project.label_policy)
    wanted: dict[str, str] = {}
    tokens: dict[str, str | None] = {}
    repeated = 0
    for item in batch.labels:
        previous = wanted.get(item.sample_id)
        if previous is not None:
            if previous != item.label:
                raise Invalid(f"sample {item.sample_id!r} appears twice in the batch with different labels "
                              f"({previous!r} and {item.label!r})")
            repeated += 1
            continue
        wanted[item.sample_id] = item.label
        tokens[item.sample_id] = item.lease_token
    ids = list(wanted)

    # One round trip reads what the checks below need: splits, leases, votes.
    check = state.check_labels(ids, now=now)
    splits = check.splits
    unknown = [sid for sid, split in zip(ids, splits, strict=True) if split is None]
    if unknown:  # the project (the URL) is there: a body naming what it does not have is unprocessable
        raise Invalid(f"sample {_name_list(unknown)} not found in project {project.name!r}")
    in_test = [sid for sid, split in zip(ids, splits, strict=True) if split == "test"]
    if in_test:
        raise Invalid(f"sample {_name_list(in_test)} is in the test split; test samples keep their known "
                      "label and cannot be labeled")
    classes = set(project.classes)
    bad = [f"{wanted[sid]!r} (sample {sid!r})" for sid in ids if wanted[sid] not in classes]
    if bad:
        raise Invalid(f"label {', '.join(bad[:5])} is not a class of project {project.name!r}; "
                      f"allowed: {', '.join(project.classes)}")
    holders = check.holders if honor_leases else [None] * len(ids)
    taken = [(sid, holder[1]) for sid, holder in zip(ids, holders, strict=True)
             if holder is not None and holder[0] != tokens[sid]]
    if taken:
        sid, labeler = taken[0]
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise Conflict(f"sample {sid!r} is leased to labeler {labeler!r}{more}; send the lease_token you got "
                       "with the query, or wait until the lease expires")

    new = [sid for sid, vote in zip(ids, check.votes, strict=True)
           if (vote.get(labeler) or {}).get("label") != wanted[sid]]
    duplicates = repeated + len(ids) - len(new)
    if not new:
        return LabelResult(accepted=0, duplicates=duplicates, labeled=state.labeled_count())
    batch_id = records.new_batch_id()  # the request's batch; the label-log object its group lands in has its own
    accepted = [LabelRecord(sample_id=sid, label=wanted[sid], labeler=labeler, at=now, batch=batch_id)
                for sid in new]

    def write(group: list[LabelRecord]) -> int:
        """One label-log object for the group (durable), then Redis: its votes and the applied count; then
        a train job if the group made one due (once per group, not once per request)."""
        records.write_label_batch(store, project.name, group)
        labeled = state.apply_labels([rec.model_dump() for rec in group], batches=1)
        trigger_training(r, project, settings=settings, labeled=labeled)
        return labeled

    # Grouped per project and per store and Redis client (one process may serve several of them: tests do).
    labeled = _GROUP_COMMIT.commit((id(store), id(r), project.name), accepted, write)
    return LabelResult(accepted=len(accepted), duplicates=duplicates, labeled=labeled)


def retract_label(project: Project, sample_id: str, *, labeler: str, store: ObjectStore, r: redis.Redis,
                  lease_ttl_s: float, now: float | None = None) -> UndoResult:
    """Withdraw a labeler's own vote on a sample (undo): the retraction goes to the label log, then Redis.

    The training label follows the votes left. A sample left without votes goes back to the
    unlabeled pool, leased at once to the labeler under a new token, so it can be labeled anew.
    NotFound when the labeler has no vote on the sample.
    """
    now = _log_time(now)
    state = ProjectState(r, project.name, label_policy=project.label_policy)
    if state.sample_split(sample_id) is None:
        raise NotFound(f"sample {sample_id!r} not found in project {project.name!r}")
    [votes] = state.votes([sample_id])
    vote = votes.get(labeler)
    if vote is None:
        raise NotFound(f"labeler {labeler!r} has no label on sample {sample_id!r} in project {project.name!r}; "
                       "there is nothing to undo")
    batch_id = records.new_batch_id()
    record = LabelRecord(sample_id=sample_id, label=vote["label"], labeler=labeler, at=now, batch=batch_id,
                         retract=True)
    records.write_label_batch(store, project.name, [record], batch_id=batch_id)
    token = secrets.token_urlsafe(16)
    live = state.live_version()
    # Back in the cold-start ranking at its old place; a model's ranking gets it at the next scoring.
    rank = cold_start_score(project.seed, sample_id) if live == 0 else None
    labeled, [label] = state.apply_votes([record.model_dump()], relet=(token, labeler, now + lease_ttl_s),
                                         rank_score=rank, batches=1)
    leased = label is None and state.lease_holder(sample_id) == (token, labeler)
    return UndoResult(sample_id=sample_id, labeled=labeled, training_label=label,
                      lease_token=token if leased else None)


def trigger_training(r: redis.Redis, project: Project, *, settings: Settings,
                     labeled: int | None = None) -> str | None:
    """Enqueue a train job when query_size new labels arrived (coalesced by the pipeline); its job id.
    labeled: the labeled count, when the caller has it."""
    from .pipeline import maybe_enqueue_train

    return maybe_enqueue_train(r, project, settings=settings, labeled=labeled)


def request_training(r: redis.Redis, project: Project, *, settings: Settings) -> TrainRequestResult:
    """Queue a train job now for any labels the current model has not seen (a partial batch too)."""
    from .pipeline import maybe_enqueue_train

    state = ProjectState(r, project.name)
    labeled = state.counts()["labeled"]
    if labeled > state.model_labels():
        state.request_forced_training(labeled)  # outlives the job: the reconciler re-queues it
    job_id = maybe_enqueue_train(r, project, settings=settings)
    return TrainRequestResult(job_id=job_id, labeled=state.counts()["labeled"], model_labels=state.model_labels())


# --- learning curve ---------------------------------------------------------------------------------


def curve_points(project: Project, *, r: redis.Redis) -> list[dict]:
    """The project's learning curve: one point per model version (CurvePointOut fields)."""
    return ProjectState(r, project.name).curve()


def curve_png(project: Project, points: list[dict]) -> bytes:
    """Test accuracy vs labels as PNG; an empty curve renders as a plot that says so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure without pyplot: no global state, so concurrent requests can draw safely.
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = [p for p in points if p.get("test_accuracy") is not None]  # models without a test split
    if points:
        ns = [p["n_labeled"] for p in points]
        accs = [p["test_accuracy"] for p in points]
        ax.plot(ns, accs, marker="o", linewidth=2, label=f"{project.strategy}, {project.model}")
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no model with a test accuracy yet", ha="center", va="center", transform=ax.transAxes,
                fontsize=14, color="gray")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    ax.set_xlabel("number of labeled images")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{project.name}: test accuracy vs labels")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
