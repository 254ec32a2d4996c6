"""What kind of images a set is (grayscale? how large?), read from image headers only (no torch)."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image

from . import records
from .data import GRAYSCALE_MODES
from .storage import ObjectStore


def image_kind(store: ObjectStore, ids: Sequence[str], *, limit: int = 64) -> tuple[bool, int]:
    """(every image grayscale, the largest side in pixels) over the first `limit` ids.

    PIL reads only the header here, so this costs one small read per image.
    """
    grayscale, max_side = True, 0
    for sample_id in list(ids)[:limit]:
        with Image.open(io.BytesIO(records.read_image(store, sample_id))) as img:
            grayscale = grayscale and img.mode in GRAYSCALE_MODES
            max_side = max(max_side, *img.size)
    return grayscale, max_side
