"""The active-learning loop in one process: the simulated oracle answers from known labels."""

from __future__ import annotations

import io
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import keys
from .checkpoints import checkpoint_bytes
from .data import load_dataset, stratified_split
from .errors import UserError
from .images import decode_images
from .models import build_model, get_model_spec, model_in_channels
from .results import CurvePoint
from .storage import ObjectStore
from .strategies import get_strategy, rank, subsample_pool
from .training import TrainConfig, evaluate, fit, make_checkpoint, predict_proba, resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentConfig:
    dataset: str = "mnist5k"
    strategies: tuple[str, ...] = ("margin", "least_confidence", "random")
    seeds: int = 3
    initial: int = 20
    query_size: int = 10
    budget: int = 300
    model: str = "small_cnn"
    pretrained: bool = True
    weights: str | None = None
    pool_size: int = 0
    test_fraction: float = 0.2
    split_seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "auto"

    def validate(self) -> None:
        for name in self.strategies:
            get_strategy(name)
        get_model_spec(self.model)
        if not self.strategies:
            raise UserError("give at least one strategy")
        if self.seeds < 1:
            raise UserError(f"--seeds must be at least 1, got {self.seeds}")
        if self.initial < 1:
            raise UserError(f"--initial must be at least 1, got {self.initial}")
        if self.query_size < 1:
            raise UserError(f"--query-size must be at least 1, got {self.query_size}")
        if self.budget < self.initial:
            raise UserError(f"--budget ({self.budget}) is smaller than the initial random set "
                            f"(--initial {self.initial}); raise the budget or lower --initial")
        if self.pool_size < 0:
            raise UserError(f"--pool-size must be 0 (all) or positive, got {self.pool_size}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PreparedData:
    """The dataset decoded once at the model's input size, split into pool and test."""

    name: str
    classes: list[str]
    ids: list[str]
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    is_test: np.ndarray
    in_channels: int


def prepare_data(config: ExperimentConfig, *, store: ObjectStore, cache_dir: Path) -> PreparedData:
    """Load (ingesting on first use) and decode the dataset; check the budget fits the pool."""
    manifest = load_dataset(config.dataset, store=store, cache_dir=cache_dir)
    labeled = [s for s in manifest.samples if s.label is not None]
    spec = get_model_spec(config.model)
    in_channels = model_in_channels(spec, manifest.channels)
    labels_str = [s.label for s in labeled]
    is_test = stratified_split(labels_str, test_fraction=config.test_fraction, seed=config.split_seed)
    n_pool = int((~is_test).sum())
    if config.budget > n_pool:
        raise UserError(f"--budget {config.budget} is larger than the pool ({n_pool} images of "
                        f"{manifest.name} after the test split); lower --budget or --test-fraction")
    class_index = {c: i for i, c in enumerate(manifest.classes)}
    ids = [s.id for s in labeled]
    cache_key = keys.tensor_cache_key(manifest.name, spec.input_size, in_channels)
    images = load_tensor_cache(store, cache_key, ids)
    if images is None:
        images = decode_images(store, ids, size=spec.input_size, channels=in_channels,
                               desc=f"decoding {manifest.name}")
        save_tensor_cache(store, cache_key, ids, images)
    labels = torch.tensor([class_index[s.label] for s in labeled], dtype=torch.int64)
    return PreparedData(manifest.name, manifest.classes, ids, images, labels, is_test, in_channels)


def load_tensor_cache(store: ObjectStore, key: str, ids: list[str]) -> torch.Tensor | None:
    """Decoded images from an earlier run, when they are for exactly these ids."""
    if not store.exists(key):
        return None
    cached = torch.load(io.BytesIO(store.get_bytes(key)), weights_only=True)
    return cached["images"] if cached["ids"] == ids else None


def save_tensor_cache(store: ObjectStore, key: str, ids: list[str], images: torch.Tensor) -> None:
    buf = io.BytesIO()
    torch.save({"ids": ids, "images": images}, buf)
    store.put_bytes(key, buf.getvalue())


def run_one(data: PreparedData, *, strategy_name: str, seed: int, config: ExperimentConfig,
            store: ObjectStore | None = None, checkpoint_prefix: str | None = None) -> list[CurvePoint]:
    """One learning curve: initial random set, then query → oracle → retrain until the budget."""
    strategy = get_strategy(strategy_name)
    spec = get_model_spec(config.model)
    device = resolve_device(config.device)
    # The initial set and the model's init depend on the seed only, so strategies share them.
    rng_init = np.random.default_rng([seed, 0])
    rng_query = np.random.default_rng([seed, 1, sum(map(ord, strategy_name))])
    pool = np.flatnonzero(~data.is_test)
    test = np.flatnonzero(data.is_test)
    test_x, test_y = data.images[test], data.labels[test]
    is_labeled = np.zeros(len(data.ids), dtype=bool)
    is_labeled[rng_init.choice(pool, size=config.initial, replace=False)] = True

    def new_model() -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model(config.model, len(data.classes), in_channels=data.in_channels,
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
            device=device, seed=seed * 100_003 + round_no, holdout=(test_x, test_y))
        train_s = time.perf_counter() - started
        accuracy = evaluate(model, test_x, test_y, spec=spec, device=device)
        point = CurvePoint(strategy_name, seed, round_no, len(labeled), accuracy, train_s, score_s)
        points.append(point)
        log.info("%-16s seed=%d round=%-3d labels=%-4d acc=%.4f  train=%.1fs score=%.2fs",
                 strategy_name, seed, round_no, len(labeled), accuracy, train_s, score_s)
        if len(labeled) >= config.budget:
            break
        started = time.perf_counter()
        candidates = subsample_pool(np.flatnonzero(~is_labeled & ~data.is_test), config.pool_size, rng_query)
        if strategy.needs_model:
            probs = predict_proba(model, data.images[candidates], spec=spec, device=device)
        else:
            probs = np.zeros((len(candidates), len(data.classes)), dtype=np.float32)
        k = min(config.query_size, config.budget - len(labeled))
        chosen = candidates[rank(strategy.score(probs, rng=rng_query), k)]
        is_labeled[chosen] = True  # the simulated oracle: known labels are revealed
        score_s = time.perf_counter() - started
        round_no += 1
    if store is not None and checkpoint_prefix:
        checkpoint = make_checkpoint(model, model_name=config.model, model_version=round_no,
                                     classes=data.classes, in_channels=data.in_channels,
                                     config=config.as_dict())
        store.put_bytes(f"{checkpoint_prefix}{strategy_name}-seed{seed}.pt", checkpoint_bytes(checkpoint))
    return points


def run_experiment(config: ExperimentConfig, *, store: ObjectStore, cache_dir: Path,
                   experiment: str) -> list[CurvePoint]:
    """Every strategy × seed on one prepared dataset; returns all curve points."""
    config.validate()
    data = prepare_data(config, store=store, cache_dir=cache_dir)
    log.info("%s: %d pool / %d test images, %d classes, model %s",
             data.name, int((~data.is_test).sum()), int(data.is_test.sum()), len(data.classes), config.model)
    points: list[CurvePoint] = []
    for seed in range(config.seeds):
        for strategy_name in config.strategies:
            points += run_one(data, strategy_name=strategy_name, seed=seed, config=config, store=store,
                              checkpoint_prefix=keys.experiment_key(experiment, "checkpoints/"))
    return points
