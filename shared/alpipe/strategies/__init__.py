"""Query strategies, a registry by name, ranking and pool subsampling."""

import numpy as np

from ..errors import UserError
from .bald import BALD
from .base import Strategy
from .diverse import PowerMargin
from .random import RandomSampling
from .uncertainty import Auto, Entropy, LeastConfidence, Margin

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (RandomSampling, LeastConfidence, Margin, Entropy, BALD, PowerMargin, Auto)
}


def get_strategy(name: str) -> Strategy:
    """The strategy registered under name; a UserError listing the choices otherwise."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise UserError(f"unknown strategy {name!r}; choose from: {', '.join(STRATEGIES)}") from None


COLD_STARTS = ("typiclust", "random")


def check_cold_start(name: str | None) -> None:
    """None (each strategy's own) or one of COLD_STARTS; a UserError naming the choices otherwise."""
    if name is not None and name not in COLD_STARTS:
        raise UserError(f"unknown cold start {name!r}; choose from: {', '.join(COLD_STARTS)}")


def cold_start_for(strategy: str, override: str | None = None) -> str:
    """The cold start a run of `strategy` gets: the override (a project's or simulate's cold_start), else the
    strategy's own (random for the random baseline, typiclust for the others)."""
    return override or get_strategy(strategy).cold_start


def rank(scores: np.ndarray, k: int | None = None) -> np.ndarray:
    """Indices by descending score; ties go to the lower index, so rankings are reproducible."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return order if k is None else order[:k]


def subsample_pool(candidates: np.ndarray, pool_size: int, rng: np.random.Generator) -> np.ndarray:
    """A random subset of pool_size candidates to score (0 or >= len means all), in input order."""
    candidates = np.asarray(candidates)
    if pool_size <= 0 or pool_size >= len(candidates):
        return candidates
    chosen = rng.choice(len(candidates), size=pool_size, replace=False)
    return candidates[np.sort(chosen)]


__all__ = ["COLD_STARTS", "STRATEGIES", "Strategy", "check_cold_start", "cold_start_for", "get_strategy", "rank",
           "subsample_pool"]
