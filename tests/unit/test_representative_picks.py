"""Known answers for auto's representative picks: the centre of each group of the most uncertain images."""

import numpy as np
import pytest

from alpipe.strategies import get_strategy, rank
from alpipe.strategies.representative import (
    PICK_FLOOR,
    lift_by_shard,
    lift_picks,
    picks_per_shard,
    representative_picks,
)

DIM = 16


def uncertain_groups(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """Embeddings and scores: 30 very uncertain rows around one direction, 10 a little less uncertain around
    another, 60 certain rows elsewhere. Returns (inputs, scores, [centre of group A, of group B], group B rows).

    Each group has one row exactly at its centre, so the row nearest each k-means centre is known."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(3, DIM)) * 5
    rows, scores = [], []
    for centre, n, score in ((directions[0], 30, 0.95), (directions[1], 10, 0.9), (directions[2], 60, 0.1)):
        noise = rng.normal(scale=0.3, size=(n, DIM))
        noise[0] = 0.0
        noise[1:] -= noise[1:].mean(axis=0)  # the group's mean is its centre row
        rows.append(centre + noise)
        scores.append(score - rng.uniform(0, 0.01, size=n))
    inputs, scores = np.vstack(rows), np.concatenate(scores)
    return inputs, scores, [0, 30], list(range(30, 40))


def test_picks_are_each_uncertain_groups_centre_not_the_top_two():
    inputs, scores, centres, _ = uncertain_groups()
    assert set(rank(scores, 2).tolist()) <= set(range(30))  # top-k: both from the bigger group
    picks = representative_picks(scores, inputs, 2, seed=0, prefilter=20, share=1.0)
    assert sorted(picks.tolist()) == centres
    assert picks.tolist() == centres  # most uncertain first: group A scores higher


def test_only_the_most_uncertain_are_candidates():
    inputs, scores, _, _ = uncertain_groups()
    # Two picks from the top 2 x 5 = 10 rows: all in the most uncertain group, whatever its shape.
    picks = representative_picks(scores, inputs, 2, seed=0, prefilter=5, share=1.0)
    assert set(picks.tolist()) <= set(rank(scores, 10).tolist())
    # The share caps the candidates too: 10% of 100 rows.
    picks = representative_picks(scores, inputs, 2, seed=0, prefilter=20, share=0.1)
    assert set(picks.tolist()) <= set(rank(scores, 10).tolist())


def test_lifted_picks_rank_first_and_the_rest_keep_their_scores():
    inputs, scores, _, _ = uncertain_groups()
    picks = representative_picks(scores, inputs, 2, seed=0)
    lifted = lift_picks(scores, inputs, 2, seed=0)
    assert rank(lifted, 2).tolist() == picks.tolist()
    assert (lifted[picks] >= PICK_FLOOR).all()
    rest = np.setdiff1d(np.arange(len(scores)), picks)
    np.testing.assert_array_equal(lifted[rest], scores[rest])


def test_picks_are_deterministic_for_a_seed_and_never_repeat():
    rng = np.random.default_rng(3)
    inputs, scores = rng.normal(size=(500, DIM)), rng.uniform(size=500)
    a = representative_picks(scores, inputs, 10, seed=7)
    assert len(set(a.tolist())) == 10
    np.testing.assert_array_equal(a, representative_picks(scores, inputs, 10, seed=7))


def test_small_pools_and_bad_input():
    inputs, scores = np.eye(4, DIM), np.array([0.1, 0.9, 0.5, 0.3])
    assert representative_picks(scores, inputs, 10, seed=0).tolist() == [1, 2, 3, 0]  # fewer than k: all, ranked
    assert representative_picks(scores, inputs, 0, seed=0).tolist() == []
    with pytest.raises(ValueError, match="one input per score"):
        representative_picks(scores, inputs[:3], 2, seed=0)


def test_each_shard_picks_its_share_of_the_query():
    assert [picks_per_shard(10, n) for n in (1, 2, 3, 20)] == [10, 5, 4, 1]
    rng = np.random.default_rng(1)
    inputs, scores = rng.normal(size=(300, DIM)), rng.uniform(size=300)
    lifted = lift_by_shard(scores, inputs, 10, shard_size=100, seed=0)
    picked = np.flatnonzero(lifted >= PICK_FLOOR)
    assert [int(((picked >= s) & (picked < s + 100)).sum()) for s in (0, 100, 200)] == [4, 4, 4]
    # One shard of the whole pool: exactly the query's picks.
    assert int((lift_by_shard(scores, inputs, 10, shard_size=1000, seed=0) >= PICK_FLOOR).sum()) == 10


def test_auto_makes_representative_picks_and_margin_does_not():
    assert get_strategy("auto").representative_picks
    assert not any(get_strategy(name).representative_picks
                   for name in ("margin", "least_confidence", "entropy", "bald", "power_margin", "random"))
