import functools
import io

import numpy as np
import pytest
from PIL import Image

from alpipe import keys
from alpipe.data import (
    BUILTIN_DATASETS,
    PHOTOS,
    ingest_folder,
    load_dataset,
    materialize_builtin,
    sha256_hex,
    stratified_split,
)
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


@pytest.mark.parametrize("source", ["", "  "])
def test_an_empty_dataset_name_is_a_user_error_not_the_current_directory(tmp_path, store, monkeypatch, source):
    monkeypatch.chdir(tmp_path)  # a folder that holds an image: ingesting "." would succeed
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(UserError, match="no dataset given.*mnist5k"):
        load_dataset(source, store=store, cache_dir=tmp_path / "cache")
    assert not list(store.list(""))


def test_builtin_digits_materializes_through_the_folder_path(tmp_path, store):
    manifest = load_dataset("digits", store=store, cache_dir=tmp_path / "cache")
    assert manifest.classes == [str(i) for i in range(10)]
    assert len(manifest.samples) > 1700  # 1,797 images, a few are pixel-identical
    assert manifest.channels == 1
    assert (tmp_path / "cache" / "digits" / "3").is_dir()
    again = load_dataset("digits", store=store, cache_dir=tmp_path / "cache")
    assert again.samples == manifest.samples


def png_files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_builtin_photos_are_distinct_rgb_patches_one_class_per_photo():
    images, labels = BUILTIN_DATASETS["photos"]()
    assert images.shape == (len(labels), 128, 128, 3) and images.dtype == np.uint8
    classes, counts = np.unique(labels, return_counts=True)
    assert len(classes) >= 6 and set(classes) == set(PHOTOS)
    assert {"astronaut", "chelsea", "coffee", "rocket"} <= set(classes)
    assert all(200 <= n <= 300 for n in counts)
    assert len({img.tobytes() for img in images}) == len(images)


def test_builtin_photos_materialize_as_the_same_rgb_files_in_any_folder(tmp_path, store, monkeypatch):
    # a few patches a photo: writing all 2,000 twice would make this test slow, not more thorough
    monkeypatch.setitem(BUILTIN_DATASETS, "photos", functools.partial(BUILTIN_DATASETS["photos"], per_class=4))
    first = materialize_builtin("photos", tmp_path / "a")
    files = png_files(first)
    assert files == png_files(materialize_builtin("photos", tmp_path / "b"))
    assert sorted({name.split("/")[0] for name in files}) == sorted(PHOTOS)
    for data in files.values():
        with Image.open(io.BytesIO(data)) as img:
            assert (img.mode, img.size) == ("RGB", (128, 128))
    manifest = load_dataset("photos", store=store, cache_dir=tmp_path / "a")
    assert manifest.classes == sorted(PHOTOS) and manifest.channels == 3
    assert len(manifest.samples) == len(files) and not manifest.skipped


@pytest.mark.parametrize("name, expected", [
    ("mnist5k", {"0/00000.png": "bc1c0c448389ca55f70529ac80dd6a9871be331abd547a09fb61463b40df7f5b",
                 "0/00019.png": "d9c017b087d6e64eb93b86085b5848bdfb2c3ed251b4fc61d6550a18ece77f46"}),
    ("digits", {"0/00000.png": "db76c008f92a420b6622c148436248828d9ffc52480d2fe164bd482d50b4e706",
                "9/00019.png": "6a4ffd81c4db8d322784453a989661263f78cd9d2d091b4f163bc1de14232155"}),
])
def test_grayscale_builtins_keep_their_files_and_ids(tmp_path, monkeypatch, name, expected):
    # The first 20 images already span each set's full intensity range, so they are scaled as in the
    # whole set; the hashes are the sample ids these files had before built-ins could be in colour.
    full = BUILTIN_DATASETS[name]
    monkeypatch.setitem(BUILTIN_DATASETS, name, lambda: tuple(a[:20] for a in full()))
    files = png_files(materialize_builtin(name, tmp_path))
    assert len(files) == 20
    for data in files.values():
        with Image.open(io.BytesIO(data)) as img:
            assert img.mode == "L"
    assert {path: sha256_hex(files[path]) for path in expected} == expected


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
