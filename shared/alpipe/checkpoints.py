"""Model checkpoints in object storage: immutable versions and the "current model" pointer.

A checkpoint is the plain dict of alpipe.training.make_checkpoint, saved with torch.save under
keys.checkpoint_key(p, N), written once (put_if_absent) and never changed. The pointer
keys.current_model_key(p) is `{"version": N, "n_labeled": L, "key": <checkpoint key>}` and is
written only after the checkpoint it names is complete.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from torch import nn

from . import keys
from .embeddings import BackboneIdentity, build_head
from .errors import NotFound
from .model_specs import model_spec
from .models import ModelSpec, build_model
from .storage import ObjectStore


@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint, on its device and in eval mode."""

    project: str
    version: int
    model: nn.Module  # in embedding mode, the head
    spec: ModelSpec | None  # None in embedding mode: the model takes embeddings, not images
    in_channels: int
    classes: list[str]
    backbone: BackboneIdentity | None = None  # embedding mode's frozen backbone


def checkpoint_bytes(checkpoint: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    return buf.getvalue()


def read_checkpoint(store: ObjectStore, key: str) -> dict:
    """The checkpoint dict at key, tensors on the CPU (weights_only: a checkpoint is plain data)."""
    return torch.load(io.BytesIO(store.get_bytes(key)), map_location="cpu", weights_only=True)


def read_pointer(store: ObjectStore, project: str) -> dict | None:
    """The current-model pointer, None before the first model."""
    try:
        return store.get_json(keys.current_model_key(project))
    except NotFound:
        return None


def stored_versions(store: ObjectStore, project: str) -> list[int]:
    """Versions that have a checkpoint object, ascending (complete ones: writes are atomic)."""
    found = (keys.checkpoint_version(key) for key in store.list(keys.models_prefix(project)))
    return sorted(v for v in found if v is not None)


def model_from_checkpoint(checkpoint: dict, *, project: str, device: torch.device) -> LoadedModel:
    """The checkpoint's model (in embedding mode its head) on device, in eval mode."""
    n_classes = len(checkpoint["classes"])
    if checkpoint.get("mode") == "embedding":
        backbone = BackboneIdentity.from_dict(checkpoint["backbone"])
        model: nn.Module = build_head(int(checkpoint["head"]["dim"]), n_classes,
                                      hidden=int(checkpoint["head"]["hidden"]))
        spec = None
    else:
        backbone, spec = None, model_spec(checkpoint["model_name"], checkpoint.get("input_size"))
        model = build_model(spec.name, n_classes, in_channels=checkpoint["in_channels"], pretrained=False)
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    return LoadedModel(project, int(checkpoint["model_version"]), model, spec, int(checkpoint["in_channels"]),
                       list(checkpoint["classes"]), backbone)
