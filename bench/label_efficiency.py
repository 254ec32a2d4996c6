"""Label efficiency: every strategy against random, on several datasets and query sizes, with baal's
own active loop as the peer column, and what selection costs per round.

Each row, from the learning curves (3 seeds): how many more labels random needs (median over random's
budgets of b/n - 1, where n is the labels the strategy needs to reach random's accuracy at b), the
worst gap to random's mean accuracy at any budget, the accuracy at the initial set and at the budget,
and the seconds per round (training plus scoring and selection).

Runs are cached in runs/bench-label-efficiency/points.json by (work, strategy, seed), so an
interrupted bench resumes where it stopped (--fresh starts over). Every run's curves are written as
the usual curves.csv/summary.json/curves.png per work.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from alpipe.config import get_settings
from alpipe.experiment import write_results
from alpipe.loop import ExperimentConfig, PreparedData, prepare_data, run_one
from alpipe.results import CurvePoint, label_savings, mean_curves, worst_gap
from alpipe.storage import open_store
from alpipe.strategies import get_strategy
from alpipe.strategies.representative import lift_picks
from alpipe.training import predict_proba

STRATEGIES = ("random", "auto", "margin", "least_confidence", "entropy", "bald", "power_margin")
# baal's rounds take ~10x ours on a CPU (150 epochs from scratch, 20 MC passes), so by default its peer
# column runs margin (ahead of its bald in a first 60-label run) on the headline work only; --baal and
# --baal-works widen it.
BAAL_HEURISTICS = ("margin",)
BAAL_WORKS = ("mnist5k-q10-b300",)


@dataclass(frozen=True)
class Work:
    """One dataset at one query size and budget."""

    dataset: str
    query_size: int
    budget: int

    @property
    def key(self) -> str:
        return f"{self.dataset}-q{self.query_size}-b{self.budget}"


WORKS = (Work("mnist5k", 10, 300), Work("mnist5k", 100, 1000), Work("digits", 10, 300), Work("photos", 10, 100))


class PointCache:
    """Finished (work, strategy, seed) runs on disk, so a long bench can resume."""

    def __init__(self, path: Path, *, fresh: bool):
        self.path = path
        self.runs: dict[str, list[dict]] = {} if fresh or not path.exists() else json.loads(path.read_text())

    def get(self, work: Work, strategy: str, seed: int) -> list[CurvePoint] | None:
        run = self.runs.get(f"{work.key}/{strategy}/{seed}")
        return None if run is None else [CurvePoint(**p) for p in run]

    def put(self, work: Work, strategy: str, seed: int, points: list[CurvePoint]) -> None:
        """Add one run, merged under a lock with what other bench processes wrote meanwhile (works and
        strategies can run as parallel processes, e.g. --works mnist5k-q100-b1000 beside the rest)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = f"{work.key}/{strategy}/{seed}"
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Only this run is added to what is on disk now: what other processes wrote (or removed) stays so.
            self.runs = json.loads(self.path.read_text()) if self.path.exists() else {}
            self.runs[key] = [asdict(p) for p in points]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.runs))
            tmp.replace(self.path)


def run_work(work: Work, *, strategies: list[str], baal: list[str], seeds: int, cache: PointCache,
             out: Path, cached_only: bool = False) -> list[CurvePoint]:
    settings = get_settings()
    store = open_store(settings)
    config = ExperimentConfig(dataset=work.dataset, strategies=tuple(strategies), seeds=seeds, initial=20,
                              query_size=work.query_size, budget=work.budget)
    data = prepare_data(config, store=store, cache_dir=settings.data_dir / "datasets")
    points: list[CurvePoint] = []
    runs = [(s, None) for s in strategies]
    if data.backbone is None:  # baal's loop trains whole networks; embedding mode has no peer run here
        runs += [(f"baal-{h}", h) for h in baal]
    for name, heuristic in runs:
        for seed in range(seeds):
            cached = cache.get(work, name, seed)
            if cached is None and cached_only:
                continue
            if cached is None:
                started = time.perf_counter()
                if heuristic is None:
                    cached = run_one(data, strategy_name=name, seed=seed, config=config)
                else:
                    from bench.peer_baal import run_baal

                    cached = run_baal(data, heuristic=heuristic, seed=seed, config=config)
                cache.put(work, name, seed, cached)
                print(f"  {work.key} {name} seed {seed}: {cached[-1].test_accuracy:.3f} at {cached[-1].n_labeled} "
                      f"labels ({time.perf_counter() - started:.0f}s)", flush=True)
            points += cached
    if points:
        write_results(points, config=config.as_dict(), out=out / work.key,
                      title=f"{work.dataset}, {data.model}, query {work.query_size}")
    return points


def table(work: Work, points: list[CurvePoint]) -> str:
    title = f"\n{work.dataset}, query {work.query_size}, budget {work.budget}"
    curves = mean_curves(points)
    if "random" not in curves:
        return f"{title}: no random runs yet"
    base = curves["random"]
    lines = [title, f"{'strategy':<20}{'seeds':>6}{'random needs':>14}{'worst gap':>11}{'acc@initial':>13}"
                    f"{'acc@budget':>12}{'s/round':>9}"]
    for name, curve in curves.items():
        own = [p for p in points if p.strategy == name and p.round > 0]
        per_round = np.mean([p.train_s + (p.score_s or 0.0) for p in own]) if own else float("nan")
        if name == "random":
            needs, gap = "baseline", ""
        else:
            needs = f"{label_savings(base, curve)['median_extra_fraction']:+.0%}"
            gap = f"{worst_gap(base, curve) * 100:+.1f} pt"
        lines.append(f"{name:<20}{max(curve['n_seeds']):>6}{needs:>14}{gap:>11}{curve['mean'][0]:>13.3f}"
                     f"{curve['mean'][-1]:>12.3f}{per_round:>9.2f}")
    return "\n".join(lines)


def selection_cost(pool: int = 5000, repeats: int = 5) -> str:
    """What each strategy's scoring and selection adds to the forward pass of a round, at a pool of
    `pool` mnist5k images with a freshly built small_cnn."""
    from alpipe.models import build_model
    from alpipe.training import predict_mc_proba

    settings = get_settings()
    config = ExperimentConfig(dataset="mnist5k", strategies=("random",), seeds=1)
    data: PreparedData = prepare_data(config, store=open_store(settings), cache_dir=settings.data_dir / "datasets")
    images = data.images[:pool]
    torch.manual_seed(0)
    model = build_model("small_cnn", len(data.classes), in_channels=data.in_channels, pretrained=False)
    device = torch.device("cpu")

    def best_of(fn) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    forward = best_of(lambda: predict_proba(model, images, spec=data.spec, device=device))
    probs = predict_proba(model, images, spec=data.spec, device=device)
    mc = predict_mc_proba(model, images, spec=data.spec, device=device, samples=20)
    lines = [f"\nselection cost at a {len(images)}-image pool (small_cnn forward pass: {forward * 1000:.0f} ms)",
             f"{'strategy':<20}{'score+select ms':>16}{'vs forward':>12}"]
    pixels = images.numpy()

    def select(strategy, x, rng, k) -> np.ndarray:
        scores = strategy.score(x, rng=rng)
        if strategy.representative_picks:  # auto: the query's representative picks, in one shard
            scores = lift_picks(scores, pixels, k, seed=0)
        return np.argsort(-scores, kind="stable")

    for name in STRATEGIES:
        strategy = get_strategy(name)
        inputs = mc if strategy.needs_mc else probs
        rng = np.random.default_rng(0)
        seconds = best_of(lambda s=strategy, x=inputs, g=rng: select(s, x, g, 10))
        extra = ""
        if strategy.needs_mc:
            mc_s = best_of(lambda: predict_mc_proba(model, images, spec=data.spec, device=device, samples=20))
            extra = f"   (20 MC-dropout passes: {mc_s * 1000:.0f} ms, {mc_s / forward:.2f}x one forward)"
        if strategy.representative_picks:
            big = best_of(lambda s=strategy, x=inputs, g=rng: select(s, x, g, 100))
            extra = f"   (query 10; at query 100: {big * 1000:.0f} ms, {big / forward:.1%})"
        lines.append(f"{name:<20}{seconds * 1000:>16.1f}{seconds / forward:>11.1%}{extra}")
    from alpipe.strategies.features import label_free_features
    from alpipe.strategies.typiclust import typiclust_order

    started = time.perf_counter()
    typiclust_order(label_free_features(images.numpy()), 300, first=10)
    lines.append(f"cold start, once per project: TypiClust order of 300 over {len(images)} images "
                 f"{time.perf_counter() - started:.1f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--works", default=",".join(w.key for w in WORKS),
                        help="which dataset-qQUERY-bBUDGET combinations, comma-separated")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--baal", default=",".join(BAAL_HEURISTICS),
                        help="baal heuristics for the peer column ('' for none; make bench installs baal): margin, "
                             "bald, powerbald, entropy, certainty, random")
    parser.add_argument("--baal-works", default=",".join(BAAL_WORKS), help="the works the peer column runs on")
    parser.add_argument("--out", default="runs/bench-label-efficiency")
    parser.add_argument("--fresh", action="store_true", help="ignore the cached runs")
    parser.add_argument("--cached-only", action="store_true",
                        help="run nothing: print the tables of the runs cached so far (e.g. from parallel processes)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if get_settings().torch_threads:  # ALPIPE_TORCH_THREADS=1 when several bench processes share the cores
        torch.set_num_threads(get_settings().torch_threads)
    out = Path(args.out)
    cache = PointCache(out / "points.json", fresh=args.fresh)
    strategies = [s for s in args.strategies.split(",") if s]
    baal = [h for h in args.baal.split(",") if h]
    by_key = {w.key: w for w in WORKS}
    started = time.perf_counter()
    tables = []
    for key in args.works.split(","):
        work = by_key.get(key) or Work(*_parse_key(key))
        print(f"{work.key}: running", flush=True)
        peer = baal if work.key in args.baal_works.split(",") else []
        points = run_work(work, strategies=strategies, baal=peer, seeds=args.seeds, cache=cache, out=out,
                          cached_only=args.cached_only)
        tables.append(table(work, points))
    print("\nlabel efficiency (random needs: median extra labels random needs to match; worst gap: the "
          "strategy's mean minus random's at its worst budget)")
    print("\n".join(tables))
    print(selection_cost())
    print(f"\n{time.perf_counter() - started:.0f}s in all; curves per work under {out}/")


def _parse_key(key: str) -> tuple[str, int, int]:
    dataset, q, b = key.rsplit("-", 2)
    return dataset, int(q.removeprefix("q")), int(b.removeprefix("b"))


if __name__ == "__main__":
    main()
