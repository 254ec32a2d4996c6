"""Pydantic models for everything that crosses a process boundary (files, queues, HTTP)."""

from typing import Literal

from pydantic import BaseModel, Field

Split = Literal["pool", "test"]


class SampleRecord(BaseModel):
    """One image: content-addressed id, where it came from, and its known label if any."""

    id: str = Field(description="sha256 of the image bytes")
    name: str = Field(description="where the image came from, e.g. '<class>/<file>' in an ImageFolder")
    label: str | None = Field(None, description="known label (ground truth for the simulated oracle)")
    split: Split = "pool"


class DatasetManifest(BaseModel):
    """A materialized dataset in object storage: images under images/<id>, this under datasets/<name>/."""

    name: str
    classes: list[str]
    channels: Literal[1, 3] = Field(description="1 when every image is grayscale, else 3")
    samples: list[SampleRecord]
    skipped: list[str] = Field(default_factory=list, description="files that were not usable images, with why")
