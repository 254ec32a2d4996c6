"""A lean HTTP load generator for the API benches: closed loop (clients as fast as answers come) and
open loop (labelers at a fixed pace, each request timed from when it was due, so queueing shows).

It speaks HTTP/1.1 with keep-alive over raw asyncio streams (uvloop when installed) and runs in its
own process, so a client library's overhead does not eat the 2 cores the API is measured on: at
3,000 requests/s httpx alone would need a core. Answers must carry Content-Length (uvicorn's do).

A scenario runs in a child process (`run_in_process`) and hands back plain lists of milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


class HttpError(Exception):
    pass


class Connection:
    """One keep-alive connection; requests on it go one after another."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}")
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + (body or b""))
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status_line, _, header_block = raw.partition(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length = None
        for line in header_block.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise HttpError(f"{method} {path}: answer without Content-Length")
        return status, await self.reader.readexactly(length)


@dataclass
class Scenario:
    """What one load-generator process runs. kind: 'health' (GET /health), 'labels' (POST /labels of one
    sample each, no lease: a program importing labels), 'cycle' (GET /queries?n=1 then POST /labels of the
    leased sample: a person labeling)."""

    url: str
    kind: str
    clients: int
    duration_s: float
    project: str = ""
    classes: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)  # for 'labels': the pool, split among the clients
    oracle: dict[str, str] = field(default_factory=dict)  # for 'cycle': sample id -> true label
    pace_per_s: float = 0.0  # 0: closed loop; > 0: each client starts a request (or cycle) this often
    warmup_s: float = 1.0
    headers: dict[str, str] = field(default_factory=dict)
    slow_ms: float = 20.0


@dataclass
class Result:
    kind: str
    clients: int
    pace_per_s: float
    duration_s: float = 0.0  # measured window, first request due to last answer
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)  # per request name
    statuses: dict[str, int] = field(default_factory=dict)  # "name status" -> count
    errors: list[str] = field(default_factory=list)
    labels_acknowledged: int = 0
    # (request name, unix time it was due, ms) of the requests slower than slow_ms, for finding what a tail is.
    slow: list[tuple[str, float, float]] = field(default_factory=list)

    def rate(self, name: str) -> float:
        return len(self.latencies_ms.get(name, [])) / self.duration_s if self.duration_s else 0.0


class _Recorder:
    def __init__(self, result: Result, measure_from: float, slow_ms: float):
        self.result = result
        self.measure_from = measure_from
        self.slow_ms = slow_ms
        self.unix_offset = time.time() - time.perf_counter()

    def add(self, name: str, status: int, due: float, done: float) -> None:
        key = f"{name} {status}"
        self.result.statuses[key] = self.result.statuses.get(key, 0) + 1
        if due >= self.measure_from:  # warm-up requests are counted in statuses, not timed
            ms = (done - due) * 1000
            self.result.latencies_ms.setdefault(name, []).append(ms)
            if ms > self.slow_ms:
                self.result.slow.append((name, due + self.unix_offset, ms))


async def _post_label(conn: Connection, sc: Scenario, rec: _Recorder, i: int, label: dict, due: float,
                      counted: bool | None = None) -> None:
    """POST one label, timed from due; its acknowledgement counted when its request was measured."""
    body = json.dumps({"labels": [label], "labeler": f"load{i}"}).encode()
    status, answer = await conn.request("POST", f"/projects/{sc.project}/labels", body, sc.headers)
    rec.add("POST /labels", status, due, time.perf_counter())
    if status != 200:
        rec.result.errors.append(f"labels {status} {answer[:200]!r}")
    elif due >= rec.measure_from if counted is None else counted:
        rec.result.labels_acknowledged += json.loads(answer)["accepted"]


async def _client(i: int, sc: Scenario, rec: _Recorder, start: float, stop_at: float) -> None:
    u = urlsplit(sc.url)
    conn = Connection(u.hostname or "127.0.0.1", u.port or 80)
    await conn.open()
    rng = random.Random(i)
    mine = sc.samples[i::sc.clients]
    flips = 0
    period = 1.0 / sc.pace_per_s if sc.pace_per_s else 0.0
    # Open loop: labelers' phases spread over one period, so they do not all fire on the same tick.
    due = start + (rng.random() * period if period else 0.0)
    try:
        while True:
            now = time.perf_counter()
            if period:
                if due > now:
                    await asyncio.sleep(due - now)
            else:
                due = now
            if due >= stop_at:
                return
            if sc.kind == "health":
                status, _ = await conn.request("GET", "/health", headers=sc.headers)
                rec.add("GET /health", status, due, time.perf_counter())
            elif sc.kind == "labels":
                if not mine:
                    return
                # Every POST is a new vote: a sample's label flips on each pass over the client's share.
                sample = mine[flips % len(mine)]
                label = sc.classes[(flips // len(mine)) % len(sc.classes)]
                flips += 1
                await _post_label(conn, sc, rec, i, {"sample_id": sample, "label": label}, due)
            else:  # cycle
                status, answer = await conn.request(
                    "GET", f"/projects/{sc.project}/queries?n=1&labeler=load{i}", headers=sc.headers)
                got = time.perf_counter()
                rec.add("GET /queries", status, due, got)
                samples = json.loads(answer).get("samples") if status == 200 else None
                if not samples:
                    rec.result.errors.append(f"queries {status} {answer[:200]!r}")
                else:
                    sid = samples[0]["sample_id"]
                    # The label is due when the query's answer arrived (a person answers at once here).
                    await _post_label(conn, sc, rec, i, {"sample_id": sid, "label": sc.oracle[sid],
                                                         "lease_token": json.loads(answer)["lease_token"]}, got,
                                      counted=due >= rec.measure_from)
            if period:
                due += period
    finally:
        await conn.close()


async def _run(sc: Scenario) -> Result:
    result = Result(sc.kind, sc.clients, sc.pace_per_s)
    start = time.perf_counter() + 0.2
    measure_from = start + sc.warmup_s
    stop_at = measure_from + sc.duration_s
    rec = _Recorder(result, measure_from, sc.slow_ms)
    outcomes = await asyncio.gather(*(_client(i, sc, rec, start, stop_at) for i in range(sc.clients)),
                                    return_exceptions=True)
    result.duration_s = time.perf_counter() - measure_from
    result.errors += [f"client failed: {o!r}" for o in outcomes if isinstance(o, BaseException)]
    return result


def run(sc: Scenario) -> Result:
    try:
        import uvloop
        return uvloop.run(_run(sc))
    except ImportError:
        return asyncio.run(_run(sc))


def _child(sc: Scenario, queue) -> None:
    queue.put(run(sc))


def run_in_process(sc: Scenario) -> Result:
    """The scenario in a fresh process (its own interpreter and event loop), its Result here."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(sc, queue), daemon=True)
    proc.start()
    try:
        return queue.get(timeout=sc.warmup_s + sc.duration_s + 120)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
