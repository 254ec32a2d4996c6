"""Label Studio's ML-backend protocol, served from alpipe's live state: /setup, /predict, /webhook.

Label Studio calls these (alpipe's API routes them under /labelstudio). Nothing here runs a model:
/predict reads the live ranking and the guesses the scorers stored with it, and training happens
as for any alpipe project, in the trainer, every query_size new labels.

- /setup connects a Label Studio project to an alpipe project (created from the label config's
  classes), remembers where Label Studio is, and queues the sync job (alpipe.labelstudio.sync)
  that ingests the tasks' images and pushes predictions.
- /webhook turns annotations into votes: the annotator is the Label Studio user
  (`labelstudio:<user id>`), one vote per user and image as with POST /labels; a skipped
  (cancelled) annotation is no label, and deleting or cancelling an annotation withdraws its vote.
- /predict answers, per task, alpipe's guess and a score that orders tasks as alpipe ranks them
  (`prediction_scores`).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import projects, records
from ..config import Settings
from ..errors import NotFound
from ..projects import Conflict, Invalid, NotAnImage
from ..recovery import load_or_recover
from ..schemas import LabelBatch, LabelIn, Project, ProjectCreate
from ..state import ProjectState
from ..storage import ObjectStore
from ..strategies import get_strategy
from . import links, sync
from .client import LabelStudioClient
from .label_config import parse_label_config
from .links import ANNOTATIONS, TASKS, LabelStudioLink

log = logging.getLogger(__name__)

ANNOTATOR_PREFIX = "labelstudio:"
ANNOTATION_CREATED, ANNOTATION_UPDATED = "ANNOTATION_CREATED", "ANNOTATION_UPDATED"
ANNOTATIONS_CREATED, ANNOTATIONS_DELETED = "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED"
START_TRAINING, TASKS_CREATED = "START_TRAINING", "TASKS_CREATED"
HANDLED_ACTIONS = (ANNOTATION_CREATED, ANNOTATION_UPDATED, ANNOTATIONS_CREATED, ANNOTATIONS_DELETED, START_TRAINING,
                   TASKS_CREATED)
# New tasks a /predict call ingests itself (fetching each image from Label Studio); more go to the sync job.
INLINE_INGEST = 100
# extra_params keys that configure the connection rather than the alpipe project.
_CONNECTION_PARAMS = ("alpipe_project", "label_studio_url", "label_studio_token")


# Label Studio names a project '<id>.<creation time>'.
PROJECT_UID = r"^[0-9]+(\.[0-9]*)?$"


class SetupRequest(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    project: str = Field(pattern=PROJECT_UID, description="'<id>.<creation time>' of the Label Studio project")
    label_config: str = Field(alias="schema", description="the project's label config (XML)")
    hostname: str | None = Field(None, description="where Label Studio says it is")
    access_token: str | None = Field(None, description="the legacy API token of the project's creator")
    extra_params: dict[str, Any] | str | None = Field(
        None, description="JSON: alpipe_project (its name), label_studio_url, label_studio_token, and any "
                          "field of a project (strategy, query_size, model...)")


class Task(BaseModel):
    """A Label Studio task as /predict and webhooks send it (only id and data matter here)."""

    model_config = ConfigDict(extra="allow")

    id: int
    data: dict[str, Any] | None = Field(None, description="the task's data: {<image field>: URL, ...}")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    tasks: list[Task] = Field(description="Label Studio tasks: {id, data: {<image field>: URL}}")
    project: str = Field(pattern=PROJECT_UID, description="'<id>.<creation time>' of the Label Studio project")


class TrainRequest(BaseModel):
    """What Label Studio versions before START_TRAINING webhooks POST to /train."""

    model_config = ConfigDict(extra="allow")

    project: str = Field(pattern=PROJECT_UID, description="'<id>.<creation time>' of the Label Studio project")


class WebhookEvent(BaseModel):
    model_config = ConfigDict(extra="allow")

    action: str
    project: dict[str, Any] | None = None
    # One annotation and its task; ANNOTATIONS_CREATED (bulk) sends lists under the same keys.
    annotation: dict[str, Any] | list[dict[str, Any]] | None = None
    annotations: list[dict[str, Any]] | None = Field(None, description="ANNOTATIONS_DELETED: [{id}, ...]")
    task: dict[str, Any] | list[dict[str, Any]] | None = None


# --- helpers ----------------------------------------------------------------------------------------


def parse_project_uid(uid: str | int | None) -> tuple[int, str]:
    """(id, creation stamp) of Label Studio's '<id>.<stamp>' (a bare id has no stamp)."""
    head, _, stamp = str(uid if uid is not None else "").partition(".")
    if not head.isdigit():
        raise Invalid(f"project must be Label Studio's '<id>.<created>' (e.g. '3.1764629412'), got {uid!r}")
    return int(head), stamp


def model_version_label(state: ProjectState) -> str:
    """The name Label Studio sees for alpipe's live ranking: 'alpipe-v<N>'; before the first model,
    'alpipe-v0' for the random order and 'alpipe-v0-n<pool>' once a TypiClust order is at its top."""
    live = state.live_version() or 0
    if live > 0:
        return f"alpipe-v{live}"
    ordered = state.cold_start_ordered()
    return f"alpipe-v0-n{ordered}" if ordered else "alpipe-v0"


def prediction_scores(state: ProjectState, project: Project, version: int, sample_ids: list[str]) -> list[float]:
    """Label Studio's score of each sample: lowest first is alpipe's ranking order.

    For strategies whose score is an uncertainty in [0, 1] (margin, least confidence, entropy, BALD),
    the score is 1 - that: the model's confidence (for margin, the gap between its two best classes).
    Otherwise (random, power_margin's sampled keys, auto, whose representative picks are lifted above 1,
    the cold-start order) it is the sample's place in the ranking divided by the ranking's size. A sample outside
    the ranking (labeled, or not in a pool_size subsample) scores 1.
    """
    places, size = state.ranking_places(version, sample_ids)
    confidence = version > 0 and get_strategy(project.strategy).confidence_scores
    out = []
    for place in places:
        if place is None:
            out.append(1.0)
        elif confidence:
            out.append(round(min(1.0, max(0.0, 1.0 - place[0])), 6))
        else:
            out.append(round(place[1] / max(size, 1), 6))
    return out


def _extra_params(raw: dict | str | None) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise Invalid(f"extra_params must be a JSON object: {e}") from None
    if not isinstance(raw, dict):
        raise Invalid(f"extra_params must be a JSON object, got {type(raw).__name__}")
    return dict(raw)


def _link_of(store: ObjectStore, r: redis.Redis, ls_project: int) -> LabelStudioLink:
    link = links.linked_project(store, r, ls_project)
    if link is None:
        raise NotFound(f"Label Studio project {ls_project} is not connected to alpipe: add alpipe as its model "
                       "(Settings > Model > Connect Model) so that /setup runs first")
    return link


def _user_id(completed_by: Any) -> str:
    value = completed_by.get("id") if isinstance(completed_by, dict) else completed_by
    if value is None or str(value) == "":
        raise Invalid("the annotation has no completed_by (the Label Studio user who made it)")
    return str(value)


def _task_id(task: dict) -> int:
    value = task.get("id")
    if not isinstance(value, int) or isinstance(value, bool):
        raise Invalid(f"a task needs an integer id, got {value!r}")
    return value


# --- setup ------------------------------------------------------------------------------------------


def _project_for(name: str, classes: list[str], extra: dict[str, Any], ls: tuple[int, str], *,
                 store: ObjectStore, r: redis.Redis, settings: Settings) -> Project:
    """The alpipe project `name`: created with the config's classes, or an existing one with the same
    classes that no other Label Studio project is connected to."""
    try:
        project = load_or_recover(r, store, name, settings=settings)
    except NotFound:
        try:
            body = ProjectCreate(name=name, classes=classes, **extra)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
            raise Invalid(f"extra_params or the project name do not make a valid alpipe project: {problems}") from None
        except TypeError as e:
            raise Invalid(f"extra_params: {e}") from None
        try:
            return projects.create_project(body, store=store, r=r)
        except Conflict:
            return load_or_recover(r, store, name, settings=settings)  # a concurrent /setup made it
    if sorted(project.classes) != sorted(classes):
        raise Conflict(f"alpipe project {name!r} has the classes {', '.join(project.classes)}, the label config "
                       f"{', '.join(classes)}; connect another alpipe project (extra_params "
                       '{"alpipe_project": "<new name>"}) or make them equal')
    existing = links.read_link(store, name)
    if existing is not None and (existing.ls_project, existing.ls_created) != ls:
        raise Conflict(f"alpipe project {name!r} serves Label Studio project {existing.ls_project} (created "
                       f"{existing.ls_created}); connect another alpipe project (extra_params "
                       '{"alpipe_project": "<new name>"})')
    return project


def setup(body: SetupRequest, *, store: ObjectStore, r: redis.Redis, settings: Settings) -> dict[str, str]:
    """Connect (or reconnect) a Label Studio project; {'model_version': ...}. Cheap when nothing changed."""
    ls_project, created = parse_project_uid(body.project)
    config = parse_label_config(body.label_config)
    extra = _extra_params(body.extra_params)
    connection = {k: extra.pop(k) for k in _CONNECTION_PARAMS if k in extra}
    url = str(connection.get("label_studio_url") or settings.label_studio_url or body.hostname or "").rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise Invalid(f"alpipe cannot tell where Label Studio is (hostname {body.hostname!r}): set LABEL_STUDIO_HOST "
                      "for Label Studio, ALPIPE_LABEL_STUDIO_URL for alpipe, or extra_params label_studio_url")
    token = str(connection.get("label_studio_token") or settings.label_studio_token or body.access_token or "")
    name = str(connection.get("alpipe_project") or f"label-studio-{ls_project}")
    current = links.linked_project(store, r, ls_project)
    if current is not None and current.project == name and current.ls_created == created:
        project = load_or_recover(r, store, name, settings=settings)
        if sorted(config.classes) != sorted(project.classes):
            raise Conflict(f"the label config's classes ({', '.join(config.classes)}) are no longer those of alpipe "
                           f"project {name!r} ({', '.join(project.classes)}); an alpipe project keeps its "
                           'classes: connect a new one with extra_params {"alpipe_project": "<new name>"}')
        update = {"url": url, "token": token, "data_key": config.data_key, "image_name": config.image_name,
                  "choices_name": config.choices_name}
        if any(getattr(current, k) != v for k, v in update.items()):
            links.write_link(store, r, current.model_copy(update=update))
            sync.enqueue_sync(r, name, settings=settings)
    else:
        project = _project_for(name, config.classes, extra, (ls_project, created), store=store, r=r,
                               settings=settings)
        link = LabelStudioLink(project=name, ls_project=ls_project, ls_created=created, url=url, token=token,
                               data_key=config.data_key, image_name=config.image_name,
                               choices_name=config.choices_name, classes=list(project.classes),
                               webhook_secret=secrets.token_urlsafe(24), linked_at=time.time())
        links.write_link(store, r, link)
        if current is not None and current.project != name:
            records.delete_labelstudio_link(store, current.project)  # moved to another alpipe project
        log.info("Label Studio project %d (%s) is connected to alpipe project %s", ls_project, url, name)
        sync.enqueue_sync(r, name, settings=settings)
    return {"model_version": model_version_label(ProjectState(r, name))}


# --- tasks -> samples -------------------------------------------------------------------------------


def ensure_samples(project: Project, link: LabelStudioLink, tasks: list[dict], *, store: ObjectStore,
                   r: redis.Redis, settings: Settings, client: LabelStudioClient | None = None) -> list[str]:
    """The sample of each task; tasks not seen before have their image fetched from Label Studio and added
    to the pool first (all or nothing: a task without a usable image fails the call before anything is added)."""
    ids = [_task_id(t) for t in tasks]
    known = links.lookup(store, r, project.name, TASKS, ids)
    missing = {i: t for i, t, s in zip(ids, tasks, known, strict=True) if s is None}
    if not missing:
        return [s for s in known if s is not None]
    own_client = client is None
    client = client or LabelStudioClient(link.url, link.token)
    try:
        images = []
        for task_id, task in missing.items():
            data = task.get("data")
            if data is None:
                data = client.task(task_id).get("data") or {}
            url = data.get(link.data_key) if isinstance(data, dict) else None
            if not isinstance(url, str) or not url:
                raise Invalid(f"task {task_id} has no image in data.{link.data_key} (the <Image value="
                              f'"${link.data_key}"> of the label config)')
            content = client.image(task_id, url)
            try:
                projects.sniff_image(content)
            except NotAnImage as e:
                raise NotAnImage(f"task {task_id}: {url} is not an image: {e}") from None
            images.append((content, f"labelstudio-task-{task_id}"))
    finally:
        if own_client:
            client.close()
    sample_ids = projects.add_pool_images(project, images, store=store, r=r, settings=settings)
    links.remember(store, r, project.name, TASKS, zip(missing, sample_ids, strict=True))
    fetched = dict(zip(missing, sample_ids, strict=True))
    return [s if s is not None else fetched[i] for i, s in zip(ids, known, strict=True)]


# --- predict ----------------------------------------------------------------------------------------


def predictions_for(project: Project, link: LabelStudioLink, sample_ids: list[str], *,
                    r: redis.Redis) -> tuple[str, list[dict]]:
    """(model_version label, [{result, score}] per sample) from the live ranking and its guesses."""
    state = ProjectState(r, project.name)
    version = state.live_version() or 0
    label = model_version_label(state)
    scores = prediction_scores(state, project, version, sample_ids)
    guesses = projects.model_guesses(state, project, version, sample_ids)
    config = link.config
    out = [{"result": config.result(guess.label) if guess is not None else [], "score": score}
           for guess, score in zip(guesses, scores, strict=True)]
    return label, out


def predict(body: PredictRequest, *, store: ObjectStore, r: redis.Redis, settings: Settings) -> dict:
    """One result per task, in order. Up to INLINE_INGEST new tasks are ingested in the request; more (a
    "Retrieve predictions" over a new project) go to the sync job, and get an empty result and score 1
    until alpipe pushes theirs."""
    if not body.tasks:
        return {"results": []}
    link = _link_of(store, r, parse_project_uid(body.project)[0])
    project = load_or_recover(r, store, link.project, settings=settings)
    given = [t.model_dump() for t in body.tasks]
    ids = [_task_id(t) for t in given]
    known = links.lookup(store, r, project.name, TASKS, ids)
    if sum(s is None for s in known) > INLINE_INGEST:
        sync.enqueue_sync(r, project.name, settings=settings)
        tasks = [t for t, s in zip(given, known, strict=True) if s is not None]
    else:
        tasks = given
    sample_ids = dict(zip([_task_id(t) for t in tasks],
                          ensure_samples(project, link, tasks, store=store, r=r, settings=settings), strict=True))
    label, rows = predictions_for(project, link, list(sample_ids.values()), r=r)
    by_task = dict(zip(sample_ids, rows, strict=True))
    results = [by_task.get(i, {"result": [], "score": 1.0}) for i in ids]
    return {"results": [{**row, "model_version": label} for row in results], "model_version": label}


# --- webhook ----------------------------------------------------------------------------------------


def _withdraw(project: Project, sample_id: str, labeler: str, *, store: ObjectStore, r: redis.Redis) -> bool:
    try:
        projects.retract_label(project, sample_id, labeler=labeler, store=store, r=r, lease_ttl_s=0)
        return True
    except NotFound:
        return False  # no vote of that user on it: nothing to withdraw


def apply_annotation(project: Project, link: LabelStudioLink, annotation: dict | None, task: dict | None, *,
                     store: ObjectStore, r: redis.Redis, settings: Settings) -> dict:
    """One Label Studio annotation as the vote of its user (idempotent: applying it again changes nothing)."""
    if not isinstance(annotation, dict) or not isinstance(annotation.get("id"), int):
        raise Invalid("an annotation event needs the annotation ({id, result, completed_by, task}); "
                      "register the webhook with send_payload on")
    task = task if isinstance(task, dict) and "id" in task else {"id": annotation.get("task")}
    labeler = ANNOTATOR_PREFIX + _user_id(annotation.get("completed_by"))
    cancelled = bool(annotation.get("was_cancelled"))
    label = None if cancelled else link.config.label_of(annotation.get("result") or [])
    [sample_id] = ensure_samples(project, link, [task], store=store, r=r, settings=settings)
    # Remembered before the vote: a later ANNOTATIONS_DELETED names only the annotation's id.
    entry = f"{sample_id} {labeler}"
    if links.lookup(store, r, project.name, ANNOTATIONS, [annotation["id"]]) != [entry]:
        links.remember(store, r, project.name, ANNOTATIONS, [(annotation["id"], entry)])
    if label is None:
        withdrawn = _withdraw(project, sample_id, labeler, store=store, r=r)
        return {"status": "skipped" if cancelled else "no choice", "sample_id": sample_id, "withdrawn": withdrawn}
    batch = LabelBatch(labeler=labeler, labels=[LabelIn(sample_id=sample_id, label=label)])
    result = projects.submit_labels(project, batch, store=store, r=r, settings=settings, honor_leases=False)
    return {"status": "labeled", "sample_id": sample_id, "label": label, "labeler": labeler, "vote": entry,
            "accepted": result.accepted, "labeled": result.labeled}


def withdraw_annotations(project: Project, ids: list[int], *, store: ObjectStore, r: redis.Redis,
                         keep: set[str] = frozenset()) -> dict:
    """The votes of deleted annotations, withdrawn; `keep`: "<sample> <labeler>" votes that another
    annotation still makes."""
    withdrawn = unknown = 0
    for value in links.lookup(store, r, project.name, ANNOTATIONS, ids):
        if value is None:
            unknown += 1  # never seen by alpipe (made before it was connected, or skipped)
            continue
        if value in keep:
            continue
        sample_id, _, labeler = value.partition(" ")
        withdrawn += _withdraw(project, sample_id, labeler, store=store, r=r)
    return {"withdrawn": withdrawn, "unknown": unknown}


def webhook(event: WebhookEvent, *, store: ObjectStore, r: redis.Redis, settings: Settings) -> dict:
    """Apply one Label Studio event; events alpipe does not use answer {'status': 'ignored'}."""
    if event.action not in HANDLED_ACTIONS:
        return {"status": "ignored", "action": event.action}
    link = webhook_link(event, store=store, r=r)
    project = load_or_recover(r, store, link.project, settings=settings)
    if event.action == START_TRAINING:
        # Label Studio drops a webhook call that fails: catching up with its annotations is part of training.
        sync.enqueue_sync(r, project.name, settings=settings)
        result = projects.request_training(r, project, settings=settings)
        return {"status": "queued" if result.job_id else "not queued", **result.model_dump()}
    if event.action == TASKS_CREATED:
        return {"status": "syncing", "job_id": sync.enqueue_sync(r, project.name, settings=settings)}
    if event.action == ANNOTATIONS_DELETED:
        ids = [a.get("id") for a in event.annotations or [] if isinstance(a, dict)]
        if not ids or not all(isinstance(i, int) for i in ids):
            raise Invalid("ANNOTATIONS_DELETED needs annotations: [{id}, ...]")
        return {"status": "deleted", **withdraw_annotations(project, ids, store=store, r=r)}
    if event.action == ANNOTATIONS_CREATED:
        items = event.annotation if isinstance(event.annotation, list) else [event.annotation]
        tasks = {t.get("id"): t for t in (event.task if isinstance(event.task, list) else [event.task]) if t}
        applied = [apply_annotation(project, link, a, tasks.get(a.get("task")) if isinstance(a, dict) else None,
                                    store=store, r=r, settings=settings) for a in items]
        return {"status": "applied", "labeled": sum(a["status"] == "labeled" for a in applied)}
    if isinstance(event.annotation, list) or isinstance(event.task, list):
        raise Invalid(f"{event.action} carries one annotation and its task, not lists")
    return apply_annotation(project, link, event.annotation, event.task, store=store, r=r, settings=settings)


def webhook_link(event: WebhookEvent, *, store: ObjectStore, r: redis.Redis) -> LabelStudioLink:
    """The connection an event belongs to (by its project's id)."""
    project = event.project if isinstance(event.project, dict) else {}
    ls_project = project.get("id")
    if not isinstance(ls_project, int):
        raise Invalid(f"{event.action} needs project: {{id, ...}} (Label Studio sends it with send_payload on)")
    return _link_of(store, r, ls_project)


def train(body: TrainRequest, *, store: ObjectStore, r: redis.Redis, settings: Settings) -> dict:
    """Older Label Studio versions POST /train instead of a START_TRAINING webhook."""
    ls_project, _ = parse_project_uid(body.project)
    link = _link_of(store, r, ls_project)
    project = load_or_recover(r, store, link.project, settings=settings)
    result = projects.request_training(r, project, settings=settings)
    return {"status": "queued" if result.job_id else "not queued", **result.model_dump()}

