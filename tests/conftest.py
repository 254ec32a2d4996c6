"""Session-wide real servers (redis-server, moto's S3 server) on free ports, and stores over them.

Every process started here is stopped at session end, also when tests fail or the run is
interrupted (finalizers plus an atexit fallback).
"""

from __future__ import annotations

import atexit
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from alpipe.storage import LocalStore, S3Store
from tests.helpers import (
    die_with_parent,
    find_redis_server,
    free_port,
    http_answers,
    stop_process,
    wait_until,
)

_STARTUP_TIMEOUT_S = 30.0
_started: list[subprocess.Popen] = []


def _stop_all_at_exit() -> None:
    for proc in _started:
        stop_process(proc)


atexit.register(_stop_all_at_exit)


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        # Own process group (stopped as a whole), and killed by the kernel if pytest itself is killed.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=die_with_parent)
    _started.append(proc)
    return proc


def _start_on_free_port(name: str, make_cmd, ready, log: Path, attempts: int = 3):
    """Start a server on a free port and wait until ready(port); retry when the port got taken."""
    last_error: Exception | None = None
    for _ in range(attempts):
        port = free_port()
        proc = _spawn(make_cmd(port), log)
        try:
            wait_until(lambda port=port: ready(port), timeout=_STARTUP_TIMEOUT_S, what=name,
                       proc=proc, log=log)
            return proc, port
        except RuntimeError as e:  # exited early, most likely "address in use": try another port
            stop_process(proc)
            last_error = e
        except BaseException:
            stop_process(proc)
            raise
    raise RuntimeError(f"could not start {name} after {attempts} attempts") from last_error


# --------------------------------------------------------------------------- redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL (redis://127.0.0.1:PORT/0) of a real redis-server started for this session."""
    import redis

    binary = find_redis_server()
    workdir = tmp_path_factory.mktemp("redis")
    log = workdir / "redis.log"

    def cmd(port: int) -> list[str]:
        return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(workdir), "--daemonize", "no"]

    def ready(port: int) -> bool:
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()

    proc, port = _start_on_free_port("redis-server", cmd, ready, log)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc)


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """The session redis URL, emptied (FLUSHALL) before the test."""
    import redis

    client = redis.Redis.from_url(redis_server)
    try:
        client.flushall()
    finally:
        client.close()
    yield redis_server


@pytest.fixture
def redis_client(redis_url: str):
    """A redis.Redis client on the freshly flushed server."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


# --------------------------------------------------------------------------- S3 (moto)


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # "127.0.0.1:PORT", as minio.Minio / S3Store want it
    access_key: str = "testing-access-key"
    secret_key: str = "testing-secret-key"
    region: str = "us-east-1"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's standalone S3-compatible server, a real process on a free port."""
    workdir = tmp_path_factory.mktemp("moto")
    log = workdir / "moto.log"

    def cmd(port: int) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]

    def ready(port: int) -> bool:
        return http_answers(f"http://127.0.0.1:{port}/moto-api/")

    proc, port = _start_on_free_port("moto server", cmd, ready, log)
    try:
        yield S3Server(endpoint=f"127.0.0.1:{port}")
    finally:
        stop_process(proc)


@pytest.fixture
def s3_store(s3_server: S3Server) -> Iterator[S3Store]:
    """An S3Store on a fresh, uniquely named bucket of the session moto server."""
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    store = S3Store(endpoint=s3_server.endpoint, access_key=s3_server.access_key,
                    secret_key=s3_server.secret_key, bucket=bucket, secure=False,
                    region=s3_server.region)
    yield store
    try:  # best effort: moto keeps buckets in memory for the whole session
        for key in list(store.list()):
            store.delete(key)
        store.client.remove_bucket(bucket)
    except Exception:
        pass


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    """A LocalStore rooted in the test's tmp_path."""
    return LocalStore(tmp_path / "store")
