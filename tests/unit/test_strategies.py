import numpy as np
import pytest

from alpipe.errors import UserError
from alpipe.strategies import STRATEGIES, get_strategy, rank, subsample_pool

PROBS = np.array([[0.5, 0.5], [0.9, 0.1], [0.6, 0.4]])


def ranks(name, probs, seed=0):
    return rank(get_strategy(name).score(np.array(probs), rng=np.random.default_rng(seed))).tolist()


def test_margin_known_answer():
    assert ranks("margin", PROBS) == [0, 2, 1]
    np.testing.assert_allclose(get_strategy("margin").score(PROBS), [1.0, 0.2, 0.8])


def test_margin_uses_top_two_not_first_two():
    probs = [[0.1, 0.45, 0.45], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]]
    np.testing.assert_allclose(get_strategy("margin").score(np.array(probs)), [1.0, 0.3, 0.8])
    assert ranks("margin", probs) == [0, 2, 1]


def test_least_confidence_known_answer():
    probs = [[0.9, 0.05, 0.05], [0.4, 0.3, 0.3], [0.6, 0.2, 0.2]]
    np.testing.assert_allclose(get_strategy("least_confidence").score(np.array(probs)), [0.15, 0.9, 0.6])
    assert ranks("least_confidence", probs) == [1, 2, 0]


def test_margin_and_least_confidence_disagree_where_they_should():
    # Row 0 is unconfident overall but decisive between its top two; row 1 is a close call.
    probs = [[0.4, 0.3, 0.3], [0.5, 0.49, 0.01]]
    assert ranks("least_confidence", probs) == [0, 1]
    assert ranks("margin", probs) == [1, 0]


def test_entropy_known_answer():
    probs = [[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]]
    np.testing.assert_allclose(get_strategy("entropy").score(np.array(probs)), [0.0, 1.0, 0.5])
    assert ranks("entropy", probs) == [1, 2, 0]


def test_random_is_seeded_and_ignores_probabilities():
    a = ranks("random", PROBS, seed=1)
    assert a == ranks("random", PROBS, seed=1)
    assert sorted(a) == [0, 1, 2]
    many = [ranks("random", np.full((5, 2), 0.5), seed=s)[0] for s in range(40)]
    assert len(set(many)) > 1


def test_random_without_generator_is_an_error():
    with pytest.raises(ValueError, match="Generator"):
        get_strategy("random").score(PROBS)


def test_ties_break_to_lower_index():
    assert rank(np.array([0.5, 0.7, 0.5, 0.7])).tolist() == [1, 3, 0, 2]
    assert ranks("margin", [[0.5, 0.5]] * 4) == [0, 1, 2, 3]


def test_rank_top_k():
    assert rank(np.array([0.1, 0.9, 0.5]), k=2).tolist() == [1, 2]


def test_registry_and_unknown_name():
    assert set(STRATEGIES) == {"auto", "random", "least_confidence", "margin", "entropy", "bald", "power_margin"}
    with pytest.raises(UserError, match="unknown strategy 'smallest'.*margin"):
        get_strategy("smallest")


def test_bad_probability_shape():
    with pytest.raises(ValueError, match="shape"):
        get_strategy("margin").score(np.array([0.2, 0.8]))


def test_subsample_pool():
    candidates = np.arange(100, 200)
    rng = np.random.default_rng(0)
    sub = subsample_pool(candidates, 10, rng)
    assert len(sub) == 10 and len(set(sub.tolist())) == 10
    assert set(sub.tolist()) <= set(candidates.tolist())
    assert sub.tolist() == sorted(sub.tolist())
    assert subsample_pool(candidates, 0, rng).tolist() == candidates.tolist()
    assert subsample_pool(candidates, 500, rng).tolist() == candidates.tolist()
    again = subsample_pool(candidates, 10, np.random.default_rng(0))
    assert again.tolist() == sub.tolist()
