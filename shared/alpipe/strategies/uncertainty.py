"""Uncertainty sampling: least confidence, margin and entropy, each scaled to [0, 1]."""

import numpy as np

from .base import Strategy, check_probs


class LeastConfidence(Strategy):
    """1 - max p, scaled by n/(n-1) so a uniform prediction scores 1."""

    name = "least_confidence"
    confidence_scores = True

    def score(self, probs, *, rng=None):
        probs = check_probs(probs)
        n_classes = probs.shape[1]
        return (1.0 - probs.max(axis=1)) * n_classes / (n_classes - 1)


class Margin(Strategy):
    """1 - (p_top1 - p_top2): a small gap between the two best classes is informative."""

    name = "margin"
    confidence_scores = True

    def score(self, probs, *, rng=None):
        probs = check_probs(probs)
        top2 = np.partition(probs, -2, axis=1)[:, -2:]
        return 1.0 - (top2[:, 1] - top2[:, 0])


class Entropy(Strategy):
    """Shannon entropy of the prediction, divided by log(n_classes)."""

    name = "entropy"
    confidence_scores = True

    def score(self, probs, *, rng=None):
        probs = check_probs(probs)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(probs > 0, probs * np.log(probs), 0.0)
        return -terms.sum(axis=1) / np.log(probs.shape[1])


class Auto(Margin):
    """The default: TypiClust for the first labels (the base class's cold start), then margin with
    representative picks: the image nearest the centre of each group of the most uncertain ones first
    (alpipe.strategies.representative), the rest by margin.

    Chosen by measurement over top-k margin, stochastic (power) acquisition, BALD and least confidence:
    see the README ("The default: auto") for the rule and the figures.
    """

    name = "auto"
    representative_picks = True
    # The lifted picks score 1 + margin: 1 - score is no confidence, so Label Studio gets ranking places.
    confidence_scores = False
