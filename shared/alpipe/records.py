"""The durable records in object storage: the one module that reads and writes their layout.

Object storage is the source of truth (DESIGN.md); `state.py` is the door to Redis and this module
is the door to the store. Key names are spelled in `keys.py`; what lives under them, how a batch
is encoded and which objects make a model are decided here, so the API, the workers, recovery and
export read the same layout the same way.

Records are written once and never changed (put_if_absent), except three documents that name the
current state: project.json (rewritten once when model `auto` is resolved), a model pointer, and a
Label Studio link. Batches (samples, the label log, Label Studio maps) are JSON lines, one object per
accepted call, keyed by a sortable stamp so listing order is write order.

No torch here: a checkpoint comes in and goes out as bytes (alpipe.checkpoints (de)serializes it).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import keys
from .errors import NotFound, UserError
from .schemas import CurvePointOut, DatasetManifest, LabelRecord, Project, SampleRecord
from .storage import ObjectStore

M = TypeVar("M", bound=BaseModel)

_JSON = "application/json"


# --- batch names and encoding ----------------------------------------------------------------------


def new_stamp() -> str:
    """A sortable stamp for batch object keys: object key order is write order."""
    return f"{time.time_ns():020d}"


def new_batch_id() -> str:
    return uuid.uuid4().hex[:12]


def jsonl_bytes(records: Iterable[BaseModel]) -> bytes:
    return "".join(rec.model_dump_json() + "\n" for rec in records).encode()


def parse_jsonl(data: bytes, model: type[M]) -> list[M]:
    return [model.model_validate_json(line) for line in data.splitlines() if line.strip()]


def _batch_keys(store: ObjectStore, prefix: str) -> list[str]:
    """The batch objects under prefix, in write order (anything else there is not a batch)."""
    return [key for key in store.list(prefix) if key.endswith(".jsonl")]


def _read_batches(store: ObjectStore, prefix: str, model: type[M]) -> Iterator[tuple[str, list[M]]]:
    for key in _batch_keys(store, prefix):
        yield key, parse_jsonl(store.get_bytes(key), model)


def probe(store: ObjectStore) -> None:
    """Look up an object nobody writes: raises when the store does not answer (the /health check)."""
    store.exists(keys.health_probe_key())


# --- projects --------------------------------------------------------------------------------------


def stored_project_names(store: ObjectStore) -> list[str]:
    """Names of the projects whose project.json is in object storage."""
    names = []
    for key in store.list("projects/"):
        parts = key.split("/")
        if len(parts) == 3 and key == keys.project_key(parts[1]):
            names.append(parts[1])
    return names


def project_stored(store: ObjectStore, name: str) -> bool:
    return store.exists(keys.project_key(name))


def read_project(store: ObjectStore, name: str) -> Project:
    """The project definition from object storage; NotFound when there is none."""
    try:
        data = store.get_bytes(keys.project_key(name))
    except NotFound:
        raise NotFound(f"project {name!r} not found") from None
    try:
        return Project.model_validate_json(data)
    except ValidationError as e:
        raise UserError(f"{keys.project_key(name)} is not a valid project definition: {e}") from None


def create_project(store: ObjectStore, project: Project) -> bool:
    """Write a new project's definition; False when the name is taken (two racing creates: one wins)."""
    return store.put_if_absent(keys.project_key(project.name), project.model_dump_json(indent=1).encode())


def rewrite_project(store: ObjectStore, project: Project) -> None:
    """Replace the definition (model `auto` resolved: the one change a project.json ever sees)."""
    store.put_bytes(keys.project_key(project.name), project.model_dump_json(indent=1).encode(), _JSON)


# --- images and samples ----------------------------------------------------------------------------


def put_image(store: ObjectStore, sample_id: str, data: bytes) -> bool:
    """Store image bytes under their sha256 (content-addressed, shared by every project)."""
    return store.put_if_absent(keys.image_key(sample_id), data)


def read_image(store: ObjectStore, sample_id: str) -> bytes:
    return store.get_bytes(keys.image_key(sample_id))


def write_sample_batch(store: ObjectStore, project: str, records: list[SampleRecord]) -> str:
    """One object for the samples one call added; its key."""
    key = keys.sample_batch_key(project, new_stamp(), new_batch_id())
    store.put_if_absent(key, jsonl_bytes(records))
    return key


def read_sample_batches(store: ObjectStore, project: str) -> Iterator[tuple[str, list[SampleRecord]]]:
    """(key, records) of every sample batch of the project, in write order."""
    return _read_batches(store, keys.samples_prefix(project), SampleRecord)


# --- the label log ---------------------------------------------------------------------------------


def write_label_batch(store: ObjectStore, project: str, records: list[LabelRecord], *,
                      batch_id: str | None = None) -> str:
    """Append one object to the label log (durable when this returns); its key."""
    key = keys.label_log_key(project, new_stamp(), batch_id or new_batch_id())
    store.put_new(key, jsonl_bytes(records))
    return key


def label_log_keys(store: ObjectStore, project: str) -> list[str]:
    """The label log's objects, in write order: a snapshot an export reads later."""
    return _batch_keys(store, keys.label_log_prefix(project))


def read_label_batch(store: ObjectStore, key: str) -> list[LabelRecord]:
    return parse_jsonl(store.get_bytes(key), LabelRecord)


def read_label_log(store: ObjectStore, project: str) -> Iterator[tuple[str, list[LabelRecord]]]:
    """(key, records) of every label-log batch of the project, in write order (latest wins)."""
    return _read_batches(store, keys.label_log_prefix(project), LabelRecord)


def durable_batch_count(store: ObjectStore, project: str) -> int:
    """Sample and label-log batches in the store: what Redis must have applied (its `applied` count)."""
    return sum(len(_batch_keys(store, prefix)) for prefix in (keys.samples_prefix(project),
                                                               keys.label_log_prefix(project)))


# --- models ----------------------------------------------------------------------------------------


class ModelPointer(BaseModel):
    """projects/<p>/models/current.json: the newest complete model version."""

    model_config = ConfigDict(extra="ignore")

    version: int = Field(ge=1)
    n_labeled: int = Field(ge=0, description="labels the model was trained on")
    key: str = Field(description="object key of its checkpoint")


def read_pointer(store: ObjectStore, project: str) -> ModelPointer | None:
    """The current-model pointer, None before the first model."""
    try:
        return ModelPointer.model_validate_json(store.get_bytes(keys.current_model_key(project)))
    except NotFound:
        return None


def stored_versions(store: ObjectStore, project: str) -> list[int]:
    """Versions that have a checkpoint object, ascending (complete ones: writes are atomic)."""
    found = (keys.checkpoint_version(key) for key in store.list(keys.models_prefix(project)))
    return sorted(v for v in found if v is not None)


def read_checkpoint_bytes(store: ObjectStore, key: str) -> bytes:
    return store.get_bytes(key)


def checkpoint_chunks(store: ObjectStore, project: str, version: int, pointer: ModelPointer) -> Iterator[bytes]:
    """The stored bytes of model `version` (at most the pointer's), streamed; NotFound when it is gone."""
    key = pointer.key if version == pointer.version else keys.checkpoint_key(project, version)
    return store.iter_chunks(key)


def publish_model(store: ObjectStore, project: str, *, first_version: int, checkpoint: Callable[[int], bytes],
                  point: Callable[[int], CurvePointOut], n_labeled: int) -> int:
    """Publish a trained model; the version it got.

    The order makes a crash at any point harmless: the checkpoint (create-only: a version another
    trainer took is skipped, never overwritten), then its metrics, then the pointer, which only moves
    forward. A checkpoint above the pointer is a training that never finished, not a model.
    `checkpoint(v)` and `point(v)` build the objects for version v.
    """
    version = first_version
    while not store.put_if_absent(keys.checkpoint_key(project, version), checkpoint(version)):
        version += 1
    store.put_json(keys.model_metrics_key(project, version), point(version).model_dump(mode="json"))
    current = read_pointer(store, project)
    if current is None or current.version < version:
        pointer = ModelPointer(version=version, n_labeled=n_labeled, key=keys.checkpoint_key(project, version))
        store.put_json(keys.current_model_key(project), pointer.model_dump())
    return version


def model_curve(store: ObjectStore, project: str, *, up_to: int) -> list[CurvePointOut]:
    """The metrics of every model version up to `up_to`, by version (above it: trainings that never finished)."""
    points = []
    for key in store.list(keys.models_prefix(project)):
        version = keys.metrics_version(key)
        if version is not None and version <= up_to:
            points.append(CurvePointOut.model_validate(store.get_json(key)))  # malformed: fail loudly
    return sorted(points, key=lambda p: p.model_version)


# --- embeddings (shared by every project) ----------------------------------------------------------


def write_backbone_identity(store: ObjectStore, backbone_id: str, identity_json: bytes) -> None:
    """What a backbone id stands for, next to its embeddings (once), so the layout explains itself."""
    store.put_if_absent(keys.embedding_identity_key(backbone_id), identity_json)


def read_embedding(store: ObjectStore, backbone_id: str, sample_id: str) -> bytes:
    return store.get_bytes(keys.embedding_key(backbone_id, sample_id))


def write_embedding(store: ObjectStore, backbone_id: str, sample_id: str, data: bytes) -> bool:
    return store.put_if_absent(keys.embedding_key(backbone_id, sample_id), data)


# --- datasets, experiments and caches --------------------------------------------------------------


def read_dataset_manifest(store: ObjectStore, name: str) -> DatasetManifest | None:
    """A dataset ingested earlier, None when it has not been."""
    try:
        return DatasetManifest.model_validate_json(store.get_bytes(keys.dataset_manifest_key(name)))
    except NotFound:
        return None


def write_dataset_manifest(store: ObjectStore, manifest: DatasetManifest) -> None:
    store.put_bytes(keys.dataset_manifest_key(manifest.name), manifest.model_dump_json().encode(), _JSON)


def write_experiment_file(store: ObjectStore, experiment: str, filename: str, data: bytes) -> None:
    """One result file of a simulate run (curves.csv, a checkpoint, ...)."""
    store.put_bytes(keys.experiment_key(experiment, filename), data)


def read_tensor_cache(store: ObjectStore, dataset: str, size: int, channels: int) -> bytes | None:
    """A dataset's decoded images at one input size, None when not cached yet."""
    try:
        return store.get_bytes(keys.tensor_cache_key(dataset, size, channels))
    except NotFound:
        return None


def write_tensor_cache(store: ObjectStore, dataset: str, size: int, channels: int, data: bytes) -> None:
    store.put_bytes(keys.tensor_cache_key(dataset, size, channels), data)


# --- Label Studio ----------------------------------------------------------------------------------


def read_labelstudio_link(store: ObjectStore, project: str) -> bytes | None:
    try:
        return store.get_bytes(keys.labelstudio_link_key(project))
    except NotFound:
        return None


def write_labelstudio_link(store: ObjectStore, project: str, link_json: bytes) -> None:
    store.put_bytes(keys.labelstudio_link_key(project), link_json, _JSON)


def delete_labelstudio_link(store: ObjectStore, project: str) -> None:
    store.delete(keys.labelstudio_link_key(project))


def write_labelstudio_map_batch(store: ObjectStore, project: str, kind: str, records: list[BaseModel]) -> None:
    """New entries of a Label Studio id map (tasks or annotations), one object per call."""
    store.put_if_absent(keys.labelstudio_map_key(project, kind, new_stamp(), new_batch_id()), jsonl_bytes(records))


def read_labelstudio_map(store: ObjectStore, project: str, kind: str, model: type[M]) -> Iterator[list[M]]:
    """Every batch of a Label Studio id map, in write order."""
    for _key, records in _read_batches(store, keys.labelstudio_map_prefix(project, kind), model):
        yield records
