"""Embedding mode: a frozen ImageNet backbone embeds each image once, a small head does the learning.

An image's embedding depends only on the image and the backbone's identity (model name, a digest
of its weights, input size, preprocessing), so it is computed once and kept in object storage
under keys.embedding_key(backbone id, sample id): every project and dataset that holds the image
shares the work, and a backbone with other weights gets other keys (recomputed, never mixed).
Embeddings are stored as float16 (half the memory of float32, no measurable change in accuracy).

Who computes them: the scorers' embedding pass (alpipe.scoring.embed_shard) ahead of training;
`EmbeddingCache.get_many` computes whatever is still missing when it is asked for it, so training
and scoring are correct whether or not the pass ran.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import records
from .errors import NotFound, UserError
from .images import decode_image
from .model_specs import ModelSpec, embed_input_size, get_model_spec
from .models import build_backbone, normalize_batch, pretrained_weights_path
from .storage import ObjectStore

log = logging.getLogger(__name__)

EMBED_DTYPE = torch.float16
# Identity format: bump when the way embeddings are computed changes, so old ones are not reused.
_IDENTITY_FORMAT = 1


@dataclass(frozen=True)
class BackboneIdentity:
    """Everything an embedding depends on besides the image; `id` names it in object keys."""

    name: str
    input_size: int
    weights_sha256: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dim: int

    @property
    def id(self) -> str:
        digest = hashlib.sha256(json.dumps([_IDENTITY_FORMAT, self.name, self.input_size, self.weights_sha256,
                                            self.mean, self.std]).encode()).hexdigest()
        return f"{self.name}-{self.input_size}-{digest[:16]}"

    @property
    def spec(self) -> ModelSpec:
        """The backbone's input spec at this identity's input size."""
        return replace(get_model_spec(self.name), input_size=self.input_size)

    def as_dict(self) -> dict:
        return {**asdict(self), "id": self.id}

    @classmethod
    def from_dict(cls, data: dict) -> BackboneIdentity:
        return cls(name=data["name"], input_size=int(data["input_size"]), weights_sha256=data["weights_sha256"],
                   mean=tuple(data["mean"]), std=tuple(data["std"]), dim=int(data["dim"]))


@lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digest(path: Path) -> str:
    """sha256 of a weights file (cached per path, size and mtime: a replaced file is digested anew)."""
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def embed_batch_size(device: torch.device, configured: int = 0) -> int:
    """Images per backbone forward: the configured number, else one that keeps the device busy."""
    if configured > 0:
        return configured
    return 256 if device.type == "cuda" else 32


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Half precision on CUDA (tensor cores, half the memory traffic); full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


class Backbone:
    """A frozen feature extractor on a device, with its identity."""

    def __init__(self, identity: BackboneIdentity, module: nn.Module, *, device: torch.device, batch_size: int = 0):
        self.identity = identity
        self.module = module.to(device).eval()
        self.device = device
        self.batch_size = embed_batch_size(device, batch_size)
        self.forwards = 0  # images run through the backbone by this object (tests count them)
        if device.type == "cuda":
            self.module = self.module.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) images at the identity's input size -> (N, dim) float16 embeddings on the CPU."""
        spec = self.identity.spec
        out = torch.empty((len(images), self.identity.dim), dtype=EMBED_DTYPE)
        for start in range(0, len(images), self.batch_size):
            x = normalize_batch(images[start:start + self.batch_size], spec).to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.device):
                features = self.module(x)
            out[start:start + len(x)] = features.float().to(EMBED_DTYPE).cpu()
        self.forwards += len(images)
        return out


# Width of each backbone's pooled features.
_EMBED_DIMS = {"efficientnet_lite0": 1280, "resnet18": 512}
_backbones: dict[tuple, Backbone] = {}
_backbones_lock = threading.Lock()


def backbone_identity(name: str, *, input_size: int | None = None,
                      weights_path: str | Path | None = None) -> BackboneIdentity:
    """The identity of a backbone without building it (digests the weights file)."""
    spec = get_model_spec(name)
    if name not in _EMBED_DIMS:
        raise UserError(f"{name} has no pretrained backbone; embedding mode needs one of: {', '.join(_EMBED_DIMS)}")
    path = pretrained_weights_path(name, weights_path)
    return BackboneIdentity(name=name, input_size=embed_input_size(name, input_size),
                            weights_sha256=weights_digest(path), mean=spec.mean, std=spec.std, dim=_EMBED_DIMS[name])


def load_backbone(name: str, *, input_size: int | None = None, weights_path: str | Path | None = None,
                  device: torch.device, batch_size: int = 0) -> Backbone:
    """The process's backbone for (name, input size, weights, device), built once and then reused."""
    identity = backbone_identity(name, input_size=input_size, weights_path=weights_path)
    cache_key = (identity.id, str(device), batch_size)
    with _backbones_lock:
        backbone = _backbones.get(cache_key)
        if backbone is None:
            module, dim = build_backbone(name, weights_path=weights_path)
            if dim != identity.dim:
                raise RuntimeError(f"{name}: embedding width {dim}, expected {identity.dim}")
            backbone = Backbone(identity, module, device=device, batch_size=batch_size)
            _backbones[cache_key] = backbone
        return backbone


def write_identity(store: ObjectStore, identity: BackboneIdentity) -> None:
    """Record what a backbone id means next to its embeddings (once), so the layout explains itself."""
    records.write_backbone_identity(store, identity.id, json.dumps(identity.as_dict(), indent=1).encode())


def encode_embedding(vector: torch.Tensor) -> bytes:
    return vector.to(EMBED_DTYPE).contiguous().numpy().tobytes()


def decode_embedding(data: bytes, dim: int) -> torch.Tensor:
    array = np.frombuffer(data, dtype=np.float16)
    if array.size != dim:
        raise ValueError(f"embedding of {array.size} values, expected {dim}")
    return torch.from_numpy(array.copy())


@dataclass
class EmbedResult:
    """What one get_many or embed pass did: embeddings computed, found in storage, images unusable."""

    computed: int = 0
    stored: int = 0  # of the computed ones, how many this call wrote (the others were written meanwhile)
    found: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # sample id -> why it has no embedding


class EmbeddingCache:
    """Embeddings held in this process, per backbone id: memory, then object storage, then the backbone.

    Bounded by max_bytes (least recently used out first). A 5,000-image pool at 1,280 float16
    values is 12.5 MiB.
    """

    def __init__(self, max_bytes: int = 1 << 30, *, fetch_threads: int = 8):
        self.max_bytes = max_bytes
        self.fetch_threads = max(1, fetch_threads)
        self._items: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def _remember(self, backbone_id: str, sample_id: str, vector: torch.Tensor) -> None:
        key = (backbone_id, sample_id)
        with self._lock:
            if key in self._items:
                return
            self._items[key] = vector
            self._bytes += vector.numel() * vector.element_size()
            while self._bytes > self.max_bytes and self._items:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()

    def get_many(self, store: ObjectStore, ids: Sequence[str], *, backbone: Backbone | BackboneIdentity,
                 on_progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, np.ndarray, EmbedResult]:
        """(float16 (N, dim) embeddings, bool mask of the usable ones, what was done) for ids, in order.

        on_progress(n) is called as n more of the ids are handled (found, computed or failed), for a
        progress bar.

        Missing embeddings are computed when a Backbone is given (and written to the store); with
        only an identity they count as failed. Images that cannot be decoded are failed, reported
        in the result and left as zeros in the output.
        """
        identity = backbone.identity if isinstance(backbone, Backbone) else backbone
        bid, dim = identity.id, identity.dim
        out = torch.zeros((len(ids), dim), dtype=EMBED_DTYPE)
        ok = np.zeros(len(ids), dtype=bool)
        result = EmbedResult()
        missing: list[int] = []
        with self._lock:
            for i, sid in enumerate(ids):
                vector = self._items.get((bid, sid))
                if vector is None:
                    missing.append(i)
                else:
                    self._items.move_to_end((bid, sid))
                    out[i], ok[i] = vector, True
        found = self._read_stored(store, ids, missing, identity)
        for i, vector in found.items():
            out[i], ok[i] = vector, True
            self._remember(bid, ids[i], vector)
        result.found = len(found)
        todo = [i for i in missing if i not in found]
        if on_progress is not None:
            on_progress(len(ids) - len(todo))  # in memory or in storage: done already
        if todo and isinstance(backbone, Backbone):
            self._compute(store, ids, todo, backbone, out, ok, result, on_progress)
        elif todo:
            for i in todo:
                result.failed[ids[i]] = "no embedding stored"
        return out, ok, result

    def _read_stored(self, store: ObjectStore, ids: Sequence[str], indices: list[int],
                     identity: BackboneIdentity) -> dict[int, torch.Tensor]:
        def read(i: int) -> tuple[int, torch.Tensor | None]:
            try:
                return i, decode_embedding(records.read_embedding(store, identity.id, ids[i]), identity.dim)
            except NotFound:
                return i, None
            except ValueError as e:  # a damaged object: compute it again
                log.warning("embedding of %s under %s unusable (%s); recomputing", ids[i], identity.id, e)
                return i, None

        if not indices:
            return {}
        if len(indices) > 1 and self.fetch_threads > 1:
            with ThreadPoolExecutor(min(self.fetch_threads, len(indices))) as pool:
                pairs = list(pool.map(read, indices))
        else:
            pairs = [read(i) for i in indices]
        return {i: v for i, v in pairs if v is not None}

    def _compute(self, store: ObjectStore, ids: Sequence[str], todo: list[int], backbone: Backbone,
                 out: torch.Tensor, ok: np.ndarray, result: EmbedResult,
                 on_progress: Callable[[int], None] | None) -> None:
        identity = backbone.identity
        write_identity(store, identity)
        size = identity.input_size

        def decode(i: int) -> tuple[int, torch.Tensor | None, str | None]:
            try:
                return i, decode_image(records.read_image(store, ids[i]), size=size, channels=3), None
            except NotFound:
                return i, None, "image missing from the store"
            except Exception as e:  # PIL raises many kinds for damaged files; the image is skipped, not the pass
                return i, None, f"not a readable image ({type(e).__name__}: {e})"

        batches = [todo[s:s + backbone.batch_size] for s in range(0, len(todo), backbone.batch_size)]

        def decode_batch(batch: list[int]) -> list[tuple[int, torch.Tensor | None, str | None]]:
            return [decode(i) for i in batch]

        # Decoding the next batch and writing the last one's embeddings (an fsync or a PUT each) overlap the
        # backbone's forward of this one: PIL and file/network I/O release the GIL.
        with ThreadPoolExecutor(1) as decoder, ThreadPoolExecutor(self.fetch_threads) as writer:
            written: list[Future[bool]] = []
            last_handled = 0

            def account(futures: list[Future[bool]], handled: int) -> None:
                result.stored += sum(f.result() for f in futures)
                if on_progress is not None and handled:
                    on_progress(handled)

            pending = decoder.submit(decode_batch, batches[0])
            for n in range(len(batches)):
                decoded = pending.result()
                if n + 1 < len(batches):
                    pending = decoder.submit(decode_batch, batches[n + 1])
                good = [(i, t) for i, t, _ in decoded if t is not None]
                for i, _, why in decoded:
                    if why is not None:
                        result.failed[ids[i]] = why
                        log.warning("embedding: skipped %s: %s", ids[i], why)
                vectors = backbone.embed(torch.stack([t for _, t in good])) if good else []
                writes = []
                for (i, _), vector in zip(good, vectors, strict=True):
                    out[i], ok[i] = vector, True
                    writes.append(writer.submit(records.write_embedding, store, identity.id, ids[i],
                                                encode_embedding(vector)))
                    self._remember(identity.id, ids[i], vector.clone())
                result.computed += len(good)
                account(written, last_handled)
                written, last_handled = writes, len(decoded)
            account(written, last_handled)


class EmbeddingHead(nn.Module):
    """What embedding mode trains: per-sample standardization, then a linear layer (or a one-hidden-layer MLP).

    Standardizing each embedding (zero mean, unit variance over its features, no learned scale)
    makes one learning rate fit every backbone.
    """

    def __init__(self, dim: int, n_classes: int, *, hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        if hidden > 0:
            layers += [nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, n_classes)]
        else:
            layers += [nn.Linear(dim, n_classes)]
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(x.float()))


# Logistic regression on the standardized embedding. Measured on the photo set (128 px, 3 seeds, 20 to
# 100 labels): its margin curve led a 256-unit one-hidden-layer MLP's at every budget (0.965 vs 0.939 at
# 30 labels, 0.998 both at 100) and it trains 4x faster.
HEAD_HIDDEN = 0


def build_head(dim: int, n_classes: int, *, hidden: int = HEAD_HIDDEN) -> EmbeddingHead:
    return EmbeddingHead(dim, n_classes, hidden=hidden)
