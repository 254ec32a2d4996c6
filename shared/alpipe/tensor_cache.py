"""Decoded images kept in a worker process, so each image is fetched and decoded once per process.

Trainer and scorer workers are long-lived (rq SimpleWorker, no fork), so a cache in process memory
survives from one job to the next: a scorer scoring round after round of the same pool decodes
each image once, and a trainer retraining on a growing label set decodes only the new labels.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from . import records
from .images import decode_image
from .storage import ObjectStore


class TensorCache:
    """LRU of uint8 (C, H, W) tensors keyed by (sample id, size, channels), bounded in bytes."""

    def __init__(self, max_bytes: int, *, fetch_threads: int = 8):
        self.max_bytes = max(0, int(max_bytes))
        self.fetch_threads = max(1, fetch_threads)
        self._items: OrderedDict[tuple[str, int, int], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_megabytes(cls, mb: int) -> TensorCache:
        return cls(mb * 1024 * 1024)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get_many(self, store: ObjectStore, ids: Sequence[str], *, size: int, channels: int) -> torch.Tensor:
        """uint8 tensor (N, channels, size, size) of the ids, in order; misses are fetched and decoded."""
        out = torch.empty((len(ids), channels, size, size), dtype=torch.uint8)
        missing: list[int] = []
        with self._lock:
            for i, sample_id in enumerate(ids):
                cached = self._items.get((sample_id, size, channels))
                if cached is None:
                    missing.append(i)
                else:
                    self._items.move_to_end((sample_id, size, channels))
                    out[i] = cached
            self.hits += len(ids) - len(missing)
            self.misses += len(missing)
        if not missing:
            return out

        def load(i: int) -> torch.Tensor:
            return decode_image(records.read_image(store, ids[i]), size=size, channels=channels)

        # Object-store reads are latency-bound (S3): overlap them; PIL releases the GIL while decoding.
        if len(missing) > 1 and self.fetch_threads > 1:
            with ThreadPoolExecutor(min(self.fetch_threads, len(missing))) as pool:
                decoded = list(pool.map(load, missing))
        else:
            decoded = [load(i) for i in missing]
        with self._lock:
            for i, tensor in zip(missing, decoded, strict=True):
                out[i] = tensor
                self._put((ids[i], size, channels), tensor)
        return out

    def _put(self, key: tuple[str, int, int], tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if size > self.max_bytes:
            return
        previous = self._items.pop(key, None)
        if previous is not None:
            self._bytes -= previous.numel() * previous.element_size()
        self._items[key] = tensor
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= evicted.numel() * evicted.element_size()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
