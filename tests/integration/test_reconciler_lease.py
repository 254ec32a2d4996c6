"""Several API processes, one reconciler: the lease in Redis lets exactly one process reconcile, and another
takes over when that one dies. Two real `alpipe api` processes on one Redis and one store."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from alpipe import keys
from alpipe.storage import ObjectStore
from tests.helpers import free_port, http_answers, stop_process, wait_until
from tests.integration.test_workers import env_for

INTERVAL_S = 0.2


def passes(url: str) -> float:
    """This process's reconciler passes so far, from its /metrics."""
    text = httpx.get(f"{url}/metrics").text
    found = re.search(r"^alpipe_reconciler_passes_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.fixture
def two_apis(settings_for, local: ObjectStore, tmp_path: Path):
    settings = settings_for(local, reconcile_interval_s=INTERVAL_S)
    env = {**os.environ, **env_for(settings), "PYTHONUNBUFFERED": "1"}
    procs, urls = [], []
    for i in range(2):
        port = free_port()
        log = (tmp_path / f"api{i}.log").open("wb")
        # One worker process each: two replicas, whose pids the lease names (test_api_workers.py has one
        # server of several worker processes).
        procs.append(subprocess.Popen([sys.executable, "-m", "alpipe.cli", "api", "--host", "127.0.0.1", "--port",
                                       str(port), "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for proc, url in zip(procs, urls, strict=True):
            wait_until(lambda url=url: http_answers(f"{url}/health"), timeout=60, what="an API process", proc=proc)
        yield procs, urls
    finally:
        for proc in procs:
            stop_process(proc)


def test_one_api_process_reconciles_and_another_takes_over(two_apis, redis_client) -> None:
    procs, urls = two_apis
    wait_until(lambda: sum(passes(u) for u in urls) >= 10, timeout=60, what="reconciler passes")
    time.sleep(1.0)
    counts = [passes(u) for u in urls]
    assert sorted(c > 0 for c in counts) == [False, True], f"passes per process: {counts}"
    leader = counts.index(max(counts))
    holder = redis_client.get(keys.reconciler_lease_key()).decode()
    assert f":{procs[leader].pid}:" in holder

    # The leader dies without letting go: the other process takes over once the lease runs out.
    os.killpg(procs[leader].pid, signal.SIGKILL)
    procs[leader].wait(timeout=10)
    other = urls[1 - leader]
    before = passes(other)
    wait_until(lambda: passes(other) > before + 3, timeout=30, what="the other process taking over")
    assert f":{procs[1 - leader].pid}:" in redis_client.get(keys.reconciler_lease_key()).decode()
