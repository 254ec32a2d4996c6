"""The records of a Label Studio connection: which Label Studio project an alpipe project serves, and
which Label Studio task is which alpipe sample.

Durable first, as everywhere in alpipe: the link (`projects/<p>/labelstudio/link.json`) and the
task map (append-only batches `projects/<p>/labelstudio/tasks/*.jsonl`) are objects; Redis holds
copies for lookups (the hash of links by Label Studio project id, each project's task -> sample
hash), rebuilt from the objects whenever a lookup misses them (after a Redis wipe, say), so
nothing here needs a step in `alpipe recover`.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis
from pydantic import BaseModel, Field

from .. import keys, records
from ..storage import ObjectStore
from .label_config import ImageClassification


class LabelStudioLink(BaseModel):
    """An alpipe project connected to a Label Studio project (written at /setup, updated when its URL or
    token changes)."""

    project: str = Field(description="the alpipe project")
    ls_project: int = Field(description="Label Studio's project id")
    ls_created: str = Field("", description="the creation stamp Label Studio sends after the id ('<id>.<stamp>')")
    url: str = Field(description="Label Studio's base URL, for images and pushing predictions")
    token: str = Field("", description="the token alpipe uses in Label Studio (a personal access token, or the "
                                        "legacy one Label Studio sends in /setup)")
    data_key: str
    image_name: str
    choices_name: str
    classes: list[str]
    webhook_secret: str = Field(description="the bearer token Label Studio's webhook calls alpipe with")
    linked_at: float = 0.0

    @property
    def config(self) -> ImageClassification:
        return ImageClassification(data_key=self.data_key, image_name=self.image_name,
                                   choices_name=self.choices_name, classes=list(self.classes))


class MapRecord(BaseModel):
    """One entry of a durable map: a Label Studio id (task or annotation) -> an alpipe value."""

    id: int
    value: str


# The maps a connection keeps: task -> sample id; annotation -> "<sample id> <labeler>" (Label Studio's
# ANNOTATIONS_DELETED names only the ids of what was deleted).
TASKS = "tasks"
ANNOTATIONS = "annotations"


def _map_key(project: str, kind: str) -> str:
    return keys.redis_key(project, "labelstudio", kind)


def _loaded_key(project: str, kind: str) -> str:
    return keys.redis_key(project, "labelstudio", kind, "loaded")


# --- links ----------------------------------------------------------------------------------------


def write_link(store: ObjectStore, r: redis.Redis, link: LabelStudioLink) -> None:
    records.write_labelstudio_link(store, link.project, link.model_dump_json(indent=1).encode())
    r.hset(keys.labelstudio_links_key(), str(link.ls_project), link.project)


def read_link(store: ObjectStore, project: str) -> LabelStudioLink | None:
    data = records.read_labelstudio_link(store, project)
    return LabelStudioLink.model_validate_json(data) if data is not None else None


def linked_project(store: ObjectStore, r: redis.Redis, ls_project: int) -> LabelStudioLink | None:
    """The link of a Label Studio project id; Redis first, the stored links when Redis has none."""
    name = r.hget(keys.labelstudio_links_key(), str(ls_project))
    if name is not None:
        link = read_link(store, name.decode())
        if link is not None and link.ls_project == ls_project:
            return link
    for project in records.stored_project_names(store):
        link = read_link(store, project)
        if link is not None:
            r.hset(keys.labelstudio_links_key(), str(link.ls_project), link.project)
            if link.ls_project == ls_project:
                return link
    return None


def is_linked(store: ObjectStore, r: redis.Redis, project: str) -> bool:
    """Is a Label Studio project connected to this one? (Redis first; the stored link after a Redis wipe.)"""
    if project.encode() in r.hvals(keys.labelstudio_links_key()):
        return True
    link = read_link(store, project)
    if link is not None:
        r.hset(keys.labelstudio_links_key(), str(link.ls_project), link.project)
    return link is not None


# --- the maps -------------------------------------------------------------------------------------


def _load(store: ObjectStore, r: redis.Redis, project: str, kind: str) -> None:
    """Copy a stored map into Redis (once per Redis lifetime, or again after a wipe)."""
    if r.exists(_loaded_key(project, kind)):
        return
    mapping: dict[str, str] = {}
    for batch in records.read_labelstudio_map(store, project, kind, MapRecord):
        mapping.update({str(rec.id): rec.value for rec in batch})
    pipe = r.pipeline()
    if mapping:
        pipe.hset(_map_key(project, kind), mapping=mapping)
    pipe.set(_loaded_key(project, kind), 1)
    pipe.execute()


def lookup(store: ObjectStore, r: redis.Redis, project: str, kind: str, ids: list[int]) -> list[str | None]:
    """The value of each id (None where the map has none)."""
    if not ids:
        return []
    _load(store, r, project, kind)
    return [v.decode() if v is not None else None for v in r.hmget(_map_key(project, kind), [str(i) for i in ids])]


def entries(store: ObjectStore, r: redis.Redis, project: str, kind: str) -> dict[int, str]:
    """The whole map."""
    _load(store, r, project, kind)
    return {int(i): v.decode() for i, v in r.hscan_iter(_map_key(project, kind), count=5000)}


def remember(store: ObjectStore, r: redis.Redis, project: str, kind: str, pairs: Iterable[tuple[int, str]]) -> None:
    """Add entries: the batch object first, then Redis."""
    new = [MapRecord(id=i, value=v) for i, v in pairs]
    if not new:
        return
    _load(store, r, project, kind)
    records.write_labelstudio_map_batch(store, project, kind, new)
    r.hset(_map_key(project, kind), mapping={str(rec.id): rec.value for rec in new})
