"""Diverse batches from the uncertain region: `auto`'s selection once a model exists (Zhdanov, "Diverse
mini-batch Active Learning", 2019).

Top-k margin takes the k images nearest the decision boundary, and early on they are often the same
confusion many times over (one odd stroke of a 4 against 9s) while the model's errors are spread over
whole groups of images it has barely seen. So the PREFILTER·k most uncertain images are clustered
into k groups on the label-free features (those TypiClust uses: pixels reduced with PCA, or the
backbone embeddings), and the image nearest each group's centre is labeled: every pick is uncertain,
and each stands for a different part of the uncertain region.

The picks' scores are lifted to 1 + their margin (above every plain score in [0, 1]), so a ranking
serves them first, in margin order, and the rest of the pool after them by margin. In the services
each score shard does this over its own images (picks_per_shard), so scoring stays shard by shard.
"""

from __future__ import annotations

import numpy as np

from ..schemas import REPRESENTATIVE_PICK_FLOOR
from . import rank
from .features import projected_features

# Candidates per pick. Measured on mnist5k at query 10 (12 seeds, README "The default: auto"): the 200 most
# uncertain of 4,000 cover the confusions a 50-label model makes, and still all lie near its boundary.
PREFILTER = 20
# ... but never more than this share of the shard: with big queries (100 of a 4,000-image pool) 20 per pick
# reach into the confident half, whose centres are easy, typical images (mnist5k at query 100, seeds 0-2: +22%
# with 2,000 candidates, +65% with 400 and +91% with 200, against +82% for top-k margin).
CANDIDATE_SHARE = 0.05
# A pick scores PICK_FLOOR + its own score: above every score of an uncertainty strategy ([0, 1]).
PICK_FLOOR = REPRESENTATIVE_PICK_FLOOR


def representative_picks(scores: np.ndarray, inputs: np.ndarray, k: int, *, seed: int, prefilter: int = PREFILTER,
                         share: float = CANDIDATE_SHARE) -> np.ndarray:
    """Row indices of up to k picks, most uncertain first: the top prefilter·k rows by score (at most
    share·n of them, at least k), clustered into k groups by k-means on their label-free features, and
    the row nearest each group's centre.

    inputs: each row's images (n, C, H, W) or embeddings (n, d), as label_free_features takes them.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(inputs) != len(scores):
        raise ValueError(f"expected one input per score, got {len(inputs)} inputs and {len(scores)} scores")
    k = min(int(k), len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    candidates = rank(scores, max(k, min(prefilter * k, int(share * len(scores)))))
    if len(candidates) <= k:
        return candidates
    features = projected_features(inputs, candidates, seed=seed)
    assignment, centres = kmeans(features, k, seed=seed)
    picks = []
    for c in range(k):
        members = np.flatnonzero(assignment == c)
        if len(members):
            distances = ((features[members] - centres[c]) ** 2).sum(axis=1)
            picks.append(candidates[members[np.argmin(distances)]])
    picks = np.asarray(picks, dtype=np.int64)
    return picks[rank(scores[picks])]


def kmeans(x: np.ndarray, k: int, *, seed: int, n_init: int = 3,
           max_iter: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(cluster of each row, centres): k-means++ seeding, then Lloyd's iterations until no row moves; the
    best of n_init starts.

    A few hundred rows a round: plain numpy takes a millisecond or two, where sklearn's KMeans spends tens
    on set-up and starts an OpenMP thread team beside the scorer's torch threads.
    """
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    runs = [_lloyd(x, _kmeans_pp(x, k, rng), max_iter) for _ in range(n_init)]
    return min(runs, key=lambda run: run[2])[:2]


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k starting centres, each drawn with probability proportional to its squared distance to the nearest
    centre so far (Arthur & Vassilvitskii 2007)."""
    centres = [x[rng.integers(len(x))]]
    nearest = ((x - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = nearest.sum()
        row = rng.choice(len(x), p=nearest / total) if total > 0 else rng.integers(len(x))
        centres.append(x[row])
        nearest = np.minimum(nearest, ((x - x[row]) ** 2).sum(axis=1))
    return np.array(centres)


def _lloyd(x: np.ndarray, centres: np.ndarray, max_iter: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(assignment, centres, inertia) after Lloyd's iterations from the given centres."""
    assignment = np.full(len(x), -1)
    for _ in range(max_iter):
        distances = (x ** 2).sum(axis=1)[:, None] - 2 * x @ centres.T + (centres ** 2).sum(axis=1)[None, :]
        moved = np.argmin(distances, axis=1)
        if np.array_equal(moved, assignment):
            break
        assignment = moved
        for c in range(len(centres)):
            members = assignment == c
            if members.any():  # an emptied cluster keeps its centre
                centres[c] = x[members].mean(axis=0)
    inertia = float(((x - centres[assignment]) ** 2).sum())
    return assignment, centres, inertia


def lift_picks(scores: np.ndarray, inputs: np.ndarray, k: int, *, seed: int) -> np.ndarray:
    """The scores with k representative picks' raised by PICK_FLOOR: ranked first, in their own order."""
    lifted = np.array(scores, dtype=np.float64)
    lifted[representative_picks(lifted, inputs, k, seed=seed)] += PICK_FLOOR
    return lifted


def picks_per_shard(query_size: int, n_shards: int) -> int:
    """Picks each of n score shards makes: together at least one query's worth (shards are equal slices
    of the pool, so each holds about 1/n of its uncertain region)."""
    return max(1, -(-int(query_size) // max(1, int(n_shards))))


def lift_by_shard(scores: np.ndarray, inputs: np.ndarray, query_size: int, *, shard_size: int,
                  seed: int) -> np.ndarray:
    """The scores of a whole pool as the score shards lift them: rows cut into shard_size slices, each
    slice's picks_per_shard picks lifted (in-process runs, which score the pool at once, so serve what
    the services would)."""
    n_shards = max(1, -(-len(scores) // max(1, shard_size)))
    per_shard = picks_per_shard(query_size, n_shards)
    lifted = np.array(scores, dtype=np.float64)
    for shard in range(n_shards):
        rows = slice(shard * shard_size, (shard + 1) * shard_size)
        lifted[rows] = lift_picks(lifted[rows], inputs[rows], per_shard, seed=shard_seed(seed, shard))
    return lifted


def shard_seed(round_seed: int, shard: int) -> int:
    """The seed of one shard's picks in one round: the scorers and the in-process loop use the same one."""
    return round_seed * 1009 + shard
