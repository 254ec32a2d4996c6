"""The trainer's core: retrain a project on all its labels and publish model version N+1.

Collaborators come in as keyword arguments; services/trainer/jobs.py builds them once per process.

Order of a round, which is what makes a crash anywhere harmless:
1. take the project's train lock (its TTL is this trainer's heartbeat), then free the train slot so
   labels arriving from now on can queue the next round;
2. snapshot labels; no-op when fewer than query_size arrived since the current model;
3. train (warm-started from the current checkpoint unless the project says otherwise), evaluate;
4. write checkpoint vN with put_if_absent at N = 1 + the highest version seen anywhere, so no
   version is ever overwritten and versions only grow; then its metrics;
5. only then move the pointer (object store, then Redis), never backwards;
6. fan out the scoring of vN, release the lock, and queue the next round if labels came meanwhile.
A trainer killed before 5 leaves the pointer where it was (at most an unreferenced, complete
checkpoint); the reconciler notices the lapsed lock and queues the round again. Killed between 5
and 6, the reconciler fans out the scoring of the current model itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import redis
import torch

from . import records
from .checkpoints import checkpoint_bytes, read_checkpoint
from .config import Settings
from .embeddings import BackboneIdentity, EmbeddingCache, build_head, load_backbone
from .image_probe import image_kind
from .model_specs import model_spec, project_uses_embeddings
from .models import ModelSpec, build_model, model_in_channels
from .pipeline import enqueue_scoring, maybe_enqueue_train, train_due, train_lock
from .schemas import CurvePointOut, Project, class_index
from .state import ProjectState
from .storage import ObjectStore
from .tensor_cache import TensorCache
from .training import TrainConfig, checkpoint_config, evaluate, fit, make_checkpoint, round_seed

log = logging.getLogger(__name__)


def train_config(project: Project, *, has_test: bool) -> TrainConfig:
    """The project's TrainOptions as a TrainConfig; 'test' holdout falls back to labels without a test split."""
    config = TrainConfig(**project.training.model_dump())
    if config.holdout == "test" and not has_test:
        log.warning("%s: holdout 'test' but the test split has no labels; using a split of the labels",
                    project.name)
        config = replace(config, holdout="labeled")
    return config


def dataset_channels(store: ObjectStore, ids: list[str]) -> int:
    """1 when every image is grayscale, else 3 (read from the image headers)."""
    grayscale, _ = image_kind(store, ids, limit=len(ids))
    return 1 if grayscale else 3


def _split(labels: dict[str, str], classes: list[str], *, project: str, what: str) -> tuple[list[str], torch.Tensor]:
    index = class_index(classes)
    unknown = sorted({label for label in labels.values() if label not in index})
    if unknown:
        log.warning("%s: ignoring %s labels of unknown classes %s", project, what, unknown)
    ids = sorted(sid for sid, label in labels.items() if label in index)
    return ids, torch.tensor([index[labels[sid]] for sid in ids], dtype=torch.int64)


def train_project(name: str, *, r: redis.Redis, store: ObjectStore, tensors: TensorCache, device: torch.device,
                  settings: Settings, job_id: str | None = None, embeddings: EmbeddingCache | None = None,
                  on_epoch: Callable[[int, float, float | None], None] | None = None) -> dict:
    """One training round of project `name` (see the module docstring); returns what it did.

    job_id is the rq job being run: the train slot is freed only while that job still holds it.
    embeddings: the process's embedding cache (embedding-mode projects); a fresh one if None.
    on_epoch is called after every epoch (logging; tests use it to slow training down).
    """
    embeddings = embeddings if embeddings is not None else EmbeddingCache()
    project = records.read_project(store, name)
    state = ProjectState(r, name)
    lock = train_lock(r, name, ttl_s=settings.heartbeat_ttl_s, job_id=job_id)
    lock.acquire(wait=True)
    try:
        if job_id is not None:
            state.release_train_slot(job_id)
        result = _train_locked(project, state=state, store=store, tensors=tensors, embeddings=embeddings,
                               device=device, settings=settings, on_epoch=on_epoch)
        if result["trained"]:
            result["shards"] = enqueue_scoring(r, store, project, result["version"], settings=settings)
    finally:
        lock.release()
    if result["trained"]:
        # Labels that arrived while this round trained.
        result["next_job"] = maybe_enqueue_train(r, project, settings=settings)
    return result


def _train_locked(project: Project, *, state: ProjectState, store: ObjectStore, tensors: TensorCache,
                  embeddings: EmbeddingCache, device: torch.device, settings: Settings,
                  on_epoch: Callable[[int, float, float | None], None] | None) -> dict:
    name = project.name
    labels = state.labels()
    base = state.model_labels()
    pointer = records.read_pointer(store, name)
    has_model = pointer is not None or state.model_version() > 0
    if not labels or (has_model and not train_due(state, project, labeled=len(labels))):
        log.info("%s: %d labels, %d at the current model: nothing to train", name, len(labels), base)
        return {"project": name, "trained": False, "labeled": len(labels), "model_labels": base}

    train_ids, train_y = _split(labels, project.classes, project=name, what="pool")
    test_ids, test_y = _split(state.test_labels(), project.classes, project=name, what="test")
    if not train_ids:
        raise ValueError(f"{name}: none of the {len(labels)} labels is one of the classes {project.classes}")
    previous = read_checkpoint(store, pointer.key) if pointer else None
    config = train_config(project, has_test=bool(test_ids))
    started = time.perf_counter()
    inputs = _inputs_for(project, train_ids, test_ids, previous, store=store, tensors=tensors,
                         embeddings=embeddings, device=device, settings=settings)
    train_x, train_y = inputs.train_x, train_y[torch.from_numpy(inputs.train_ok)]
    test_x, test_y = inputs.test_x, test_y[torch.from_numpy(inputs.test_ok)]
    if len(train_x) == 0:
        raise ValueError(f"{name}: no usable image among the {len(train_ids)} labeled samples")
    has_test = len(test_x) > 0
    spec, backbone, in_channels = inputs.spec, inputs.backbone, inputs.in_channels
    warm = (config.warm_start and previous is not None and previous["model_name"] == project.model
            and previous["classes"] == project.classes
            and (previous.get("backbone") or {}).get("id") == (backbone.id if backbone else None))
    torch.manual_seed(project.seed)
    if backbone is not None:
        model = build_head(backbone.dim, len(project.classes)).to(device)
    else:
        model = build_model(project.model, len(project.classes), in_channels=in_channels,
                            pretrained=project.pretrained and not warm).to(device)
    if warm:
        model.load_state_dict(previous["model"])
    versions = records.stored_versions(store, name)
    # Versions seen anywhere (pointer, Redis, checkpoint objects): the next one is above all of them.
    floor = max([pointer.version if pointer else 0, state.model_version(), *versions, 0])
    log.info("%s: training v%d+ on %d labels (%d test, %s, %s%s)", name, floor + 1, len(train_x), len(test_x),
             f"warm from v{pointer.version}" if warm else "fresh", config.stop,
             f", head on {backbone.id} embeddings" if backbone else "")

    def epoch_done(epoch: int, loss: float, acc: float | None) -> None:
        log.info("%s: epoch %d loss %.4f%s", name, epoch, loss, "" if acc is None else f" holdout acc {acc:.4f}")
        if on_epoch is not None:
            on_epoch(epoch, loss, acc)
        if settings.test_train_epoch_delay_s > 0:
            time.sleep(settings.test_train_epoch_delay_s)

    fitted = fit(model, train_x, train_y, spec=spec, config=config, device=device,
                 seed=round_seed(project.seed, floor + 1), holdout=(test_x, test_y) if has_test else None,
                 on_epoch=epoch_done)
    accuracy = evaluate(model, test_x, test_y, spec=spec, device=device) if has_test else None
    train_s = time.perf_counter() - started

    def checkpoint(version: int) -> bytes:
        return checkpoint_bytes(make_checkpoint(
            model, model_name=project.model, model_version=version, classes=project.classes, in_channels=in_channels,
            backbone=backbone, input_size=project.input_size if backbone is None else None,
            config=checkpoint_config(config, n_labeled=len(labels), seed=project.seed, source=name)))

    created_at = time.time()

    def curve_point(version: int) -> CurvePointOut:
        return CurvePointOut(model_version=version, n_labeled=len(labels), test_accuracy=accuracy,
                             train_s=round(train_s, 3), created_at=created_at)

    version = records.publish_model(store, name, first_version=floor + 1, checkpoint=checkpoint, point=curve_point,
                                    n_labeled=len(labels))
    point = curve_point(version)
    state.set_model(version, len(labels), point.model_dump_json())
    state.clear_forced_training(len(labels))
    log.info("%s: v%d on %d labels: test accuracy %s, %d epochs in %.1fs", name, version, len(labels),
             "n/a" if accuracy is None else f"{accuracy:.4f}", fitted.epochs, train_s)
    return {"project": name, "trained": True, "version": version, "n_labeled": len(labels),
            "test_accuracy": accuracy, "epochs": fitted.epochs, "train_s": round(train_s, 3)}


@dataclass
class _Inputs:
    """What the model trains and is tested on: decoded images, or embeddings in embedding mode."""

    train_x: torch.Tensor
    train_ok: np.ndarray
    test_x: torch.Tensor
    test_ok: np.ndarray
    spec: ModelSpec | None
    in_channels: int
    backbone: BackboneIdentity | None = None


def _inputs_for(project: Project, train_ids: list[str], test_ids: list[str], previous: dict | None, *,
                store: ObjectStore, tensors: TensorCache, embeddings: EmbeddingCache, device: torch.device,
                settings: Settings) -> _Inputs:
    if project_uses_embeddings(project):
        backbone = load_backbone(project.model, input_size=project.input_size, device=device,
                                 batch_size=settings.embed_batch_size)
        train_x, train_ok, _ = embeddings.get_many(store, train_ids, backbone=backbone)
        test_x, test_ok, _ = embeddings.get_many(store, test_ids, backbone=backbone)
        return _Inputs(train_x[torch.from_numpy(train_ok)], train_ok, test_x[torch.from_numpy(test_ok)], test_ok,
                       None, 3, backbone.identity)
    spec = model_spec(project.model, project.input_size)
    if previous is not None:
        in_channels = int(previous["in_channels"])
    else:
        in_channels = model_in_channels(spec, 3 if spec.rgb else dataset_channels(store, train_ids + test_ids))
    train_x = tensors.get_many(store, train_ids, size=spec.input_size, channels=in_channels)
    test_x = tensors.get_many(store, test_ids, size=spec.input_size, channels=in_channels)
    return _Inputs(train_x, np.ones(len(train_ids), dtype=bool), test_x, np.ones(len(test_ids), dtype=bool),
                   spec, in_channels)
