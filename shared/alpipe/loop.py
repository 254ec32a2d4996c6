"""The active-learning loop in one process: the simulated oracle answers from known labels."""

from __future__ import annotations

import io
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import records
from .checkpoints import checkpoint_bytes
from .config import get_settings
from .data import load_dataset, stratified_split
from .embeddings import BackboneIdentity, EmbeddingCache, build_head, load_backbone
from .errors import UserError
from .image_probe import image_kind
from .images import decode_images
from .model_specs import AUTO, check_model_name, check_strategy_fits, model_spec, resolve_auto, uses_embeddings
from .models import ModelSpec, build_model, model_in_channels
from .results import CurvePoint
from .schemas import DatasetManifest, SampleRecord, class_index
from .storage import ObjectStore
from .strategies import check_cold_start, cold_start_for, get_strategy, rank, subsample_pool
from .strategies.features import label_free_features
from .strategies.representative import lift_by_shard
from .strategies.typiclust import typiclust_select
from .training import (
    TrainConfig,
    checkpoint_config,
    evaluate,
    fit,
    make_checkpoint,
    predict_mc_proba,
    predict_proba,
    resolve_device,
    round_seed,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentConfig:
    dataset: str = "mnist5k"
    strategies: tuple[str, ...] = ("margin", "least_confidence", "random")
    seeds: int = 3
    initial: int = 20
    query_size: int = 10
    budget: int = 300
    model: str = "auto"
    pretrained: bool = True
    weights: str | None = None
    finetune: bool | None = None  # None: embedding mode for pretrained backbones, whole network otherwise
    input_size: int | None = None  # images are resized to this many pixels (None = the model's default)
    pool_size: int = 0
    cold_start: str | None = None  # "typiclust" or "random"; None: the strategy's own (random for random)
    mc_samples: int = 20  # MC-dropout passes for bald
    test_fraction: float = 0.2
    split_seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "auto"

    def validate(self) -> None:
        for name in self.strategies:
            get_strategy(name)
        check_model_name(self.model)
        uses_embeddings(self.model, finetune=self.finetune, pretrained=self.pretrained)
        for name in self.strategies:
            check_strategy_fits(name, self.model, finetune=self.finetune, pretrained=self.pretrained)
        if self.input_size is not None and not 32 <= self.input_size <= 512:
            raise UserError(f"--input-size must be between 32 and 512, got {self.input_size}")
        if not self.strategies:
            raise UserError("give at least one strategy")
        if self.seeds < 1:
            raise UserError(f"--seeds must be at least 1, got {self.seeds}")
        if self.initial < 1:
            raise UserError(f"--initial must be at least 1, got {self.initial}")
        if self.query_size < 1:
            raise UserError(f"--query-size must be at least 1, got {self.query_size}")
        if self.budget < self.initial:
            raise UserError(f"--budget ({self.budget}) is smaller than the initial set "
                            f"(--initial {self.initial}); raise the budget or lower --initial")
        check_cold_start(self.cold_start)
        if any(get_strategy(name).needs_mc for name in self.strategies) and self.mc_samples < 2:
            raise UserError(f"--mc-samples must be at least 2 for bald, got {self.mc_samples}")
        if self.pool_size < 0:
            raise UserError(f"--pool-size must be 0 (all) or positive, got {self.pool_size}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PreparedData:
    """The dataset decoded once at the model's input size (or embedded once), split into pool and test."""

    name: str
    classes: list[str]
    ids: list[str]
    images: torch.Tensor  # uint8 (N, C, H, W), or float16 embeddings (N, dim) in embedding mode
    labels: torch.Tensor  # int64 (N,)
    is_test: np.ndarray
    in_channels: int
    model: str  # the model 'auto' resolved to
    input_size: int | None = None  # images were resized to this instead of the model's default
    backbone: BackboneIdentity | None = None  # embedding mode's backbone
    _features: np.ndarray | None = field(default=None, repr=False)

    def label_free_features(self) -> np.ndarray:
        """TypiClust's features of every image (computed on first use): pixels or embeddings, reduced."""
        if self._features is None:
            self._features = label_free_features(self.images.numpy())
        return self._features

    @property
    def spec(self) -> ModelSpec | None:
        """How inputs are normalized: None in embedding mode (embeddings go to the head as they are)."""
        return None if self.backbone is not None else model_spec(self.model, self.input_size)


def resolve_model(config: ExperimentConfig, manifest: DatasetManifest, store: ObjectStore) -> tuple[str, int | None]:
    """(model, input size) to run: config's, or for 'auto' and an unset size the choice for this
    dataset's kind of images (model_specs.auto_model and auto_input_size)."""
    if config.model != AUTO and config.input_size is not None:
        return config.model, config.input_size
    grayscale, max_side = image_kind(store, [s.id for s in manifest.samples])
    return resolve_auto(config.model, config.input_size, finetune=config.finetune,
                        grayscale=grayscale and manifest.channels == 1, max_side=max_side)


def prepare_data(config: ExperimentConfig, *, store: ObjectStore, cache_dir: Path) -> PreparedData:
    """Load (ingesting on first use) and decode or embed the dataset; check the budget fits the pool."""
    manifest = load_dataset(config.dataset, store=store, cache_dir=cache_dir)
    labeled = [s for s in manifest.samples if s.label is not None]
    model, input_size = resolve_model(config, manifest, store)
    config = replace(config, input_size=input_size)
    if uses_embeddings(model, finetune=config.finetune, pretrained=config.pretrained):
        labeled, vectors, backbone = _embed(labeled, model=model, config=config, store=store, name=manifest.name)
        return _split_data(config, manifest, labeled, vectors, in_channels=3, model=model, backbone=backbone)
    spec = model_spec(model, config.input_size)
    in_channels = model_in_channels(spec, manifest.channels)
    ids = [s.id for s in labeled]
    cache = (manifest.name, spec.input_size, in_channels)
    images = load_tensor_cache(store, cache, ids)
    if images is None:
        images = decode_images(store, ids, size=spec.input_size, channels=in_channels,
                               desc=f"decoding {manifest.name}")
        save_tensor_cache(store, cache, ids, images)
    return _split_data(config, manifest, labeled, images, in_channels=in_channels, model=model,
                       input_size=spec.input_size)


def _embed(labeled: list[SampleRecord], *, model: str, config: ExperimentConfig, store: ObjectStore,
           name: str) -> tuple[list[SampleRecord], torch.Tensor, BackboneIdentity]:
    """Embeddings of the samples (computed once per backbone, then read from the store); unusable images dropped."""
    backbone = load_backbone(model, input_size=config.input_size, weights_path=config.weights,
                             device=resolve_device(config.device))
    with tqdm(total=len(labeled), desc=f"embedding {name} ({backbone.identity.id})", unit="img",
              disable=len(labeled) < 100) as bar:
        vectors, ok, result = EmbeddingCache().get_many(store, [s.id for s in labeled], backbone=backbone,
                                                        on_progress=bar.update)
    log.info("%s: embeddings by %s: %d computed, %d already stored, %d unusable", name, backbone.identity.id,
             result.computed, result.found, len(result.failed))
    keep = np.flatnonzero(ok)
    return [labeled[i] for i in keep], vectors[torch.from_numpy(keep)], backbone.identity


def _split_data(config: ExperimentConfig, manifest: DatasetManifest, labeled: list[SampleRecord],
                inputs: torch.Tensor, *, in_channels: int, model: str, input_size: int | None = None,
                backbone: BackboneIdentity | None = None) -> PreparedData:
    labels_str = [s.label for s in labeled]
    is_test = stratified_split(labels_str, test_fraction=config.test_fraction, seed=config.split_seed)
    n_pool = int((~is_test).sum())
    if config.budget > n_pool:
        raise UserError(f"--budget {config.budget} is larger than the pool ({n_pool} images of "
                        f"{manifest.name} after the test split); lower --budget or --test-fraction")
    index = class_index(manifest.classes)
    labels = torch.tensor([index[s.label] for s in labeled], dtype=torch.int64)
    return PreparedData(manifest.name, manifest.classes, [s.id for s in labeled], inputs, labels, is_test,
                        in_channels, model, input_size, backbone)


def load_tensor_cache(store: ObjectStore, cache: tuple[str, int, int], ids: list[str]) -> torch.Tensor | None:
    """Decoded images of (dataset, size, channels) from an earlier run, when they are for exactly these ids."""
    data = records.read_tensor_cache(store, *cache)
    if data is None:
        return None
    cached = torch.load(io.BytesIO(data), weights_only=True)
    return cached["images"] if cached["ids"] == ids else None


def save_tensor_cache(store: ObjectStore, cache: tuple[str, int, int], ids: list[str], images: torch.Tensor) -> None:
    buf = io.BytesIO()
    torch.save({"ids": ids, "images": images}, buf)
    records.write_tensor_cache(store, *cache, buf.getvalue())


def random_initial_set(pool: np.ndarray, n: int, *, seed: int) -> np.ndarray:
    """The random cold start: n pool indices fixed by the seed alone, so every strategy (and the baal peer of
    the bench) with a random start begins from the same images."""
    return np.random.default_rng([seed, 0]).choice(pool, size=n, replace=False)


def typiclust_batch(data: PreparedData, is_labeled: np.ndarray, pool: np.ndarray, k: int, *, seed: int) -> np.ndarray:
    """TypiClust's next k pool images, the labeled ones covering their clusters.

    The batch a model trained on fewer labels than k does not choose: at query 100 after 20 initial
    labels, margin from the 20-label model chose worse than TypiClust (README, The default: auto). The
    services behave the same way by construction: their first model is trained on query_size labels,
    all of them from the cold-start order (unless one is asked for earlier with POST /train).
    """
    picks = typiclust_select(data.label_free_features()[pool], k, labeled=is_labeled[pool],
                             seed=seed + int(is_labeled.sum()))
    return pool[picks]


def run_one(data: PreparedData, *, strategy_name: str, seed: int, config: ExperimentConfig,
            store: ObjectStore | None = None, experiment: str | None = None) -> list[CurvePoint]:
    """One learning curve: initial set (TypiClust or random), then query → oracle → retrain until the budget.

    With a TypiClust cold start, a batch larger than the labeled set is TypiClust's too (typiclust_batch).
    A strategy with representative picks (auto) lifts them per shard_size slice of the pool, as the scorers do.

    With a store and an experiment name, the final model goes to the experiment's checkpoints/ folder."""
    strategy = get_strategy(strategy_name)
    # Representative picks are made per score shard in the services; the same slices here serve the same images.
    shard_size = get_settings().shard_size
    spec = data.spec
    device = resolve_device(config.device)
    rng_query = np.random.default_rng([seed, 1, sum(map(ord, strategy_name))])
    pool = np.flatnonzero(~data.is_test)
    test = np.flatnonzero(data.is_test)
    test_x, test_y = data.images[test], data.labels[test]
    is_labeled = np.zeros(len(data.ids), dtype=bool)
    typiclust_start = cold_start_for(strategy_name, config.cold_start) == "typiclust"
    # The initial set and the model's init depend on the seed and the cold start only, so strategies with the
    # same cold start share them.
    if typiclust_start:
        is_labeled[pool[typiclust_select(data.label_free_features()[pool], config.initial, seed=seed)]] = True
    else:
        is_labeled[random_initial_set(pool, config.initial, seed=seed)] = True

    def new_model() -> torch.nn.Module:
        torch.manual_seed(seed)
        if data.backbone is not None:
            return build_head(data.backbone.dim, len(data.classes)).to(device)
        return build_model(data.model, len(data.classes), in_channels=data.in_channels,
                           pretrained=config.pretrained, weights_path=config.weights).to(device)

    model = new_model()
    points: list[CurvePoint] = []
    round_no, score_s = 0, 0.0
    while True:
        labeled = np.flatnonzero(is_labeled)
        if round_no > 0 and not config.train.warm_start:
            model = new_model()
        started = time.perf_counter()
        fit(model, data.images[labeled], data.labels[labeled], spec=spec, config=config.train,
            device=device, seed=round_seed(seed, round_no), holdout=(test_x, test_y))
        train_s = time.perf_counter() - started
        accuracy = evaluate(model, test_x, test_y, spec=spec, device=device)
        point = CurvePoint(strategy_name, seed, round_no, len(labeled), accuracy, train_s, score_s)
        points.append(point)
        log.info("%-16s seed=%d round=%-3d labels=%-4d acc=%.4f  train=%.1fs score=%.2fs",
                 strategy_name, seed, round_no, len(labeled), accuracy, train_s, score_s)
        if len(labeled) >= config.budget:
            break
        started = time.perf_counter()
        k = min(config.query_size, config.budget - len(labeled))
        if typiclust_start and k > len(labeled):
            chosen = typiclust_batch(data, is_labeled, pool, k, seed=seed)
        else:
            candidates = subsample_pool(np.flatnonzero(~is_labeled & ~data.is_test), config.pool_size, rng_query)
            if strategy.needs_mc:
                probs = predict_mc_proba(model, data.images[candidates], spec=spec, device=device,
                                         samples=config.mc_samples, seed=round_seed(seed, round_no))
            elif strategy.needs_model:
                probs = predict_proba(model, data.images[candidates], spec=spec, device=device)
            else:
                probs = np.zeros((len(candidates), len(data.classes)), dtype=np.float32)
            scores = strategy.score(probs, rng=rng_query)
            if strategy.representative_picks:
                scores = lift_by_shard(scores, data.images[candidates].numpy(), k, shard_size=shard_size,
                                       seed=round_seed(seed, round_no))
            chosen = candidates[rank(scores, k)]
        is_labeled[chosen] = True  # the simulated oracle: known labels are revealed
        score_s = time.perf_counter() - started
        round_no += 1
    if store is not None and experiment:
        checkpoint = make_checkpoint(model, model_name=data.model, model_version=round_no,
                                     classes=data.classes, in_channels=data.in_channels, backbone=data.backbone,
                                     input_size=None if data.backbone else data.input_size,
                                     config=checkpoint_config(config.train, n_labeled=int(is_labeled.sum()), seed=seed,
                                                              source=f"{experiment}/{strategy_name}"))
        records.write_experiment_file(store, experiment, f"checkpoints/{strategy_name}-seed{seed}.pt",
                                      checkpoint_bytes(checkpoint))
    return points


def run_experiment(config: ExperimentConfig, *, store: ObjectStore, cache_dir: Path,
                   experiment: str) -> list[CurvePoint]:
    """Every strategy × seed on one prepared dataset; returns all curve points."""
    config.validate()
    data = prepare_data(config, store=store, cache_dir=cache_dir)
    for name in config.strategies:
        check_strategy_fits(name, data.model, finetune=config.finetune, pretrained=config.pretrained)
    log.info("%s: %d pool / %d test images, %d classes, model %s%s",
             data.name, int((~data.is_test).sum()), int(data.is_test.sum()), len(data.classes), data.model,
             f" (embedding mode, backbone {data.backbone.id})" if data.backbone else "")
    points: list[CurvePoint] = []
    for seed in range(config.seeds):
        for strategy_name in config.strategies:
            points += run_one(data, strategy_name=strategy_name, seed=seed, config=config, store=store,
                              experiment=experiment)
    return points
