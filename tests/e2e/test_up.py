"""`alpipe up`: the whole stack from one command, and a clean stop on SIGTERM."""

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import psutil


def test_up_serves_and_stops_cleanly_on_sigterm(tmp_path):
    env = {**os.environ, "ALPIPE_DATA_DIR": str(tmp_path), "ALPIPE_TORCH_THREADS": "1"}
    for name in ("REDIS_URL", "ALPIPE_REDIS_URL", "ALPIPE_S3_ENDPOINT"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-m", "alpipe.cli", "up", "--scorers", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "alpipe up exited early:\n" + "".join(lines[-40:])
            lines.append(line)
            match = re.search(r"alpipe is up: API (http://\S+)", line)
            url = match.group(1) if match else None
            assert time.monotonic() < deadline, "alpipe up never said it was up:\n" + "".join(lines[-40:])
        health = httpx.get(f"{url}/health", timeout=5).json()
        assert health["redis"] == "ok" and health["store"] == "ok"
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "redis-server" in names and names.count("worker scorer") == 2 and "worker trainer" in names

        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest[-3000:]
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left running after SIGTERM: {[c.pid for c in alive]}"
        try:
            httpx.get(f"{url}/health", timeout=2)
            raise AssertionError("the API still answers after the stack stopped")
        except httpx.TransportError:
            pass
        # Readable logs: each child's lines are prefixed with its name.
        assert any(line.startswith("api ") for line in lines + rest.splitlines())
    finally:
        if proc.poll() is None:
            proc.kill()
