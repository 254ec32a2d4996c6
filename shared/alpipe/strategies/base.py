"""The strategy hook: turn class probabilities into informativeness scores."""

from abc import ABC, abstractmethod

import numpy as np


class Strategy(ABC):
    """One hook, `score`; higher means more informative, so ranking is shared by all strategies."""

    name: str = ""
    needs_model: bool = True
    # True: score() takes (T, n, n_classes) probabilities from T MC-dropout passes instead of (n, n_classes).
    needs_mc: bool = False
    # How the first labels are chosen, before any model: "typiclust" (alpipe.strategies.typiclust) or
    # "random" (the baseline's own, so that it stays the tutorial's baseline).
    cold_start: str = "typiclust"
    # True when scores lie in [0, 1] and 1 - score reads as the model's confidence (margin: the gap
    # between the two best classes); Label Studio then gets that confidence as its prediction score.
    confidence_scores: bool = False
    # True: once a model exists, the most uncertain images' representatives are lifted to the top of each
    # score shard (alpipe.strategies.representative); `auto` does this.
    representative_picks: bool = False

    @abstractmethod
    def score(self, probs: np.ndarray, *, rng: np.random.Generator | None = None) -> np.ndarray:
        """Scores of shape (n,) for a probability matrix of shape (n, n_classes)."""


def check_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"expected a probability matrix of shape (n, n_classes>=2), got {probs.shape}")
    return probs
