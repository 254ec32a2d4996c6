"""The whole pipeline as local processes: redis-server (unless REDIS_URL), API, trainer, scorers.

Used by `alpipe up`, by `alpipe simulate --stack` (what `make demo` runs) and by the e2e tests.
Each child's output is prefixed with its name and also kept in <data_dir>/logs/<name>.log.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from .config import Settings, api_worker_count
from .procs import die_with_parent, find_redis_server, free_port, stop_process

log = logging.getLogger(__name__)


class LocalStack:
    """Start with `with LocalStack(settings, scorers=2) as stack:`; stack.api_url is then live."""

    def __init__(self, settings: Settings, *, scorers: int = 2, trainers: int = 1, port: int | None = None,
                 echo: bool = True, extra_env: dict[str, str] | None = None, startup_timeout_s: float = 90.0,
                 api_workers: int | None = None, workers_optional: bool = False):
        # workers_optional: the API and Redis alone (the API bench); nothing trains or scores then.
        if not workers_optional and (scorers < 1 or trainers < 1):
            raise ValueError("the stack needs at least one trainer and one scorer")
        self.settings = settings
        self.scorers = scorers
        self.trainers = trainers
        self.api_workers = api_workers or api_worker_count(settings)
        self.port = port or free_port()
        self.echo = echo
        self.extra_env = extra_env or {}
        self.startup_timeout_s = startup_timeout_s
        self.data_dir = Path(settings.data_dir).resolve()
        self.log_dir = self.data_dir / "logs"
        self.procs: dict[str, subprocess.Popen] = {}
        self._pumps: list[threading.Thread] = []
        self.redis_url = settings.redis_url
        self.api_url = f"http://127.0.0.1:{self.port}"

    # --- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> str:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if not self.redis_url:
                self.redis_url = self._start_redis()
            env = self._child_env()
            alpipe = [sys.executable, "-m", "alpipe.cli"]
            self._spawn("api", [*alpipe, "api", "--host", "127.0.0.1", "--port", str(self.port),
                                "--workers", str(self.api_workers)], env)
            workers = [("trainer", i + 1) for i in range(self.trainers)]
            workers += [("scorer", i + 1) for i in range(self.scorers)]
            for kind, i in workers:
                self._spawn(f"{kind}{i}", [*alpipe, "worker", kind, "--name", f"{kind}{i}-{os.getpid()}"], env)
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        log.info("stack ready: API %s (docs %s/docs, %d worker processes), redis %s, %d trainer(s), %d scorer(s), "
                 "logs in %s", self.api_url, self.api_url, self.api_workers, self.redis_url, self.trainers,
                 self.scorers, self.log_dir)
        return self.api_url

    def stop(self) -> None:
        """SIGTERM every child (workers finish their current job), SIGKILL stragglers, redis last."""
        for name in [n for n in self.procs if n != "redis"]:
            stop_process(self.procs[name], timeout=15)
        if "redis" in self.procs:
            stop_process(self.procs["redis"])
        for pump in self._pumps:
            pump.join(timeout=2)
        self.procs.clear()

    def check_alive(self) -> None:
        """Raise when a child process has exited (the stack is no longer whole)."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}; see {self.log_dir / name}.log")

    def wait(self) -> None:
        """Block until a child exits or the caller is interrupted (Ctrl-C / SIGTERM)."""
        while True:
            self.check_alive()
            time.sleep(0.5)

    # --- internals ---------------------------------------------------------------------------------

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"REDIS_URL": self.redis_url, "ALPIPE_DATA_DIR": str(self.data_dir),
                    "PYTHONUNBUFFERED": "1"})
        if "ALPIPE_TORCH_THREADS" not in env and not self.settings.torch_threads:
            # N workers on N cores must not fight over threads.
            per_worker = max(1, (os.cpu_count() or 1) // max(1, self.scorers + self.trainers))
            env["ALPIPE_TORCH_THREADS"] = str(per_worker)
        env.update(self.extra_env)
        return env

    def _start_redis(self) -> str:
        port = free_port()
        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        self._spawn("redis", [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1",
                              "--dir", str(redis_dir), "--appendonly", "yes", "--save", "",
                              "--daemonize", "no"], dict(os.environ))
        url = f"redis://127.0.0.1:{port}/0"
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return url
            except redis.ConnectionError:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer on port {port}") from None
                time.sleep(0.1)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        self.procs[name] = proc
        pump = threading.Thread(target=self._pump, args=(name, proc), daemon=True)
        pump.start()
        self._pumps.append(pump)

    def _pump(self, name: str, proc: subprocess.Popen) -> None:
        with open(self.log_dir / f"{name}.log", "ab") as logfile:
            for line in proc.stdout:
                logfile.write(line)
                logfile.flush()
                if self.echo:
                    sys.stderr.write(f"{name:<9}| {line.decode(errors='replace')}")

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API did not become healthy within {self.startup_timeout_s:.0f}s; "
                                   f"see {self.log_dir / 'api.log'}")
            time.sleep(0.2)
