"""Background work of a Label Studio connection, as rq jobs on the score queue (torch-free).

- `labelstudio-sync-<p>`: after /setup (and when its URL or token changes): ingest every task's
  image, give Label Studio's webhook to alpipe its bearer secret, then push predictions.
- `labelstudio-push-<p>-<model version label>`: each time a ranking goes live (and when the
  cold-start order is placed), predictions for every unlabeled task go to Label Studio, then its
  project's model_version is set to that label, so Label Studio's uncertainty sampling
  (`sampling: Uncertainty sampling`) serves tasks in alpipe's order with no "Retrieve
  predictions" click.
"""

from __future__ import annotations

import logging

import redis

from .. import keys
from ..config import Settings
from ..errors import UserError
from ..recovery import load_or_recover
from ..schemas import Project
from ..state import ProjectState
from ..storage import ObjectStore
from ..work import enqueue_unless_pending
from . import links
from .client import LabelStudioClient
from .links import ANNOTATIONS, TASKS

log = logging.getLogger(__name__)

# Tasks are ingested in groups of this many: one sample batch and one task-map object each.
INGEST_CHUNK = 200


def enqueue_sync(r: redis.Redis, project: str, *, settings: Settings) -> str | None:
    return enqueue_unless_pending(r, keys.QUEUE_SCORE, keys.JOB_LABELSTUDIO_INGEST, {"project": project},
                                  f"labelstudio-sync-{project}", settings=settings,
                                  description=f"{project}: ingest Label Studio's tasks")


def enqueue_push(store: ObjectStore, r: redis.Redis, project: str, *, settings: Settings) -> str | None:
    """Queue pushing the live ranking's predictions when the project is connected to Label Studio."""
    if not links.is_linked(store, r, project):
        return None
    from .backend import model_version_label

    label = model_version_label(ProjectState(r, project))
    return enqueue_unless_pending(r, keys.QUEUE_SCORE, keys.JOB_LABELSTUDIO_PUSH, {"project": project},
                                  f"labelstudio-push-{project}-{label}", settings=settings,
                                  description=f"{project}: push {label} predictions to Label Studio")


def secure_webhooks(client: LabelStudioClient, link: links.LabelStudioLink) -> int:
    """Give Label Studio's webhooks to alpipe (the one it made for the ML backend, at <model URL>/webhook)
    the bearer secret alpipe checks; returns how many it changed."""
    backends = client.request("GET", "/api/ml/", params={"project": link.ls_project}).json()
    targets = {str(b.get("url", "")).rstrip("/") + "/webhook" for b in backends}
    header = f"Bearer {link.webhook_secret}"
    changed = 0
    for hook in client.webhooks(link.ls_project):
        if hook.get("url", "").rstrip("/") in targets and (hook.get("headers") or {}).get("Authorization") != header:
            client.update_webhook(hook["id"], headers={**(hook.get("headers") or {}), "Authorization": header})
            changed += 1
    return changed


def sync_project(project_name: str, *, r: redis.Redis, store: ObjectStore, settings: Settings) -> dict:
    """Ingest the images of every task alpipe has not seen, secure the webhook, push predictions."""
    from .backend import ensure_samples

    link = links.read_link(store, project_name)
    if link is None:
        return {"project": project_name, "status": "not connected"}
    project = load_or_recover(r, store, project_name, settings=settings)
    with LabelStudioClient(link.url, link.token) as client:
        secured = secure_webhooks(client, link)
        tasks = client.tasks(link.ls_project)
        known = links.lookup(store, r, project_name, TASKS, [t["id"] for t in tasks])
        new = [t for t, sample in zip(tasks, known, strict=True) if sample is None]
        failed: dict[int, str] = {}
        for start in range(0, len(new), INGEST_CHUNK):
            chunk = new[start:start + INGEST_CHUNK]
            try:
                ensure_samples(project, link, chunk, store=store, r=r, settings=settings, client=client)
            except Exception:
                # One bad task must not keep the others out: this group goes again task by task.
                for task in chunk:
                    try:
                        ensure_samples(project, link, [task], store=store, r=r, settings=settings, client=client)
                    except Exception as e:
                        failed[task["id"]] = f"{e.__class__.__name__}: {e}"
        if failed:
            log.warning("%s: %d Label Studio tasks have no usable image, e.g. %s", project_name, len(failed),
                        next(iter(failed.items())))
        caught_up = catch_up_annotations(project, link, tasks, client=client, store=store, r=r, settings=settings)
        pushed = push_predictions(project_name, r=r, store=store, settings=settings, client=client,
                                  tasks=[t["id"] for t in new if t["id"] not in failed])
    return {"project": project_name, "tasks": len(tasks), "ingested": len(new) - len(failed),
            "failed": len(failed), "webhooks_secured": secured, "annotations": caught_up, "pushed": pushed}


def catch_up_annotations(project: Project, link: links.LabelStudioLink, tasks: list[dict], *,
                         client: LabelStudioClient, store: ObjectStore, r: redis.Redis, settings: Settings) -> dict:
    """Every annotation Label Studio has, as votes; the votes of annotations it no longer has, withdrawn.

    Label Studio sends each webhook once and drops it when the call fails (alpipe restarting, a
    one-second timeout), so the sync job reconciles from Label Studio's own records. Idempotent: a
    vote already there is a no-op. Nothing is withdrawn unless every task's annotations were read.
    """
    from .backend import apply_annotation, withdraw_annotations

    present: set[int] = set()
    voting: set[str] = set()  # "<sample> <labeler>" of the votes present annotations make
    labeled = refused = 0
    for task in tasks:
        if task.get("total_annotations", 1) == 0 and task.get("cancelled_annotations", 1) == 0:
            continue
        for annotation in client.annotations(task["id"]):
            present.add(annotation["id"])
            try:
                result = apply_annotation(project, link, annotation, task, store=store, r=r, settings=settings)
                if result["status"] == "labeled":
                    voting.add(result["vote"])
                    labeled += result["accepted"]
            except UserError as e:
                refused += 1
                log.warning("%s: Label Studio annotation %s not taken: %s", project.name, annotation["id"], e)
    gone = [i for i in links.entries(store, r, project.name, ANNOTATIONS) if i not in present]
    withdrawn = withdraw_annotations(project, gone, store=store, r=r, keep=voting)["withdrawn"] if gone else 0
    return {"new_votes": labeled, "refused": refused, "withdrawn": withdrawn}


def _pushed_key(project: str) -> str:
    return keys.redis_key(project, "labelstudio", "pushed")


def push_predictions(project_name: str, *, r: redis.Redis, store: ObjectStore, settings: Settings,
                     client: LabelStudioClient | None = None, tasks: list[int] | None = None) -> dict:
    """Predictions of the live ranking for every unlabeled task, then Label Studio's model_version.

    Once a model version's predictions are there, only `tasks` (newly ingested ones) are pushed
    under it: each task gets one prediction per version, never two.
    """
    from .backend import model_version_label, predictions_for

    link = links.read_link(store, project_name)
    if link is None:
        return {"status": "not connected"}
    project = load_or_recover(r, store, project_name, settings=settings)
    state = ProjectState(r, project_name)
    label = model_version_label(state)
    pushed = r.get(_pushed_key(project_name))
    every = pushed is None or pushed.decode() != label
    if not every and not tasks:
        return {"model_version": label, "predictions": 0}
    mapped = links.entries(store, r, project_name, TASKS)
    wanted = sorted(mapped) if every else sorted(set(tasks or []) & set(mapped))
    labeled = set(state.labels())
    unlabeled = [(task, mapped[task]) for task in wanted if mapped[task] not in labeled]
    label, rows = predictions_for(project, link, [sample for _, sample in unlabeled], r=r)
    predictions = [{"task": task, "result": row["result"], "score": row["score"], "model_version": label}
                   for (task, _), row in zip(unlabeled, rows, strict=True)]
    own_client = client is None
    client = client or LabelStudioClient(link.url, link.token)
    try:
        created = client.import_predictions(link.ls_project, predictions) if predictions else 0
        # Label Studio refuses a model_version no prediction has; and a newer ranking's push sets its own.
        if every and predictions and model_version_label(state) == label:
            client.set_model_version(link.ls_project, label)
    finally:
        if own_client:
            client.close()
    r.set(_pushed_key(project_name), label)
    log.info("%s: %d predictions of %s pushed to Label Studio project %d", project_name, created, label,
             link.ls_project)
    return {"model_version": label, "predictions": created}
