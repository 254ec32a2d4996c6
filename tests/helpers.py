"""Small helpers shared by the test suites (import as `from tests.helpers import ...`)."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from alpipe.procs import die_with_parent, find_redis_server, free_port, stop_process

__all__ = ["die_with_parent", "find_redis_server", "free_port", "http_answers", "stop_process", "wait_until"]


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


def _log_tail(log: Path | None, chars: int = 2000) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace")[-chars:]
    return f"\n--- last output ({log}) ---\n{text}"
