"""What a model wants as input: name, input size, channels and normalization (no torch needed).

Kept apart from models.py so the API can validate a project's model without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_size: int
    rgb: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_SPECS = {
    "small_cnn": ModelSpec("small_cnn", 28, False, (0.5,) * 3, (0.5,) * 3),
    "resnet18": ModelSpec("resnet18", 224, True, _IMAGENET_MEAN, _IMAGENET_STD),
    # The Lite weights come from TensorFlow, which feeds them (pixel - 127) / 128.
    "efficientnet_lite0": ModelSpec("efficientnet_lite0", 224, True, (127 / 255,) * 3, (128 / 255,) * 3),
}
MODEL_NAMES: tuple[str, ...] = tuple(_SPECS)


def get_model_spec(name: str) -> ModelSpec:
    """The spec of a model name, or a UserError listing the choices."""
    try:
        return _SPECS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}") from None


def model_in_channels(spec: ModelSpec, dataset_channels: int) -> int:
    """How many channels the model's first layer takes for a dataset with `dataset_channels`."""
    return 3 if spec.rgb else dataset_channels
