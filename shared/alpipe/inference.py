"""A downloaded alpipe model applied to raw images, whichever way it was trained.

    from alpipe.inference import load_classifier
    clf = load_classifier("model.pt")
    for label, confidence in clf.predict(["cat.jpg", "dog.png"]):
        print(label, round(confidence, 3))

A whole-network checkpoint is the model itself. An embedding-mode checkpoint is a head plus the
identity of the frozen backbone it was trained on; the backbone is rebuilt from its ImageNet
weights, and weights whose digest differs from the one in the checkpoint are refused (the head
would read embeddings it was never trained on).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoints import model_from_checkpoint
from .embeddings import BackboneIdentity, backbone_identity, load_backbone
from .errors import UserError
from .images import decode_image
from .training import predict_proba, resolve_device

ImageLike = Image.Image | str | Path | bytes


def _as_bytes(image: ImageLike) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    return Path(image).read_bytes()


class Classifier:
    """predict / predict_proba over raw images (PIL images, file paths or encoded bytes)."""

    def __init__(self, checkpoint: dict, *, device: str = "auto", weights_path: str | Path | None = None):
        self.device = resolve_device(device)
        self.loaded = model_from_checkpoint(checkpoint, project=str(checkpoint.get("config", {}).get("project", "")),
                                            device=self.device)
        self.classes = self.loaded.classes
        self.backbone = None
        trained_on: BackboneIdentity | None = self.loaded.backbone
        if trained_on is not None:
            here = backbone_identity(trained_on.name, input_size=trained_on.input_size, weights_path=weights_path)
            if here.id != trained_on.id:
                raise UserError(f"the {trained_on.name} weights here (sha256 {here.weights_sha256[:12]}) are not the "
                                f"ones this head was trained on (sha256 {trained_on.weights_sha256[:12]}); pass "
                                "weights_path= to the right file")
            self.backbone = load_backbone(trained_on.name, input_size=trained_on.input_size,
                                          weights_path=weights_path, device=self.device)

    def predict_proba(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Class probabilities (N, n_classes), columns in the order of `classes`."""
        if self.backbone is not None:
            size, channels, spec = self.backbone.identity.input_size, 3, None
        else:
            size, channels, spec = self.loaded.spec.input_size, self.loaded.in_channels, self.loaded.spec
        pixels = torch.stack([decode_image(_as_bytes(image), size=size, channels=channels) for image in images])
        inputs = self.backbone.embed(pixels) if self.backbone is not None else pixels
        return predict_proba(self.loaded.model, inputs, spec=spec, device=self.device)

    def predict(self, images: Sequence[ImageLike]) -> list[tuple[str, float]]:
        """(most likely class, its probability) per image."""
        probs = self.predict_proba(images)
        return [(self.classes[int(i)], float(p[i])) for p, i in zip(probs, probs.argmax(axis=1), strict=True)]


def load_classifier(source: str | Path | bytes, *, device: str = "auto",
                    weights_path: str | Path | None = None) -> Classifier:
    """A Classifier from a checkpoint file (or its bytes), e.g. one from GET /projects/{p}/model."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return Classifier(checkpoint, device=device, weights_path=weights_path)
