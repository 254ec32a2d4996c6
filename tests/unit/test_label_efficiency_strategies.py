"""Known answers for the cold start (TypiClust), BALD and stochastic (power) acquisition."""

import numpy as np
import pytest
import torch

from alpipe.embeddings import build_head
from alpipe.errors import UserError
from alpipe.model_specs import check_strategy_fits
from alpipe.models import SmallCNN
from alpipe.strategies import check_cold_start, get_strategy, rank
from alpipe.strategies.diverse import power_keys
from alpipe.strategies.features import label_free_features, shrink
from alpipe.strategies.typiclust import typicality, typiclust_order, typiclust_select
from alpipe.training import predict_mc_proba

PROBS = np.array([[0.5, 0.5], [0.9, 0.1], [0.6, 0.4]])
CENTERS = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
# At most 21 points a blob: typicality then averages over the whole blob, where the centre is nearest to all.
SIZES = (21, 15, 9)


def blobs() -> tuple[np.ndarray, list[int]]:
    """Three separated blobs of SIZES points (a ring around an exact centre point); the index of each centre."""
    points, centres = [], []
    for (cx, cy), n in zip(CENTERS, SIZES, strict=True):
        centres.append(sum(len(p) for p in points))
        angles = np.linspace(0, 2 * np.pi, n - 1, endpoint=False)
        ring = np.stack([cx + np.cos(angles), cy + np.sin(angles)], axis=1)
        points.append(np.vstack([[cx, cy], ring]))
    return np.vstack(points), centres


def test_typicality_prefers_the_centre_of_a_ring():
    points, centres = blobs()
    first = points[:SIZES[0]]
    assert np.argmax(typicality(first)) == 0


def test_typiclust_picks_each_clusters_centre_largest_first():
    points, centres = blobs()
    assert typiclust_select(points, 3, seed=0).tolist() == centres


def test_typiclust_skips_covered_clusters():
    points, centres = blobs()
    labeled = np.zeros(len(points), dtype=bool)
    labeled[centres[0] + 3] = True  # a ring point of the biggest blob: that cluster is covered
    assert typiclust_select(points, 2, labeled=labeled, seed=0).tolist() == centres[1:]


def test_typiclust_order_is_staged_and_never_repeats():
    points, centres = blobs()
    order = typiclust_order(points, 20, first=3, seed=0)
    assert order[:3].tolist() == centres
    assert len(order) == 20 and len(set(order.tolist())) == 20


def test_typiclust_is_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(300, 5))
    assert typiclust_select(points, 10, seed=3).tolist() == typiclust_select(points, 10, seed=3).tolist()


def test_typiclust_asks_for_no_more_than_the_unlabeled():
    points, _ = blobs()
    labeled = np.ones(len(points), dtype=bool)
    labeled[:2] = False
    assert sorted(typiclust_select(points, 10, labeled=labeled).tolist()) == [0, 1]


def test_label_free_features_shrink_and_reduce():
    images = np.random.default_rng(0).integers(0, 255, (60, 3, 64, 64), dtype=np.uint8)
    assert shrink(images).shape == (60, 3, 32, 32)
    assert label_free_features(images).shape == (60, 50)
    assert label_free_features(np.random.default_rng(0).normal(size=(30, 1280))).shape == (30, 30)
    with pytest.raises(ValueError, match="images"):
        label_free_features(np.zeros(5))


def test_bald_known_answer():
    # Two passes: agreeing and sure; disagreeing and each sure (the model does not know); agreeing and unsure.
    passes = np.array([[[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]],
                       [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]])
    np.testing.assert_allclose(get_strategy("bald").score(passes), [0.0, 1.0, 0.0], atol=1e-12)
    assert rank(get_strategy("bald").score(passes)).tolist()[0] == 1


def test_bald_refuses_one_pass_and_plain_probabilities():
    with pytest.raises(ValueError, match="T>=2"):
        get_strategy("bald").score(np.full((1, 3, 2), 0.5))
    with pytest.raises(ValueError, match="T>=2"):
        get_strategy("bald").score(np.full((3, 2), 0.5))


def test_power_keys_sample_in_proportion_to_score_power():
    # P(first is ranked first) = 1 / (1 + 0.5**beta): 2/3 for beta 1, 16/17 for beta 4.
    rng = np.random.default_rng(0)
    for beta, expected in ((1.0, 2 / 3), (4.0, 16 / 17)):
        firsts = [rank(power_keys(np.array([1.0, 0.5]), beta=beta, rng=rng))[0] == 0 for _ in range(4000)]
        assert abs(np.mean(firsts) - expected) < 0.03


def test_power_keys_put_zero_scores_last_and_stay_finite():
    keys = power_keys(np.array([0.0, 0.2, 0.0, 0.9]), beta=2.0, rng=np.random.default_rng(1))
    assert np.isfinite(keys).all()
    assert set(rank(keys)[:2].tolist()) == {1, 3}


def test_power_keys_are_seeded_and_need_a_generator():
    scores = np.linspace(0.1, 1, 50)
    a = power_keys(scores, beta=4, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a, power_keys(scores, beta=4, rng=np.random.default_rng(5)))
    with pytest.raises(ValueError, match="Generator"):
        power_keys(scores, beta=4, rng=None)
    with pytest.raises(ValueError, match="beta"):
        power_keys(scores, beta=0, rng=np.random.default_rng(5))


def test_auto_is_margin_with_a_typiclust_cold_start():
    auto = get_strategy("auto")
    assert auto.needs_model and auto.cold_start == "typiclust"
    assert get_strategy("random").cold_start == "random"
    np.testing.assert_array_equal(auto.score(PROBS), get_strategy("margin").score(PROBS))


def test_power_margin_puts_close_calls_first_but_not_only_them():
    probs = np.array([[0.5, 0.5], [0.8, 0.2]] * 50)  # margin scores 1 and 0.4: weights 1 and 0.16
    top = rank(get_strategy("power_margin").score(probs, rng=np.random.default_rng(0)), 50)
    assert 0.7 < (top % 2 == 0).mean() < 1.0  # mostly the close calls, with a few others mixed in


def test_mc_dropout_passes_differ_are_seeded_and_shaped():
    torch.manual_seed(0)
    model = SmallCNN(1, 3)
    images = torch.randint(0, 255, (7, 1, 28, 28), dtype=torch.uint8)
    from alpipe.model_specs import get_model_spec

    spec = get_model_spec("small_cnn")
    a = predict_mc_proba(model, images, spec=spec, device=torch.device("cpu"), samples=5, seed=1)
    assert a.shape == (5, 7, 3)
    np.testing.assert_allclose(a.sum(axis=2), 1.0, rtol=1e-5)
    assert not np.allclose(a[0], a[1])
    np.testing.assert_array_equal(a, predict_mc_proba(model, images, spec=spec, device=torch.device("cpu"),
                                                      samples=5, seed=1))
    with pytest.raises(ValueError, match="at least 2"):
        predict_mc_proba(model, images, spec=spec, device=torch.device("cpu"), samples=1)


def test_bald_on_a_model_without_dropout_is_a_clear_error():
    with pytest.raises(ValueError, match="no dropout"):
        predict_mc_proba(build_head(8, 3), torch.zeros(4, 8), spec=None, device=torch.device("cpu"), samples=4)
    with pytest.raises(UserError, match="no dropout"):
        check_strategy_fits("bald", "resnet18", finetune=True, pretrained=False)
    with pytest.raises(UserError, match="embedding mode"):
        check_strategy_fits("bald", "efficientnet_lite0", finetune=None, pretrained=True)
    check_strategy_fits("bald", "small_cnn", finetune=None, pretrained=True)
    check_strategy_fits("bald", "efficientnet_lite0", finetune=True, pretrained=True)
    check_strategy_fits("margin", "resnet18", finetune=None, pretrained=True)


def test_unknown_cold_start_names_the_choices():
    with pytest.raises(UserError, match="typiclust, random"):
        check_cold_start("kmeans")


def test_a_batch_larger_than_the_labeled_set_is_chosen_by_typiclust_not_the_model(tmp_path, monkeypatch):
    """5 TypiClust labels, then a batch of 20: a 5-label model does not choose it; at 25 labels the model does."""
    from dataclasses import replace

    from alpipe import loop
    from alpipe.storage import LocalStore
    from alpipe.training import TrainConfig

    config = loop.ExperimentConfig(dataset="digits", strategies=("auto",), seeds=1, initial=5, query_size=20,
                                   budget=45, train=TrainConfig(stop="epochs:1"))
    data = loop.prepare_data(config, store=LocalStore(tmp_path / "store"), cache_dir=tmp_path / "datasets")
    calls = []
    real = loop.typiclust_batch

    def spy(data, is_labeled, pool, k, *, seed):
        calls.append((int(is_labeled.sum()), k))
        return real(data, is_labeled, pool, k, seed=seed)

    monkeypatch.setattr(loop, "typiclust_batch", spy)
    points = loop.run_one(data, strategy_name="auto", seed=0, config=config)
    assert [p.n_labeled for p in points] == [5, 25, 45]
    assert calls == [(5, 20)]
    for strategy, cold_start in (("random", None), ("margin", "random")):  # no TypiClust start: the rule is off
        calls.clear()
        loop.run_one(data, strategy_name=strategy, seed=0, config=replace(config, cold_start=cold_start))
        assert calls == []


def test_later_stages_pick_the_point_nearest_the_centre_not_the_densest():
    """A cluster with a tight knot off its centre: TypiClust's first pick is in the knot (densest); once labels
    exist, the pick is the point at the cluster's centre."""
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    knot = np.array([1.0, 0.0]) + 0.05 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    ring = np.array([-1.0, 0.0]) + 0.5 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    cluster = np.vstack([[[0.0, 0.0]], knot, ring])  # row 0 is the centre (the knot and ring balance out)
    assert typiclust_select(cluster, 1, seed=0)[0] in range(1, 13)
    points, centres = blobs()
    features = np.vstack([cluster, points[:SIZES[0]] + 20.0])
    labeled = np.zeros(len(features), dtype=bool)
    labeled[len(cluster)] = True  # the far blob holds a label: this is a later stage
    assert typiclust_select(features, 1, labeled=labeled, seed=0).tolist() == [0]
