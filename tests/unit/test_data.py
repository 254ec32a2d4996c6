import io

import numpy as np
import pytest
from PIL import Image

from alpipe import keys
from alpipe.data import ingest_folder, load_dataset, stratified_split
from alpipe.errors import UserError
from alpipe.images import decode_image
from alpipe.storage import LocalStore


def png_bytes(value: int, mode: str = "L", size: int = 12) -> bytes:
    buf = io.BytesIO()
    color = value if mode == "L" else (value, 255 - value, value // 2)
    Image.new(mode, (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root, layout: dict[str, dict[str, bytes]]):
    for cls, files in layout.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (root / cls / name).write_bytes(data)
    return root


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


def test_image_folder_ingestion_skips_junk_and_reports_it(tmp_path, store):
    jpeg = io.BytesIO()
    Image.new("RGB", (10, 10), (200, 10, 10)).save(jpeg, format="JPEG")
    folder = make_folder(tmp_path / "pets", {
        "6_great_dane": {"a.png": png_bytes(10), "b.jpg": jpeg.getvalue(), "notes.txt": b"not an image"},
        "cat": {"c.png": png_bytes(200), "truncated.png": png_bytes(90)[:40]},
    })
    (folder / "README.md").write_text("stray file at the top")
    (folder / "cat" / ".DS_Store").write_bytes(b"\0\0")

    manifest = ingest_folder(folder, store=store)

    assert manifest.name == "pets"
    assert manifest.classes == ["6_great_dane", "cat"]
    assert sorted(s.name for s in manifest.samples) == ["6_great_dane/a.png", "6_great_dane/b.jpg", "cat/c.png"]
    assert manifest.channels == 3  # one JPEG is in color
    skipped = "\n".join(manifest.skipped)
    assert "6_great_dane/notes.txt: not a readable image" in skipped
    assert "cat/truncated.png: not a readable image" in skipped
    assert "README.md: not inside a class folder" in skipped
    assert ".DS_Store" not in skipped
    for sample in manifest.samples:
        data = store.get_bytes(keys.image_key(sample.id))
        assert sample.id == __import__("hashlib").sha256(data).hexdigest()
    assert store.exists(keys.dataset_manifest_key("pets"))


def test_ids_are_content_hashes_and_duplicates_are_stored_once(tmp_path, store):
    same = png_bytes(42)
    folder = make_folder(tmp_path / "d", {"a": {"1.png": same, "2.png": same}, "b": {"3.png": png_bytes(7)}})
    manifest = ingest_folder(folder, store=store)
    assert len(manifest.samples) == 2
    assert manifest.channels == 1
    assert len(list(store.list("images/"))) == 2
    again = ingest_folder(folder, store=store)
    assert [s.id for s in again.samples] == [s.id for s in manifest.samples]


def test_same_image_in_two_classes_is_reported(tmp_path, store):
    same = png_bytes(42)
    folder = make_folder(tmp_path / "d", {"a": {"1.png": same}, "b": {"2.png": same, "3.png": png_bytes(1)}})
    manifest = ingest_folder(folder, store=store)
    assert any("b/2.png: same image as a/1.png" in s for s in manifest.skipped)


def test_folder_without_images_is_a_user_error(tmp_path, store):
    folder = make_folder(tmp_path / "empty", {"a": {"x.txt": b"hello"}, "b": {}})
    with pytest.raises(UserError, match="no readable images"):
        ingest_folder(folder, store=store)
    assert not store.exists(keys.dataset_manifest_key("empty"))


def test_unknown_dataset_is_a_user_error(tmp_path, store):
    with pytest.raises(UserError, match="unknown dataset 'mnist6k'.*mnist5k"):
        load_dataset("mnist6k", store=store, cache_dir=tmp_path)


def test_builtin_digits_materializes_through_the_folder_path(tmp_path, store):
    manifest = load_dataset("digits", store=store, cache_dir=tmp_path / "cache")
    assert manifest.classes == [str(i) for i in range(10)]
    assert len(manifest.samples) > 1700  # 1,797 images, a few are pixel-identical
    assert manifest.channels == 1
    assert (tmp_path / "cache" / "digits" / "3").is_dir()
    again = load_dataset("digits", store=store, cache_dir=tmp_path / "cache")
    assert again.samples == manifest.samples


def test_stratified_split_is_deterministic_and_per_class():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    mask = stratified_split(labels, test_fraction=0.2, seed=3)
    assert mask.sum() == 20
    arr = np.array(labels)
    assert [int(mask[arr == c].sum()) for c in "abc"] == [10, 6, 4]
    assert (mask == stratified_split(labels, test_fraction=0.2, seed=3)).all()
    assert (mask != stratified_split(labels, test_fraction=0.2, seed=4)).any()


def test_decode_resizes_and_expands_channels():
    img = decode_image(png_bytes(100, size=8), size=28, channels=3)
    assert img.shape == (3, 28, 28) and img.dtype.is_floating_point is False
    gray = decode_image(png_bytes(100, mode="RGB", size=30), size=28, channels=1)
    assert gray.shape == (1, 28, 28)
