"""The peer column: baal's own active-learning loop (baal 2.1.0) on exactly our work, as our learning curves.

Same split, model, initial labeled set, query size and budget as alpipe.loop.run_one; baal does the rest
its way: ActiveLearningDataset, MC dropout (MCDropoutModule), ModelWrapper.train_on_dataset with the weights
reset every round, ActiveLearningLoop with baal's heuristics. The bench scores the curves with our measure
(alpipe.results.label_savings against our random curve).

    python -m bench.peer_baal --dataset mnist5k --seeds 1 --budget 60 --heuristics random,margin,bald
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from copy import deepcopy

import numpy as np
import structlog
import torch
from baal.active import ActiveLearningDataset, ActiveLearningLoop, heuristics
from baal.active.heuristics.stochastics import PowerSampling
from baal.bayesian.caching_utils import MCCachingModule
from baal.bayesian.dropout import MCDropoutModule
from baal.modelwrapper import ModelWrapper, TrainingArgs
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import RandomCrop

from alpipe.config import get_settings
from alpipe.loop import ExperimentConfig, PreparedData, prepare_data, random_initial_set
from alpipe.models import ModelSpec, build_model, normalize_batch
from alpipe.results import CurvePoint, mean_curves, savings_table, summarize
from alpipe.storage import open_store
from alpipe.training import resolve_device

log = logging.getLogger("bench.peer_baal")

# baal prints a few structlog lines to stdout per call (training, evaluation, each query); keep warnings only.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
# baal's training-loss metric converts the loss without detaching it: harmless, and not ours to fix.
warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True", module="baal")

HEURISTICS = ("random", "margin", "entropy", "bald", "certainty", "powerbald")

# MC-dropout samples per image, for scoring and for evaluation: the number baal's examples use.
MC_ITERATIONS = 20

# baal trains a fixed number of epochs from the initial weights each round (its examples: 10-20 epochs on
# 200-1000 labels). An epoch is one pass over the labeled set, a single SGD step at 20 labels, so 150 epochs
# give the smallest set 150 steps (ours takes about 100 there) and 1,500 steps at 300 labels. Measured on
# mnist5k (2 seeds at 20, 60, 150, 300 labels): test accuracy still rises by about a point from 100 to 150
# epochs and not beyond, so 150 does not shortchange baal at any size. The cost grows with the labels.
EPOCHS = 150


class LabeledImages(Dataset):
    """uint8 images and labels, normalized per item as the model takes them.

    transform (training augmentation) works on the uint8 image, so pixels shifted in are black, as in ours;
    ActiveLearningDataset sets it to None on the pool (pool_specifics) so that scoring sees clean images.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec: ModelSpec, transform=None):
        self.images, self.labels, self.spec, self.transform = images, labels, spec, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return normalize_batch(image[None], self.spec)[0], self.labels[index]


class PowerBALD(PowerSampling):
    """baal's PowerBALD (BALD scores sampled as a distribution, Kirsch et al. 2022).

    baal 2.1.0's ActiveLearningLoop calls get_ranks(predictions, target_predictions), which its stochastic
    heuristics do not accept (a TypeError); they need no target predictions, so this drops them.
    """

    def __init__(self, query_size: int):
        super().__init__(heuristics.BALD(), query_size=query_size)

    def get_ranks(self, predictions, target_predictions=None):
        return super().get_ranks(predictions)


def make_heuristic(name: str, query_size: int) -> heuristics.AbstractHeuristic:
    """baal's heuristic by our name for it ("certainty" is least confidence)."""
    makers = {
        "random": heuristics.Random,
        "margin": heuristics.Margin,
        "entropy": heuristics.Entropy,
        "bald": heuristics.BALD,
        "certainty": heuristics.Certainty,
        "powerbald": lambda: PowerBALD(query_size),
    }
    if name not in makers:
        raise ValueError(f"unknown baal heuristic {name!r}; use one of {', '.join(HEURISTICS)}")
    return makers[name]()


def mc_probabilities(wrapper: ModelWrapper):
    """ActiveLearningLoop's get_probabilities: MC-dropout softmax outputs (N, classes, iterations).

    predict_on_dataset returns logits. Most heuristics apply softmax themselves, but 2.1.0's Certainty
    takes the max of whatever it is given, so every heuristic gets probabilities.
    """

    def predict(pool: Dataset, **kwargs) -> np.ndarray:
        return torch.from_numpy(wrapper.predict_on_dataset(pool, **kwargs)).softmax(dim=1).numpy()

    return predict


def check_supported(data: PreparedData) -> None:
    if data.backbone is not None:
        raise ValueError("the baal peer runs whole-network small_cnn only, not embedding mode (a head on "
                         f"{data.backbone.id} embeddings); prepare the data with model='small_cnn'")
    if data.model != "small_cnn":
        raise ValueError(f"the baal peer runs small_cnn only, got {data.model!r}")


def initial_labeled(pool: np.ndarray, *, seed: int, n: int) -> np.ndarray:
    """Mask over the pool of the initial labeled set: the very images alpipe.loop.run_one starts from."""
    return np.isin(pool, random_initial_set(pool, n, seed=seed))


def build_wrapper(data: PreparedData, *, seed: int, config: ExperimentConfig) -> ModelWrapper:
    """Our model with MC dropout, wrapped for baal's training: same init as ours, our SGD settings."""
    torch.manual_seed(seed)
    model = build_model(data.model, len(data.classes), in_channels=data.in_channels, pretrained=False)
    # MCCachingModule reuses the convolutions' outputs across the MC samples of a batch (only the layer after
    # the dropout sees new inputs): same predictions, 40% less time for 20-sample scoring on a CPU (measured).
    # It needs replicate_in_memory off.
    model = MCCachingModule(MCDropoutModule(model))
    device = resolve_device(config.device)
    train = config.train
    optimizer = torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                                weight_decay=train.weight_decay)
    # workers=0: the images are already in memory; DataLoader workers would be started anew every epoch.
    args = TrainingArgs(optimizer=optimizer, batch_size=train.batch_size, epoch=EPOCHS,
                        use_cuda=device.type == "cuda", workers=0, criterion=nn.CrossEntropyLoss(),
                        replicate_in_memory=False)
    wrapper = ModelWrapper(model.to(device), args)
    wrapper.add_metric("accuracy", lambda: MulticlassAccuracy(num_classes=len(data.classes), average="micro"))
    return wrapper


def mc_accuracy(wrapper: ModelWrapper, test_set: Dataset) -> float:
    """Top-1 accuracy of the MC-averaged prediction (mean of MC_ITERATIONS dropout samples' logits): how
    baal's ActiveLearningExperiment evaluates."""
    wrapper.test_on_dataset(test_set, average_predictions=MC_ITERATIONS)
    return float(wrapper.get_metrics("test")["test_accuracy"])


def run_baal(data: PreparedData, *, heuristic: str, seed: int, config: ExperimentConfig) -> list[CurvePoint]:
    """One learning curve by baal's loop: the initial set, then train → query → label until the budget."""
    check_supported(data)
    strategy = f"baal-{heuristic}"
    chooser = make_heuristic(heuristic, config.query_size)
    # baal draws from numpy's global generator (Random, PowerBALD, pool subsampling).
    np.random.seed(seed)
    pool = np.flatnonzero(~data.is_test)
    test = np.flatnonzero(data.is_test)
    spec = data.spec
    shift = max(1, spec.input_size // 14)  # our augmentation: shifts of up to this many pixels
    augment = RandomCrop(spec.input_size, padding=shift) if config.train.augment else None
    active_set = ActiveLearningDataset(
        LabeledImages(data.images[pool], data.labels[pool], spec, transform=augment),
        labelled=initial_labeled(pool, seed=seed, n=config.initial),
        pool_specifics={"transform": None},
    )
    test_set = LabeledImages(data.images[test], data.labels[test], spec)
    wrapper = build_wrapper(data, seed=seed, config=config)
    loop = ActiveLearningLoop(active_set, mc_probabilities(wrapper), chooser, query_size=config.query_size,
                              max_sample=config.pool_size or -1, iterations=MC_ITERATIONS, verbose=False)
    # Every round trains from these weights, as baal's examples do (after Gal et al.).
    initial_weights = deepcopy(wrapper.state_dict())
    points: list[CurvePoint] = []
    round_no, score_s = 0, 0.0
    while True:
        wrapper.load_state_dict(initial_weights)
        started = time.perf_counter()
        wrapper.train_on_dataset(active_set)
        train_s = time.perf_counter() - started
        accuracy = mc_accuracy(wrapper, test_set)
        n_labeled = len(active_set)
        points.append(CurvePoint(strategy, seed, round_no, n_labeled, accuracy, train_s, score_s))
        log.info("%-16s seed=%d round=%-3d labels=%-4d acc=%.4f  train=%.1fs score=%.2fs",
                 strategy, seed, round_no, n_labeled, accuracy, train_s, score_s)
        if n_labeled >= config.budget:
            return points
        loop.query_size = min(config.query_size, config.budget - n_labeled)  # the last query hits the budget
        started = time.perf_counter()
        if not loop.step():
            raise RuntimeError(f"{strategy}: baal labeled nothing at {n_labeled} labels")
        score_s = time.perf_counter() - started
        round_no += 1


def curve_table(points: list[CurvePoint]) -> str:
    """Mean test accuracy at each label count, one column per strategy."""
    curves = mean_curves(points)
    ns = sorted({n for curve in curves.values() for n in curve["n_labeled"]})
    lines = [f"{'labels':>6}" + "".join(f"{name:>16}" for name in curves)]
    for n in ns:
        cells = []
        for curve in curves.values():
            by_n = dict(zip(curve["n_labeled"], curve["mean"], strict=True))
            cells.append(f"{by_n[n]:>16.3f}" if n in by_n else f"{'':>16}")
        lines.append(f"{n:>6}" + "".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--initial", type=int, default=20)
    parser.add_argument("--query-size", type=int, default=10)
    parser.add_argument("--budget", type=int, default=60)
    parser.add_argument("--heuristics", default="random,margin,bald",
                        help=f"comma-separated, from {','.join(HEURISTICS)}; baal-random is the baseline")
    args = parser.parse_args()
    names = [name.strip() for name in args.heuristics.split(",") if name.strip()]
    try:
        for name in names:
            make_heuristic(name, args.query_size)  # unknown names fail before the data is loaded
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    config = ExperimentConfig(dataset=args.dataset, seeds=args.seeds, initial=args.initial,
                              query_size=args.query_size, budget=args.budget, model="small_cnn", pretrained=False)
    config.validate()
    settings = get_settings()
    data = prepare_data(config, store=open_store(settings), cache_dir=settings.data_dir / "datasets")
    started = time.perf_counter()
    points = [point for seed in range(args.seeds) for name in names
              for point in run_baal(data, heuristic=name, seed=seed, config=config)]
    summary = summarize(points, config=config.as_dict(), baseline="baal-random")
    print(f"\nbaal {', '.join(names)} on {args.dataset}, {args.seeds} seed(s), budget {args.budget}, "
          f"{time.perf_counter() - started:.0f}s in all")
    print(curve_table(points))
    print("\nlabel savings against baal-random (the 'random needs' column):")
    print(savings_table(summary))


if __name__ == "__main__":
    main()
