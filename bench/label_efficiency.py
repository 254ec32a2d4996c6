"""Label efficiency on mnist5k: how many more labels random sampling needs than margin and
least confidence (median over random's budgets), over several seeds, plus the wall time per
round split into training and scoring. Writes the usual results to runs/bench-label-efficiency.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from alpipe.config import get_settings
from alpipe.experiment import write_results
from alpipe.loop import ExperimentConfig, run_experiment
from alpipe.results import savings_table
from alpipe.storage import open_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=300)
    parser.add_argument("--out", default="runs/bench-label-efficiency")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = get_settings()
    config = ExperimentConfig(dataset="mnist5k", strategies=("margin", "least_confidence", "random"),
                              seeds=args.seeds, initial=20, query_size=10, budget=args.budget, model="small_cnn")
    store = open_store(settings)
    started = time.perf_counter()
    points = run_experiment(config, store=store, cache_dir=settings.data_dir / "datasets", experiment="bench")
    summary = write_results(points, config=config.as_dict(), out=Path(args.out), title="mnist5k, small_cnn")
    print(f"\nlabel efficiency on mnist5k, {args.seeds} seeds, budget {args.budget} "
          f"(target: random needs >= +50% labels vs margin), {time.perf_counter() - started:.0f}s in all")
    print(savings_table(summary))
    print(f"plot: {Path(args.out) / 'curves.png'}")


if __name__ == "__main__":
    main()
