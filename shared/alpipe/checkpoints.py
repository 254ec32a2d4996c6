"""Model checkpoints as bytes and back: the plain dict of alpipe.training.make_checkpoint, saved with
torch.save. Where they live, the model pointer and publishing a version are alpipe.records'.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from torch import nn

from . import records
from .embeddings import BackboneIdentity, build_head
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
    return torch.load(io.BytesIO(records.read_checkpoint_bytes(store, key)), map_location="cpu",
                      weights_only=True)


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
