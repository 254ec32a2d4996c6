"""`make chaos`: the services under faults, with the promises checked at the end.

Real processes: redis-server (AOF), two API processes, a trainer and two scorers, on the local store
or on the S3 backend (moto behind a TCP proxy that is cut to take the store away without losing its
data). Labelers lease and label over HTTP, each request going to either API process, while faults
come in turn: SIGKILL and restart of a scorer, the trainer, an API process, redis-server, and the
object store taken away for a few seconds. When the faults stop and the system has settled:

- no acknowledged label is lost: every vote acknowledged is the last one of its labeler and sample
  in the durable export;
- no sample was leased to two labelers at once;
- the live ranking is complete for its shard plan; model versions never went back;
- no answer was a 500, and no 5xx came outside a fault window;
- no traceback in the API logs (an outage is a line, not a traceback per request);
- the labeled count of GET /projects/{p} equals the export's, with no `alpipe recover`.

    python -m bench.chaos --backend local,s3 --labelers 20 --faults 100
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import httpx
import redis

from alpipe.procs import find_redis_server, free_port, stop_process
from alpipe.state import ProjectState
from tests.helpers import TcpProxy, http_answers, wait_until

PROJECT = "chaos"
CLASSES = [str(d) for d in range(10)]
FAULTS = ("scorer", "trainer", "api", "redis", "store")
# 5xx within this long after a fault ends still belong to it (clients reconnecting, a rebuilt cache).
GRACE_S = 6.0


@dataclass
class Proc:
    name: str
    cmd: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.killing = False
        out = self.log.open("ab")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    killing: bool = False  # a fault holds it down: the supervisor leaves it alone

    def kill(self) -> None:
        self.killing = True
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.killing = True
        if self.proc is not None:
            stop_process(self.proc, timeout=10)


@dataclass
class Record:
    """What the labelers and the poller saw."""

    statuses: list[tuple[float, int, str]] = field(default_factory=list)  # (time, status, route)
    acknowledged: dict[tuple[str, str], str] = field(default_factory=dict)  # (sample, labeler) -> label
    held: dict[str, list[tuple[str, float, float]]] = field(default_factory=lambda: defaultdict(list))
    versions: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    windows: list[tuple[str, float, float]] = field(default_factory=list)  # (fault, start, end)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def status(self, code: int, route: str) -> None:
        with self.lock:
            self.statuses.append((time.time(), code, route))


class Stack:
    def __init__(self, root: Path, backend: str):
        self.root, self.backend = root, backend
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, Proc] = {}
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.env = {**os.environ, "REDIS_URL": self.redis_url, "ALPIPE_DATA_DIR": str(root),
                    "ALPIPE_RECONCILE_INTERVAL_S": "0.5", "ALPIPE_HEARTBEAT_TTL_S": "3", "ALPIPE_TORCH_THREADS": "1",
                    "ALPIPE_SHARD_SIZE": "150", "ALPIPE_LEASE_TTL_S": "60", "PYTHONUNBUFFERED": "1"}
        self.proxy: TcpProxy | None = None
        self.standin_objects = 0
        if backend == "s3":
            moto_port = free_port()
            self.add("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)], self.env)
            wait_until(lambda: http_answers(f"http://127.0.0.1:{moto_port}/moto-api/"), timeout=60, what="moto")
            self.proxy = TcpProxy("127.0.0.1", moto_port)
            self.env.update(ALPIPE_S3_ENDPOINT=self.proxy.endpoint, ALPIPE_S3_ACCESS_KEY="chaos",
                            ALPIPE_S3_SECRET_KEY="chaos-secret", ALPIPE_S3_BUCKET="chaos")
        self.add("redis", [find_redis_server(), "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir",
                           str(root), "--appendonly", "yes", "--save", ""], self.env)
        wait_until(redis.Redis.from_url(self.redis_url).ping, timeout=30, what="redis-server")
        self.api_urls = []
        alpipe = [sys.executable, "-m", "alpipe.cli"]
        for i in (1, 2):
            port = free_port()
            self.api_urls.append(f"http://127.0.0.1:{port}")
            self.add(f"api{i}", [*alpipe, "api", "--host", "127.0.0.1", "--port", str(port)], self.env)
        self.add("trainer", [*alpipe, "worker", "trainer"], self.env)
        for i in (1, 2):
            self.add(f"scorer{i}", [*alpipe, "worker", "scorer"], self.env)
        for url in self.api_urls:
            wait_until(lambda url=url: http_answers(f"{url}/health"), timeout=120, what="an API process")

    def supervise(self, stop: threading.Event) -> None:
        """Restart a process that exited by itself (a worker that lost Redis), as compose's `restart:
        unless-stopped` and Kubernetes do."""
        while not stop.wait(1.0):
            for proc in list(self.procs.values()):
                if proc.proc is not None and proc.proc.poll() is not None and not proc.killing:
                    print(f"  {proc.name} exited ({proc.proc.returncode}): restarted", flush=True)
                    proc.start()

    def add(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        self.procs[name] = Proc(name, cmd, env, self.logs / f"{name}.log")
        self.procs[name].start()

    def take_store_away(self, seconds: float) -> None:
        if self.proxy is not None:
            self.proxy.cut()
            time.sleep(seconds)
            self.proxy.restore()
            return
        store, away = self.root / "store", self.root / "store-away"
        store.rename(away)
        time.sleep(seconds)
        if store.exists():
            # A process that started meanwhile made a new root (the store's constructor does, on a first
            # run). Objects written there would be lost when the real store comes back: counted.
            self.standin_objects += sum(1 for p in store.rglob("*") if p.is_file())
            shutil.rmtree(store)
        away.rename(store)

    def stop(self) -> None:
        for name in [n for n in self.procs if n not in ("redis", "moto")] + ["redis", "moto"]:
            if name in self.procs:
                self.procs[name].stop()
        if self.proxy is not None:
            self.proxy.cut()


def labeler(name: str, stack: Stack, record: Record, stop: threading.Event, pace_s: float) -> None:
    rng = random.Random(name)
    with httpx.Client(timeout=30) as http:
        def call(method: str, route: str, **kwargs) -> httpx.Response | None:
            url = rng.choice(stack.api_urls)
            try:
                answer = http.request(method, f"{url}{route}", **kwargs)
            except httpx.HTTPError:
                return None  # that API process is down: another try goes to either
            record.status(answer.status_code, f"{method} {route.split('?')[0]}")
            return answer

        while not stop.is_set():
            answer = call("GET", f"/projects/{PROJECT}/queries", params={"n": 1, "labeler": name})
            if answer is None or answer.status_code != 200 or not answer.json()["samples"]:
                time.sleep(0.5)
                continue
            query = answer.json()
            sample = query["samples"][0]["sample_id"]
            served, label = time.time(), rng.choice(CLASSES)
            body = {"labeler": name, "labels": [{"sample_id": sample, "label": label,
                                                 "lease_token": query["lease_token"]}]}
            while True:  # a label is retried until it is acknowledged or refused: it must not be lost
                answer = call("POST", f"/projects/{PROJECT}/labels", json=body)
                if answer is not None and answer.status_code < 500:
                    break
                time.sleep(0.3)
            with record.lock:
                record.held[sample].append((name, served, time.time()))
                if answer.status_code == 200:
                    record.acknowledged[(sample, name)] = label
            time.sleep(pace_s)


def poll_versions(stack: Stack, record: Record, stop: threading.Event) -> None:
    with httpx.Client(timeout=10) as http:
        while not stop.wait(0.5):
            for url in stack.api_urls:
                try:
                    answer = http.get(f"{url}/projects/{PROJECT}")
                except httpx.HTTPError:
                    continue
                if answer.status_code == 200:
                    record.versions[url].append(answer.json()["model"]["version"])


def inject(stack: Stack, record: Record, kind: str, rng: random.Random) -> None:
    started = time.time()
    if kind == "store":
        stack.take_store_away(3.0)
    else:
        name = {"scorer": rng.choice(["scorer1", "scorer2"]), "api": rng.choice(["api1", "api2"]),
                "trainer": "trainer", "redis": "redis"}[kind]
        proc = stack.procs[name]
        proc.kill()
        time.sleep(1.0)
        proc.start()
        if name.startswith("api"):
            url = stack.api_urls[int(name[-1]) - 1]
            wait_until(lambda: http_answers(f"{url}/health"), timeout=120, what=name)
    with record.lock:
        record.windows.append((kind, started, time.time() + GRACE_S))


def settle(stack: Stack, r: redis.Redis, timeout_s: float = 180.0) -> None:
    """Wait until no job is queued or running and the live ranking is the current model's."""
    state = ProjectState(r, PROJECT)

    def quiet() -> bool:
        busy = sum(r.llen(f"rq:queue:{q}") for q in ("train", "score"))
        return busy == 0 and (state.live_version() or 0) >= state.model_version()

    wait_until(quiet, timeout=timeout_s, what="the stack settling after the faults")
    time.sleep(3)


def check(stack: Stack, record: Record, r: redis.Redis) -> dict[str, object]:
    api = stack.api_urls[0]
    export = httpx.get(f"{api}/projects/{PROJECT}/export", params={"format": "json"}, timeout=60).json()
    votes: dict[tuple[str, str], str | None] = {}
    for rec in export["records"]:
        votes[(rec["sample_id"], rec["labeler"])] = None if rec.get("retracted") else rec["label"]
    lost = [key for key, label in record.acknowledged.items() if votes.get(key) != label]
    overlaps = 0
    for spans in record.held.values():
        spans = sorted(spans, key=lambda s: s[1])
        overlaps += sum(1 for a, b in pairwise(spans) if a[0] != b[0] and b[1] < a[2])
    state = ProjectState(r, PROJECT)
    live = state.live_version() or 0
    n_shards = state.n_shards(live) if live else None
    done = r.scard(state.key("ranking", live, "done")) if live else 0
    complete = live == 0 or n_shards is None or done >= n_shards
    backwards = sum(1 for seen in record.versions.values() for a, b in pairwise(seen) if b < a)
    in_window = lambda t: any(start <= t <= end for _, start, end in record.windows)  # noqa: E731
    server_errors = [(t, code, route) for t, code, route in record.statuses if code >= 500]
    outside = [e for e in server_errors if not in_window(e[0])]
    tracebacks = sum((stack.logs / f"api{i}.log").read_text(errors="replace").count("Traceback") for i in (1, 2))
    labeled = httpx.get(f"{api}/projects/{PROJECT}", timeout=30).json()["counts"]["labeled"]
    return {
        "faults": dict(Counter(kind for kind, _, _ in record.windows)),
        "requests": len(record.statuses), "labels acknowledged": len(record.acknowledged),
        "acknowledged labels lost": len(lost), "duplicate leases": overlaps,
        "live ranking complete": complete, "model versions that went back": backwards,
        "answers 500": sum(1 for _, code, _ in server_errors if code == 500),
        "5xx in fault windows": len(server_errors) - len(outside), "5xx outside fault windows": len(outside),
        "tracebacks in the API logs": tracebacks, "objects written to a stand-in store": stack.standin_objects,
        "labeled (API) == export": labeled == len(export["training_labels"]),
        "model version": state.model_version(),
    }


def passed(report: dict[str, object]) -> bool:
    return (report["acknowledged labels lost"] == 0 and report["duplicate leases"] == 0
            and report["live ranking complete"] is True and report["model versions that went back"] == 0
            and report["answers 500"] == 0 and report["5xx outside fault windows"] == 0
            and report["tracebacks in the API logs"] == 0 and report["labeled (API) == export"] is True
            and report["objects written to a stand-in store"] == 0)


def run(root: Path, backend: str, *, labelers: int, faults: int, interval_s: float, pace_s: float = 1.0,
        seed: int = 0) -> dict[str, object]:
    stack = Stack(root, backend)
    try:
        api = stack.api_urls[0]
        httpx.post(f"{api}/projects", json={"name": PROJECT, "classes": CLASSES, "model": "small_cnn",
                                            "query_size": 20, "training": {"stop": "epochs:2"}},
                   timeout=60).raise_for_status()
        httpx.post(f"{api}/projects/{PROJECT}/samples/import", json={"dataset": "digits", "limit": 600},
                   timeout=300).raise_for_status()
        record, stop = Record(), threading.Event()
        threads = [threading.Thread(target=labeler, args=(f"labeler{i}", stack, record, stop, pace_s), daemon=True)
                   for i in range(labelers)]
        threads.append(threading.Thread(target=poll_versions, args=(stack, record, stop), daemon=True))
        supervisor_stop = threading.Event()
        threading.Thread(target=stack.supervise, args=(supervisor_stop,), daemon=True).start()
        for t in threads:
            t.start()
        rng = random.Random(seed)
        for i in range(faults):
            time.sleep(interval_s)
            kind = FAULTS[i % len(FAULTS)]
            print(f"fault {i + 1}/{faults}: {kind}", flush=True)
            inject(stack, record, kind, rng)
        time.sleep(interval_s)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        r = redis.Redis.from_url(stack.redis_url)
        settle(stack, r)
        report = check(stack, record, r)
        supervisor_stop.set()
        return report
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="local,s3", help="local, s3 or both (comma-separated)")
    parser.add_argument("--labelers", type=int, default=20)
    parser.add_argument("--faults", type=int, default=100, help="faults per backend, the kinds in turn")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between faults")
    parser.add_argument("--out", type=Path, default=Path("runs/chaos"))
    args = parser.parse_args(argv)
    ok = True
    for backend in args.backend.split(","):
        root = args.out / backend
        if root.exists():
            shutil.rmtree(root)
        report = run(root, backend, labelers=args.labelers, faults=args.faults, interval_s=args.interval)
        good = passed(report)
        ok &= good
        print(f"\n{backend}: {'PASS' if good else 'FAIL'} (logs in {root / 'logs'})")
        for key, value in report.items():
            print(f"  {key:<32} {value}")
        (args.out / f"{backend}.json").write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
