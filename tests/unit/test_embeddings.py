"""Embedding mode's pure parts: model choice, backbone identity, the embedding cache, head checkpoints,
raw-image inference and the device choices. The backbone is the real EfficientNet-Lite0 at a small
input size (fast on a CPU), or a tiny stand-in where only the bookkeeping is under test."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from alpipe import keys
from alpipe.checkpoints import checkpoint_bytes, model_from_checkpoint
from alpipe.embeddings import (
    Backbone,
    BackboneIdentity,
    EmbeddingCache,
    autocast,
    backbone_identity,
    build_head,
    embed_batch_size,
    load_backbone,
)
from alpipe.errors import UserError
from alpipe.inference import load_classifier
from alpipe.model_specs import auto_input_size, auto_model, uses_embeddings
from alpipe.models import pretrained_weights_path
from alpipe.storage import LocalStore
from alpipe.training import make_checkpoint, resolve_device

README = Path(__file__).resolve().parents[2] / "README.md"


def _png(rgb: tuple[int, int, int], size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def _stand_in(digest: str = "0" * 64) -> Backbone:
    """A 'backbone' whose embedding is the mean colour: 3 numbers, computed instantly and countable."""
    identity = BackboneIdentity(name="efficientnet_lite0", input_size=16, weights_sha256=digest,
                                mean=(0.5,) * 3, std=(0.5,) * 3, dim=3)
    return Backbone(identity, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), device=torch.device("cpu"))


def _store_images(store: LocalStore, n: int) -> list[str]:
    ids = []
    for i in range(n):
        data = _png((i * 20 % 256, 100, 200 - i))
        sample_id = f"{i:064x}"
        store.put_bytes(keys.image_key(sample_id), data)
        ids.append(sample_id)
    return ids


# --- which model, which mode -------------------------------------------------------------------------


@pytest.mark.parametrize(("grayscale", "side", "finetune", "expected"), [
    (True, 8, None, "small_cnn"),  # digits
    (True, 28, None, "small_cnn"),  # MNIST
    (True, 64, None, "small_cnn"),
    (True, 65, None, "efficientnet_lite0"),  # grayscale photographs
    (False, 28, None, "efficientnet_lite0"),  # small colour images
    (False, 640, None, "efficientnet_lite0"),
    (True, 28, False, "efficientnet_lite0"),  # embedding mode asked for: only a backbone has it
])
def test_auto_picks_as_documented(grayscale, side, finetune, expected):
    assert auto_model(grayscale=grayscale, max_side=side, finetune=finetune) == expected


@pytest.mark.parametrize(("model", "side", "expected"), [
    ("efficientnet_lite0", 8, 64),  # never below 64
    ("efficientnet_lite0", 128, 128),  # the photo set: its own size
    ("resnet18", 130, 160),  # up to a multiple of 32
    ("efficientnet_lite0", 4000, 224),  # never above the size the weights were trained at
    ("small_cnn", 28, None),  # its own 28 pixels
])
def test_auto_input_size_follows_the_images(model, side, expected):
    assert auto_input_size(model, side) == expected


def test_embedding_mode_is_the_default_for_pretrained_backbones_only():
    assert uses_embeddings("efficientnet_lite0", finetune=None, pretrained=True)
    assert uses_embeddings("resnet18", finetune=False, pretrained=True)
    assert not uses_embeddings("efficientnet_lite0", finetune=True, pretrained=True)
    assert not uses_embeddings("efficientnet_lite0", finetune=None, pretrained=False)
    assert not uses_embeddings("small_cnn", finetune=None, pretrained=True)


@pytest.mark.parametrize(("model", "pretrained", "why"), [
    ("small_cnn", True, "small_cnn has no pretrained backbone"),
    ("efficientnet_lite0", False, "is not pretrained"),
])
def test_embedding_mode_without_a_pretrained_backbone_is_refused(model, pretrained, why):
    with pytest.raises(UserError, match=why):
        uses_embeddings(model, finetune=False, pretrained=pretrained)


# --- backbone identity -------------------------------------------------------------------------------


def test_identity_names_model_size_weights_and_preprocessing(tmp_path):
    shipped = backbone_identity("efficientnet_lite0", input_size=64)
    assert shipped.dim == 1280 and shipped.input_size == 64
    assert re.fullmatch(r"efficientnet_lite0-64-[0-9a-f]{16}", shipped.id)
    assert backbone_identity("efficientnet_lite0", input_size=64).id == shipped.id  # stable
    assert backbone_identity("efficientnet_lite0", input_size=96).id != shipped.id
    # Other weights: another digest, another id, so their embeddings are never mixed with these.
    state = torch.load(pretrained_weights_path("efficientnet_lite0"), weights_only=True)
    state["_conv_stem.weight"] = state["_conv_stem.weight"] * 1.01
    other = tmp_path / "tuned.pth"
    torch.save(state, other)
    changed = backbone_identity("efficientnet_lite0", input_size=64, weights_path=other)
    assert changed.weights_sha256 != shipped.weights_sha256 and changed.id != shipped.id
    assert BackboneIdentity.from_dict(changed.as_dict()) == changed


def test_unknown_or_weightless_backbones_are_refused(tmp_path):
    with pytest.raises(UserError, match="small_cnn has no pretrained backbone"):
        backbone_identity("small_cnn")
    with pytest.raises(UserError, match="unknown model"):
        backbone_identity("vgg99")
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(UserError, match="cannot load weights"):
        load_backbone("efficientnet_lite0", input_size=32, weights_path=garbage, device=torch.device("cpu"))


# --- the embedding cache -----------------------------------------------------------------------------


def test_each_image_is_embedded_once_then_read_from_memory_or_storage(tmp_path):
    store = LocalStore(tmp_path)
    ids = _store_images(store, 10)
    backbone = _stand_in()
    cache = EmbeddingCache()
    vectors, ok, result = cache.get_many(store, ids, backbone=backbone)
    assert ok.all() and result.computed == result.stored == 10 and backbone.forwards == 10
    assert vectors.dtype == torch.float16 and vectors.shape == (10, 3)
    for sid in ids:
        assert store.exists(keys.embedding_key(backbone.identity.id, sid))
    assert store.exists(keys.embedding_identity_key(backbone.identity.id))
    again, _, result = cache.get_many(store, ids[::-1], backbone=backbone)  # memory
    assert torch.equal(again, vectors.flip(0)) and result.computed == 0 and backbone.forwards == 10
    # Another process (another project on the same images): read from storage, zero backbone calls.
    progress: list[int] = []
    fresh, ok, result = EmbeddingCache().get_many(store, ids, backbone=backbone, on_progress=progress.append)
    assert torch.equal(fresh, vectors) and ok.all() and result.found == 10 and backbone.forwards == 10
    assert progress == [10]  # all there already
    # Expected values: the mean colour, normalized as the backbone's spec says.
    expected = torch.tensor([(0 / 255 - 0.5) / 0.5, (100 / 255 - 0.5) / 0.5, (200 / 255 - 0.5) / 0.5])
    assert torch.allclose(vectors[0].float(), expected, atol=1e-2)


def test_another_weights_digest_is_recomputed_under_its_own_keys(tmp_path):
    store = LocalStore(tmp_path)
    ids = _store_images(store, 4)
    first, second = _stand_in("a" * 64), _stand_in("b" * 64)
    EmbeddingCache().get_many(store, ids, backbone=first)
    _, ok, result = EmbeddingCache().get_many(store, ids, backbone=second)
    assert ok.all() and result.computed == 4 and second.forwards == 4
    prefix = {k.split("/")[1] for k in store.list("embeddings/")}
    assert prefix == {first.identity.id, second.identity.id}


def test_a_corrupt_image_is_reported_and_skipped(tmp_path):
    store = LocalStore(tmp_path)
    ids = _store_images(store, 5)
    store.put_bytes(keys.image_key(ids[2]), _png((1, 2, 3))[:40])  # truncated PNG
    progress: list[int] = []
    _, ok, result = EmbeddingCache().get_many(store, ids + ["f" * 64], backbone=_stand_in(),
                                              on_progress=progress.append)
    assert ok.tolist() == [True, True, False, True, True, False]
    assert sum(progress) == 6  # a progress bar reaches the end, failed images included
    assert set(result.failed) == {ids[2], "f" * 64}
    assert "not a readable image" in result.failed[ids[2]] and "missing" in result.failed["f" * 64]
    assert result.stored == 4


def test_with_only_an_identity_nothing_is_computed(tmp_path):
    store = LocalStore(tmp_path)
    ids = _store_images(store, 3)
    backbone = _stand_in()
    EmbeddingCache().get_many(store, ids[:2], backbone=backbone)
    _, ok, result = EmbeddingCache().get_many(store, ids, backbone=backbone.identity)
    assert ok.tolist() == [True, True, False] and list(result.failed) == [ids[2]]
    assert backbone.forwards == 2


def test_the_cache_stays_within_its_memory_bound(tmp_path):
    store = LocalStore(tmp_path)
    ids = _store_images(store, 10)
    cache = EmbeddingCache(max_bytes=4 * 3 * 2)  # four 3-value float16 vectors
    backbone = _stand_in()
    cache.get_many(store, ids[:4], backbone=backbone)
    cache.get_many(store, ids[:1], backbone=backbone)  # used again: the least recently used is now ids[1]
    cache.get_many(store, ids[4:6], backbone=backbone)
    assert len(cache) == 4 and cache.nbytes == 24
    _, _, result = cache.get_many(store, [ids[0], ids[3]], backbone=backbone.identity)
    assert result.found == 0  # both still in memory
    _, _, result = cache.get_many(store, [ids[1], ids[2]], backbone=backbone.identity)
    assert result.found == 2  # evicted, read back from storage


# --- head checkpoints and raw images -------------------------------------------------------------------


def _trained_embedding_checkpoint(tmp_path: Path) -> tuple[dict, list[bytes]]:
    """A head on real EfficientNet-Lite0 embeddings (32 px) that tells red from blue squares."""
    backbone = load_backbone("efficientnet_lite0", input_size=32, device=torch.device("cpu"))
    images = [_png((230, 20 + i, 20)) for i in range(6)] + [_png((20, 20 + i, 230)) for i in range(6)]
    store = LocalStore(tmp_path / "store")
    for i, data in enumerate(images):
        store.put_bytes(keys.image_key(f"{i:064x}"), data)
    vectors, ok, _ = EmbeddingCache().get_many(store, [f"{i:064x}" for i in range(12)], backbone=backbone)
    assert ok.all()
    torch.manual_seed(0)
    head = build_head(backbone.identity.dim, 2)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    y = torch.tensor([0] * 6 + [1] * 6)
    for _ in range(50):
        optimizer.zero_grad()
        nn.functional.cross_entropy(head(vectors), y).backward()
        optimizer.step()
    checkpoint = make_checkpoint(head, model_name="efficientnet_lite0", model_version=3, classes=["red", "blue"],
                                 in_channels=3, config={"project": "colours"}, backbone=backbone.identity)
    return checkpoint, images


def test_head_checkpoint_round_trip(tmp_path):
    checkpoint, _ = _trained_embedding_checkpoint(tmp_path)
    assert checkpoint["mode"] == "embedding" and checkpoint["backbone"]["input_size"] == 32
    restored = torch.load(io.BytesIO(checkpoint_bytes(checkpoint)), weights_only=True)
    loaded = model_from_checkpoint(restored, project="colours", device=torch.device("cpu"))
    assert loaded.spec is None and loaded.backbone == BackboneIdentity.from_dict(checkpoint["backbone"])
    x = torch.randn(4, 1280)
    original = build_head(1280, 2)
    original.load_state_dict(checkpoint["model"])
    with torch.inference_mode():
        assert torch.allclose(loaded.model(x), original.eval()(x))
    # The head is all a checkpoint carries: small, whatever the backbone's size.
    assert len(checkpoint_bytes(checkpoint)) < 50_000


def test_the_readme_raw_image_example_runs(tmp_path, monkeypatch, capsys):
    checkpoint, images = _trained_embedding_checkpoint(tmp_path)
    (tmp_path / "model.pt").write_bytes(checkpoint_bytes(checkpoint))
    (tmp_path / "cat.jpg").write_bytes(images[0])  # red
    (tmp_path / "dog.png").write_bytes(images[-1])  # blue
    text = README.read_text()
    example = re.search(r"<!-- raw-image example -->\s*```python\n(.*?)```", text, re.S)
    assert example, "README lost its raw-image example"
    assert len(example.group(1).strip().splitlines()) <= 5
    monkeypatch.chdir(tmp_path)
    exec(compile(example.group(1), "README.md", "exec"), {})
    lines = capsys.readouterr().out.split()
    assert lines[0] == "red" and lines[2] == "blue", lines
    assert all(0.5 < float(v) <= 1.0 for v in lines[1::2])


def test_a_head_on_other_weights_is_refused(tmp_path):
    checkpoint, _ = _trained_embedding_checkpoint(tmp_path)
    checkpoint["backbone"]["weights_sha256"] = "0" * 64
    with pytest.raises(UserError, match="not the ones this head was trained on"):
        load_classifier(checkpoint_bytes(checkpoint), device="cpu")


def test_whole_network_checkpoints_classify_raw_images_too(tmp_path):
    from alpipe.models import build_model

    model = build_model("small_cnn", 3, in_channels=1)
    checkpoint = make_checkpoint(model, model_name="small_cnn", model_version=1, classes=["a", "b", "c"],
                                 in_channels=1, config={})
    clf = load_classifier(checkpoint_bytes(checkpoint), device="cpu")
    probs = clf.predict_proba([Image.new("L", (28, 28), 9), _png((5, 5, 5))])
    assert probs.shape == (2, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


# --- devices -------------------------------------------------------------------------------------------


def test_device_selection(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_batch_size_and_precision_follow_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert embed_batch_size(cpu) == 32 and embed_batch_size(cuda) == 256
    assert embed_batch_size(cuda, 1024) == 1024
    with autocast(cpu):
        assert not torch.is_autocast_enabled("cpu")
    context = autocast(cuda)
    assert isinstance(context, torch.autocast)
    assert context.fast_dtype == torch.float16 and context.device == "cuda"
