"""BALD (Houlsby et al., 2011) with MC dropout (Gal et al., 2017): disagreement between stochastic passes.

The score is the mutual information between the prediction and the model's weights, estimated from
T forward passes with dropout on: the entropy of the mean prediction minus the mean entropy of the
single passes. A sample every pass is unsure about in the same way scores low (noise, not
ignorance); one the passes disagree on scores high.
"""

import numpy as np

from .base import Strategy


def _entropy(probs: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(probs > 0, probs * np.log(probs), 0.0).sum(axis=-1)


def check_mc_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 3 or probs.shape[0] < 2 or probs.shape[2] < 2:
        raise ValueError("BALD needs MC-dropout probabilities of shape (T>=2, n, n_classes>=2), "
                         f"got {probs.shape}")
    return probs


class BALD(Strategy):
    """Mutual information from T MC-dropout passes, divided by log(n_classes) so it lies in [0, 1]."""

    name = "bald"
    confidence_scores = True
    needs_mc = True

    def score(self, probs, *, rng=None):
        probs = check_mc_probs(probs)
        mutual_information = _entropy(probs.mean(axis=0)) - _entropy(probs).mean(axis=0)
        return np.clip(mutual_information, 0.0, None) / np.log(probs.shape[2])
