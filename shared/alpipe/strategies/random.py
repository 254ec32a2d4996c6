"""Random sampling: the baseline every other strategy is measured against."""

import numpy as np

from .base import Strategy, check_probs


class RandomSampling(Strategy):
    """Uniform random scores from the caller's seeded generator."""

    name = "random"
    needs_model = False
    cold_start = "random"

    def score(self, probs, *, rng=None):
        n = check_probs(probs).shape[0] if np.ndim(probs) == 2 else len(probs)
        if rng is None:
            raise ValueError("random sampling needs a seeded numpy Generator (rng=...)")
        return rng.random(n)
