"""The short chaos run (`make chaos` runs the long one): real processes under faults of every kind, on the
local store and on the S3 backend, and the promises checked at the end (bench/chaos.py says which)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import passed, run


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_the_promises_hold_under_faults(backend: str, tmp_path: Path) -> None:
    report = run(tmp_path / backend, backend, labelers=6, faults=10, interval_s=3.0, seed=1)
    assert report["faults"] == {"scorer": 2, "trainer": 2, "api": 2, "redis": 2, "store": 2}
    assert report["labels acknowledged"] > 20
    assert passed(report), report
