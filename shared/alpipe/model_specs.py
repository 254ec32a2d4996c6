"""What a model wants as input: name, input size, channels and normalization (no torch needed).

Kept apart from models.py so the API can validate a project's model without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
AUTO = "auto"
# Models whose ImageNet-pretrained body can serve as a frozen backbone (embedding mode).
BACKBONES: tuple[str, ...] = ("efficientnet_lite0", "resnet18")
# model: auto picks small_cnn for grayscale images no larger than this (digits, MNIST-like scans)
# and a pretrained backbone in embedding mode for anything else.
SMALL_GRAYSCALE_MAX_SIDE = 64
# The backbone `auto` picks (README, "Choosing a backbone and input size"): resnet18 needs weights
# that no package ships, so efficientnet_lite0.
AUTO_BACKBONE = "efficientnet_lite0"
# A backbone's input size when none is given: the images' own size rounded up to a multiple of 32,
# within these bounds. Upsampling adds no detail and costs quadratically (224 px runs 3-8x slower than
# 128 px on a CPU); on the photo set, 128-px patches embedded at 128 and at 224 learned equally well.
MIN_AUTO_SIZE, MAX_AUTO_SIZE = 64, 224


def get_model_spec(name: str) -> ModelSpec:
    """The spec of a model name, or a UserError listing the choices."""
    try:
        return _SPECS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}") from None


def model_choices() -> str:
    return ", ".join((AUTO, *MODEL_NAMES))


def model_spec(name: str, input_size: int | None = None) -> ModelSpec:
    """The model's spec, at input_size pixels when given (a project's or simulate's --input-size)."""
    spec = get_model_spec(name)
    return replace(spec, input_size=input_size) if input_size else spec


def check_model_name(name: str) -> None:
    """A UserError naming the choices when name is neither 'auto' nor a known model."""
    if name != AUTO:
        get_model_spec(name)


def auto_model(*, grayscale: bool, max_side: int, finetune: bool | None = None) -> str:
    """What model 'auto' becomes for images of this kind (see SMALL_GRAYSCALE_MAX_SIDE).

    finetune=False asks for embedding mode, which only a pretrained backbone has.
    """
    small = grayscale and max_side <= SMALL_GRAYSCALE_MAX_SIDE
    return "small_cnn" if small and finetune is not False else AUTO_BACKBONE


def uses_embeddings(model: str, *, finetune: bool | None, pretrained: bool) -> bool:
    """Embedding mode (frozen backbone, a head trained on cached embeddings) or whole-network training.

    finetune None means the model's default: embedding mode for a pretrained backbone, whole-network
    training otherwise. Asking for embedding mode where there is no pretrained backbone is a UserError.
    """
    if model == AUTO:
        return not finetune
    has_backbone = model in BACKBONES and pretrained
    if finetune is False and not has_backbone:
        why = "has no pretrained backbone" if model not in BACKBONES else "is not pretrained (pretrained=false)"
        raise UserError(f"embedding mode (finetune=false) needs a pretrained backbone, and {model} {why}; "
                        f"use {' or '.join(BACKBONES)} with pretrained weights, or drop finetune=false")
    return has_backbone and not finetune


# Strategies that sample MC-dropout passes, and the models with a dropout layer to sample.
MC_STRATEGIES = ("bald",)
MODELS_WITH_DROPOUT = ("small_cnn", "efficientnet_lite0")


def check_strategy_fits(strategy: str, model: str, *, finetune: bool | None, pretrained: bool) -> None:
    """A UserError when the strategy needs what the model (as trained) lacks: bald needs dropout.

    'auto' is checked once the images have decided the model (resolve_auto's callers).
    """
    if strategy not in MC_STRATEGIES or model == AUTO:
        return
    embedding = uses_embeddings(model, finetune=finetune, pretrained=pretrained)
    if model not in MODELS_WITH_DROPOUT or embedding:
        what = "the head trained in embedding mode" if embedding else model
        raise UserError(f"strategy {strategy} samples MC-dropout passes and {what} has no dropout; use "
                        f"{' or '.join(MODELS_WITH_DROPOUT)} with whole-network training (finetune true for a "
                        f"backbone), or another strategy (auto, margin, entropy)")


def project_uses_embeddings(project) -> bool:
    """Whether a project (anything with model, finetune and pretrained) runs in embedding mode.

    False while its model is still 'auto': the first images added decide (projects.resolve_auto_model).
    """
    if project.model == AUTO:
        return False
    return uses_embeddings(project.model, finetune=project.finetune, pretrained=project.pretrained)


def auto_input_size(model: str, max_side: int) -> int | None:
    """The input size for images up to max_side pixels: see MIN_AUTO_SIZE; None (the model's own) for
    small_cnn, which is built for its 28 pixels."""
    if model not in BACKBONES:
        return None
    return min(MAX_AUTO_SIZE, max(MIN_AUTO_SIZE, -(-max_side // 32) * 32))


def resolve_auto(model: str, input_size: int | None, *, finetune: bool | None, grayscale: bool,
                 max_side: int) -> tuple[str, int | None]:
    """(model, input size) for images of this kind: 'auto' and an unset size decided as documented
    (auto_model, auto_input_size); what was given is kept."""
    if model == AUTO:
        model = auto_model(grayscale=grayscale, max_side=max_side, finetune=finetune)
    return model, input_size or auto_input_size(model, max_side)


def embed_input_size(model: str, input_size: int | None) -> int:
    """The input size a backbone embeds at: the given one, or the model's default (224)."""
    return input_size or get_model_spec(model).input_size


def model_in_channels(spec: ModelSpec, dataset_channels: int) -> int:
    """How many channels the model's first layer takes for a dataset with `dataset_channels`."""
    return 3 if spec.rgb else dataset_channels
