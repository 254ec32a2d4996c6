import math

import pytest

from alpipe.results import (
    CurvePoint,
    curves_csv,
    label_savings,
    labels_to_reach,
    read_curves_csv,
    summarize,
    worst_gap,
)


def test_labels_to_reach_interpolates():
    assert labels_to_reach([20, 30, 40], [0.5, 0.7, 0.9], 0.8) == pytest.approx(35.0)
    assert labels_to_reach([20, 30, 40], [0.5, 0.7, 0.9], 0.4) == 20.0
    assert labels_to_reach([20, 30, 40], [0.5, 0.7, 0.9], 0.95) is None


def test_label_savings_known_answer():
    random = {"n_labeled": [20, 30, 40, 50], "mean": [0.5, 0.6, 0.7, 0.8]}
    margin = {"n_labeled": [20, 30, 40, 50], "mean": [0.5, 0.7, 0.8, 0.85]}
    result = label_savings(random, margin)
    fractions = [row["extra_fraction"] for row in result["per_budget"]]
    # random reaches 0.6 at 30; margin at 25 -> 30/25-1; 0.7 at 40 vs 30; 0.8 at 50 vs 40.
    assert fractions == pytest.approx([30 / 25 - 1, 40 / 30 - 1, 50 / 40 - 1])
    assert result["median_extra_fraction"] == pytest.approx(50 / 40 - 1)  # median of 0.2, 0.33, 0.25


def test_label_savings_when_strategy_never_reaches():
    random = {"n_labeled": [20, 30], "mean": [0.5, 0.9]}
    worse = {"n_labeled": [20, 30], "mean": [0.5, 0.6]}
    row = label_savings(random, worse)["per_budget"][0]
    assert row["reached"] is False and row["extra_fraction"] == pytest.approx(30 / 30 - 1)


def test_worst_gap_known_answer():
    baseline = {"n_labeled": [20, 30, 40], "mean": [0.5, 0.6, 0.7]}
    # Above at 20 and 40, 0.05 below at 30; a curve with no point at 30 is interpolated there.
    assert worst_gap(baseline, {"n_labeled": [20, 30, 40], "mean": [0.6, 0.55, 0.8]}) == pytest.approx(-0.05)
    assert worst_gap(baseline, {"n_labeled": [20, 40], "mean": [0.5, 0.7]}) == pytest.approx(0.0)


def test_csv_round_trip_and_summary():
    points = [CurvePoint(s, seed, r, 20 + 10 * r, acc)
              for s, accs in {"random": [0.5, 0.6], "margin": [0.5, 0.7]}.items()
              for seed in (0, 1) for r, acc in enumerate(accs)]
    text = curves_csv(points)
    assert text.splitlines()[0] == "strategy,seed,round,n_labeled,test_accuracy"
    assert read_curves_csv(text) == points
    summary = summarize(points, config={"budget": 30})
    assert summary["strategies"]["margin"]["mean_curve"]["mean"] == pytest.approx([0.5, 0.7])
    assert "label_savings" not in summary["strategies"]["random"]
    assert not math.isnan(summary["strategies"]["margin"]["label_savings"]["median_extra_fraction"])


def test_train_options_mirror_train_config():
    """The API's TrainOptions and the library's TrainConfig must stay the same knobs with the same defaults."""
    import dataclasses

    from alpipe.schemas import TrainOptions
    from alpipe.train_config import TrainConfig

    config_fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert config_fields == TrainOptions().model_dump()
