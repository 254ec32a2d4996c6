"""Writing a finished experiment: curves.csv, summary.json and curves.png, all or nothing."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from . import records
from .results import CurvePoint, curves_csv, plot_curves, summarize
from .storage import ObjectStore

RESULT_FILES = ("curves.csv", "summary.json", "curves.png")


def write_results(points: list[CurvePoint], *, config: dict, out: Path, title: str,
                  store: ObjectStore | None = None, experiment: str | None = None) -> dict:
    """Write the three result files into out (replacing older ones only once all are ready)."""
    summary = summarize(points, config=config)
    files = {
        "curves.csv": curves_csv(points).encode(),
        "summary.json": json.dumps(summary, indent=2).encode(),
        "curves.png": plot_curves(points, title=title),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".partial-"))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        for name in files:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if store is not None and experiment:
        for name, data in files.items():
            records.write_experiment_file(store, experiment, name, data)
    return summary
