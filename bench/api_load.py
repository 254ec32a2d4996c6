"""The labeling API under load, each figure beside its baseline in the same run (timed, never asserted).

Three parts, on mnist5k projects imported through the API:

1. **Human pace, open loop**: 50 labelers, each starting one GET /queries?n=1 + POST /labels cycle per
   second, with a trainer and two scorers retraining every 10 labels. Each request is timed from when
   it was due (a late answer delays the next cycle, and that delay is counted), so queueing shows.
2. **Flat out, closed loop**, the API and Redis alone (no workers): POST /labels of one label each (a
   program importing labels), the lease+label cycle, and GET /health; on the local store and on the S3
   backend (moto's server, the tests' S3).
3. A **profile** of one API worker process during the flat-out lease+label cycle: py-spy (a bench-only
   dependency, `make bench` installs it) samples the threads that hold the GIL, and the table sums
   them by package and by alpipe function: where a request's CPU goes.

Baselines, in the same run: part 1, one API process with the workers at the API's CPU priority (as
before `--workers` and `ALPIPE_WORKER_NICE`); part 2, one API worker process. The load generator
(bench/loadgen.py) runs in a process of its own.

    python -m bench.api_load [--parts 1,2,3] [--duration-s 30] [--backends local,s3]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import redis

from alpipe.config import Settings, api_worker_count
from alpipe.data import load_dataset, materialize_builtin
from alpipe.procs import free_port, stop_process
from alpipe.stack import LocalStack
from alpipe.state import ProjectState
from alpipe.storage import LocalStore
from tests.helpers import http_answers, wait_until

from . import loadgen

log = logging.getLogger("bench.api_load")
DATASET = "mnist5k"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class Target:
    """A stack under test and what it serves."""

    url: str
    redis_url: str
    classes: list[str]
    oracle: dict[str, str]


def new_project(target: Target, *, query_size: int) -> tuple[str, list[str]]:
    """A fresh margin project over mnist5k; (name, its pool sample ids)."""
    name = f"load-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=target.url, timeout=300) as http:
        http.post("/projects", json={"name": name, "classes": target.classes, "strategy": "margin",
                                     "query_size": query_size, "model": "small_cnn", "pretrained": False,
                                     "training": {"stop": "epochs:3"}, "seed": 0}).raise_for_status()
        http.post(f"/projects/{name}/samples/import", json={"dataset": DATASET}).raise_for_status()
    # The pool (the test split is the API's own), read from Redis as the API does.
    r = redis.Redis.from_url(target.redis_url)
    pool = ProjectState(r, name).pool_ids()
    r.close()
    return name, pool


@contextmanager
def stack(tmp: Path, tag: str, *, api_workers: int, scorers: int = 0, trainers: int = 0,
          s3: bool = False, env: dict[str, str] | None = None):
    root = tmp / tag
    env = {"ALPIPE_DEVICE": "cpu", "ALPIPE_TEST_SCORE_DELAY_S": "0", "ALPIPE_TEST_TRAIN_EPOCH_DELAY_S": "0",
           "ALPIPE_S3_ENDPOINT": "", **(env or {})}
    moto = None
    if s3:
        port = free_port()
        moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: http_answers(f"http://127.0.0.1:{port}/moto-api/"), timeout=60, what="moto", proc=moto)
        env.update(ALPIPE_S3_ENDPOINT=f"127.0.0.1:{port}", ALPIPE_S3_ACCESS_KEY="bench",
                   ALPIPE_S3_SECRET_KEY="bench-secret", ALPIPE_S3_BUCKET="bench")
    datasets = root / "datasets"
    materialize_builtin(DATASET, datasets)
    settings = Settings(_env_file=None, data_dir=root, redis_url="")
    try:
        with LocalStack(settings, scorers=scorers, trainers=trainers, api_workers=api_workers, echo=False,
                        extra_env=env, workers_optional=True) as running:
            yield running
    finally:
        if moto is not None:
            stop_process(moto)


def target_for(running: LocalStack, tmp: Path) -> Target:
    manifest = load_dataset(DATASET, store=LocalStore(tmp / "oracle-store"),
                            cache_dir=running.data_dir / "datasets")
    oracle = {s.id: s.label for s in manifest.samples if s.label}
    return Target(running.api_url, running.redis_url, manifest.classes, oracle)


def run(sc: loadgen.Scenario) -> loadgen.Result:
    result = loadgen.run_in_process(sc)
    if result.errors:
        log.warning("%s: %d errors; first: %s", sc.kind, len(result.errors), result.errors[0])
    return result


def row(title: str, result: loadgen.Result, names: list[str]) -> str:
    cells = []
    for name in names:
        ms = result.latencies_ms.get(name, [])
        cells.append(f"{name}: p50 {pct(ms, 50):6.1f}  p99 {pct(ms, 99):7.1f}  ({result.rate(name):6.0f}/s)")
    bad = sum(n for key, n in result.statuses.items() if not key.endswith(" 200"))
    acked = result.labels_acknowledged / result.duration_s if result.duration_s else 0.0
    extra = f"  labels acknowledged {acked:5.0f}/s" if result.labels_acknowledged else ""
    return f"    {title:<34}" + " | ".join(cells) + extra + (f"  non-200: {bad}" if bad else "")


def part_human_pace(tmp: Path, args: argparse.Namespace) -> list[str]:
    lines = [f"\n[1] human pace, open loop: {args.labelers} labelers x 1 cycle/s (GET /queries?n=1 + POST /labels), "
             f"trainer + 2 scorers retraining every 10 labels; ms from when each request was due"]
    # Baseline: one API process and workers at the API's CPU priority, as before --workers and worker_nice.
    setups = (("baseline: 1 API worker, nice 0", 1, {"ALPIPE_WORKER_NICE": "0"}),
              (f"{args.workers} API workers, nice 10", args.workers, {}))
    for tag, workers, env in setups:
        with stack(tmp, f"pace-{workers}", api_workers=workers, scorers=2, trainers=1, env=env) as running:
            target = target_for(running, tmp)
            name, _ = new_project(target, query_size=10)
            sc = loadgen.Scenario(running.api_url, "cycle", args.labelers, args.duration_s, project=name,
                                  oracle=target.oracle, pace_per_s=1.0, warmup_s=3.0)
            result = run(sc)
            lines.append(row(tag, result, ["GET /queries", "POST /labels"]))
            print(lines[-1], flush=True)
    return lines


def part_flat_out(tmp: Path, args: argparse.Namespace) -> list[str]:
    lines = [f"\n[2] flat out, closed loop, API + Redis alone: {args.clients} clients; labels = POST /labels of one "
             "label each (no lease); cycle = GET /queries?n=1 + POST /labels"]
    for backend in args.backends:
        for tag, workers in (("1 worker", 1), (f"{args.workers} workers", args.workers)):
            with stack(tmp, f"flat-{backend}-{workers}", api_workers=workers, s3=backend == "s3") as running:
                target = target_for(running, tmp)
                name, pool = new_project(target, query_size=10_000)
                result = run(loadgen.Scenario(running.api_url, "labels", args.clients, args.duration_s,
                                              project=name, classes=target.classes, samples=pool))
                lines.append(row(f"{backend}, {tag}, labels", result, ["POST /labels"]))
                print(lines[-1], flush=True)
                name, _ = new_project(target, query_size=10_000)
                # Flat out, the cycle labels the whole 4,000-image pool in about 6 s: measure 4 s of it.
                result = run(loadgen.Scenario(running.api_url, "cycle", args.clients, min(4.0, args.duration_s),
                                              project=name, oracle=target.oracle))
                lines.append(row(f"{backend}, {tag}, cycle", result, ["GET /queries", "POST /labels"]))
                print(lines[-1], flush=True)
                if backend == args.backends[0]:
                    result = run(loadgen.Scenario(running.api_url, "health", args.health_clients, args.duration_s))
                    lines.append(row(f"{backend}, {tag}, health", result, ["GET /health"]))
                    print(lines[-1], flush=True)
    return lines


def part_profile(tmp: Path, args: argparse.Namespace) -> list[str]:
    """py-spy --gil on one API worker during the flat-out cycle: GIL samples by package and by our function."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        return ["\n[3] profile: py-spy is not installed (pip install py-spy); skipped"]
    lines = [f"\n[3] where an API worker's CPU goes: py-spy --gil, flat-out cycle, {args.clients} clients, 1 worker"]
    with stack(tmp, "profile", api_workers=1) as running:
        target = target_for(running, tmp)
        name, _ = new_project(target, query_size=10_000)
        raw = tmp / "profile.txt"
        seconds = max(3, int(args.duration_s / 2))
        sampler = subprocess.Popen([spy, "record", "--gil", "-r", "97", "-d", str(seconds), "-f", "raw", "-o",
                                    str(raw), "-p", str(running.procs["api"].pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = run(loadgen.Scenario(running.api_url, "cycle", args.clients, seconds, project=name,
                                      oracle=target.oracle, warmup_s=0.5))
        sampler.wait(seconds + 60)
        lines.append(row("during the profile", result, ["GET /queries", "POST /labels"]))
    by_package, by_function, total = profile_tables(raw)
    lines.append(f"    {total} samples with the GIL held; own time by package:")
    lines += [f"      {share:6.1%}  {name}" for name, share in by_package[:10]]
    lines.append("    alpipe and services functions, time including what they call:")
    lines += [f"      {share:6.1%}  {name}" for name, share in by_function[:12]]
    return lines


# What every request runs inside (the entry point, the latency middleware): not where its time goes.
_ENTRY_FRAMES = {"<module> (cli.py)", "main (cli.py)", "cmd_api (commands.py)", "serve (main.py)",
                 "LatencyMiddleware.__call__ (metrics.py)"}


def profile_tables(raw: Path) -> tuple[list[tuple[str, float]], list[tuple[str, float]], int]:
    """From py-spy's raw output (one 'frame;frame;... count' line per stack): own samples by package, and
    inclusive samples of our own functions, as shares of all samples."""
    from collections import Counter

    own: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines() if raw.exists() else []:
        stack, _, count = line.rpartition(" ")
        frames, n = stack.split(";"), int(count)
        total += n
        where = frames[-1].rpartition("(")[2]
        package = next((p for p in ("alpipe", "services", "fastapi", "starlette", "pydantic", "anyio", "uvicorn",
                                    "redis", "asyncio", "prometheus_client", "threading", "json") if p in where),
                       "other")
        own[package] += n
        for name in {f.partition(" (")[0] + " (" + f.rpartition("(")[2].split(":")[0].rpartition("/")[2] + ")"
                     for f in frames if "alpipe/" in f or "services/" in f} - _ENTRY_FRAMES:
            ours[name] += n
    shares = lambda c: [(k, v / total) for k, v in c.most_common()] if total else []  # noqa: E731
    return shares(own), shares(ours), total


def main() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")  # the dataset progress bars would bury the tables
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="1,2,3")
    parser.add_argument("--workers", type=int, default=api_worker_count(Settings(_env_file=None)),
                        help="API worker processes measured against 1 (default: alpipe's default)")
    parser.add_argument("--labelers", type=int, default=50)
    parser.add_argument("--clients", type=int, default=32, help="closed-loop clients of part 2")
    parser.add_argument("--health-clients", type=int, default=64)
    parser.add_argument("--duration-s", type=float, default=30.0,
                        help="seconds of load per measurement (p99 of a 30 s open-loop run rests on ~15 requests)")
    parser.add_argument("--backends", default="local,s3")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    args.backends = args.backends.split(",")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    parts = {int(p) for p in args.parts.split(",")}
    tmp = Path(tempfile.mkdtemp(prefix="alpipe-api-load-"))
    print(f"alpipe API load bench: {os.cpu_count()} cores, temp dir {tmp}", flush=True)
    lines: list[str] = []
    try:
        if 1 in parts:
            lines += part_human_pace(tmp, args)
        if 2 in parts:
            lines += part_flat_out(tmp, args)
        if 3 in parts:
            lines += part_profile(tmp, args)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{'=' * 30} API load: summary {'=' * 30}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
