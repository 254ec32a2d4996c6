"""Decoding stored images into uint8 tensors at a model's input size (worker side: needs torch)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import records
from .storage import ObjectStore


def decode_image(data: bytes, *, size: int, channels: int) -> torch.Tensor:
    """uint8 tensor (channels, size, size) from encoded image bytes."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        array = np.array(img, dtype=np.uint8)  # a writable copy: torch shares its memory
    if channels == 1:
        array = array[None, :, :]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def decode_images(store: ObjectStore, ids: list[str], *, size: int, channels: int,
                  desc: str = "decoding") -> torch.Tensor:
    """uint8 tensor (N, channels, size, size) for the given sample ids, decoded once."""
    out = torch.empty((len(ids), channels, size, size), dtype=torch.uint8)
    for i, sample_id in enumerate(tqdm(ids, desc=desc, unit="img", leave=False, disable=len(ids) < 500)):
        out[i] = decode_image(records.read_image(store, sample_id), size=size, channels=channels)
    return out
