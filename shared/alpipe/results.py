"""Learning curves: the CSV contract, mean curves, label savings against random, and the plot."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass

import numpy as np

CURVE_COLUMNS = ("strategy", "seed", "round", "n_labeled", "test_accuracy")


@dataclass(frozen=True)
class CurvePoint:
    strategy: str
    seed: int
    round: int
    n_labeled: int
    test_accuracy: float
    train_s: float = 0.0
    score_s: float | None = 0.0  # None where it was not measured (runs through the services)


def curves_csv(points: list[CurvePoint]) -> str:
    """`strategy,seed,round,n_labeled,test_accuracy` rows (the contract), accuracy in [0, 1]."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CURVE_COLUMNS)
    for p in points:
        writer.writerow([p.strategy, p.seed, p.round, p.n_labeled, f"{p.test_accuracy:.6f}"])
    return buf.getvalue()


def read_curves_csv(text: str) -> list[CurvePoint]:
    rows = csv.DictReader(io.StringIO(text))
    return [CurvePoint(r["strategy"], int(r["seed"]), int(r["round"]), int(r["n_labeled"]),
                       float(r["test_accuracy"])) for r in rows]


def mean_curves(points: list[CurvePoint]) -> dict[str, dict[str, list[float]]]:
    """Per strategy: n_labeled, and mean/std/min/max accuracy over seeds at each n_labeled."""
    out: dict[str, dict[str, list[float]]] = {}
    for strategy in dict.fromkeys(p.strategy for p in points):
        by_n: dict[int, list[float]] = {}
        for p in points:
            if p.strategy == strategy:
                by_n.setdefault(p.n_labeled, []).append(p.test_accuracy)
        ns = sorted(by_n)
        accs = [np.asarray(by_n[n]) for n in ns]
        out[strategy] = {
            "n_labeled": ns,
            "mean": [float(a.mean()) for a in accs],
            "std": [float(a.std()) for a in accs],
            "min": [float(a.min()) for a in accs],
            "max": [float(a.max()) for a in accs],
            "n_seeds": [len(a) for a in accs],
        }
    return out


def labels_to_reach(ns: list[int], accs: list[float], target: float) -> float | None:
    """Labels at which a curve first reaches target accuracy, linearly interpolated; None if never."""
    if accs[0] >= target:
        return float(ns[0])
    points = list(zip(ns, accs, strict=True))
    for (n0, a0), (n1, a1) in zip(points, points[1:], strict=False):
        if a1 >= target:
            return n0 + (target - a0) / (a1 - a0) * (n1 - n0)
    return None


def label_savings(baseline: dict[str, list[float]], curve: dict[str, list[float]]) -> dict:
    """How many more labels the baseline (random) needs, at each of its budgets after the initial set.

    For budget b on the baseline's mean curve, n is the labels the strategy needs to reach the
    baseline's accuracy at b; the extra fraction is b / n - 1. Where the strategy never gets there
    within its own budget B, the fraction is b / B - 1 (it needs more than B).
    """
    budget = curve["n_labeled"][-1]
    rows = []
    for b, target in list(zip(baseline["n_labeled"], baseline["mean"], strict=True))[1:]:
        n = labels_to_reach(curve["n_labeled"], curve["mean"], target)
        reached = n is not None
        extra = b / (n if reached else budget) - 1.0
        rows.append({"baseline_labels": b, "baseline_accuracy": target,
                     "strategy_labels": n if reached else None, "reached": reached, "extra_fraction": extra})
    fractions = [r["extra_fraction"] for r in rows]
    return {"per_budget": rows, "median_extra_fraction": float(np.median(fractions)) if fractions else math.nan}


def worst_gap(baseline: dict[str, list[float]], curve: dict[str, list[float]]) -> float:
    """The strategy's mean accuracy minus the baseline's at the baseline's budgets, at its worst (the
    strategy's curve interpolated where it has no point)."""
    at = np.interp(baseline["n_labeled"], curve["n_labeled"], curve["mean"])
    return float(np.min(at - np.asarray(baseline["mean"])))


def summarize(points: list[CurvePoint], *, config: dict, baseline: str = "random") -> dict:
    """summary.json: config, mean curves, label savings against the baseline, and mean round timings."""
    curves = mean_curves(points)
    summary: dict = {"config": config, "strategies": {}}
    for strategy, curve in curves.items():
        own = [p for p in points if p.strategy == strategy and p.round > 0]
        scored = [p.score_s for p in own if p.score_s is not None]
        entry: dict = {
            "mean_curve": curve,
            "final_accuracy": curve["mean"][-1],
            "seconds_per_round": {
                "train": float(np.mean([p.train_s for p in own])) if own else 0.0,
                "score": float(np.mean(scored)) if scored else None,
            },
        }
        if baseline in curves and strategy != baseline:
            entry["label_savings"] = label_savings(curves[baseline], curve)
        summary["strategies"][strategy] = entry
    return summary


def savings_table(summary: dict) -> str:
    """Human-readable: median extra labels random needs per strategy, plus final accuracies."""
    lines = [f"{'strategy':<18}{'final acc':>10}{'random needs (median)':>24}"
             f"{'train s/round':>15}{'score s/round':>15}"]
    for name, entry in summary["strategies"].items():
        savings = entry.get("label_savings")
        extra = f"{savings['median_extra_fraction']:+.0%} labels" if savings else "baseline"
        timing = entry["seconds_per_round"]
        score = "n/a" if timing["score"] is None else f"{timing['score']:.3f}"
        lines.append(f"{name:<18}{entry['final_accuracy']:>10.3f}{extra:>24}{timing['train']:>15.2f}{score:>15}")
    return "\n".join(lines)


def plot_curves(points: list[CurvePoint], *, title: str) -> bytes:
    """The tutorial's figure as PNG bytes: mean test accuracy vs labels, band = min..max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for strategy, curve in mean_curves(points).items():
        ns = curve["n_labeled"]
        line, = ax.plot(ns, curve["mean"], label=f"{strategy} ({max(curve['n_seeds'])} seeds)", linewidth=2)
        ax.fill_between(ns, curve["min"], curve["max"], color=line.get_color(), alpha=0.18, linewidth=0)
    ax.set_xlabel("number of labeled images")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def point_dict(point: CurvePoint) -> dict:
    return asdict(point)
