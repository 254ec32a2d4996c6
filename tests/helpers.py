"""Small helpers shared by the test suites (import as `from tests.helpers import ...`)."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from alpipe.procs import die_with_parent, find_redis_server, free_port, stop_process

__all__ = ["TcpProxy", "die_with_parent", "find_redis_server", "free_port", "http_answers", "stop_process",
           "wait_until"]


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


class TcpProxy:
    """A TCP proxy from a free loopback port to a target, which a test can cut and restore: the way to
    take a server away without losing its data (an in-memory S3 server would lose it if killed).

    cut() closes every open connection and stops listening (clients get "connection refused");
    restore() listens on the same port again.
    """

    def __init__(self, target_host: str, target_port: int):
        import socket
        import threading

        self._socket, self._threading = socket, threading
        self.target = (target_host, target_port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._open: list = []
        self._listener = None
        self.restore()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = self._socket.socket()
        listener.setsockopt(self._socket.SOL_SOCKET, self._socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._open = self._open, []
        for sock in [listener, *conns]:
            if sock is not None:
                try:
                    sock.shutdown(self._socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = self._socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.close()
                except OSError:
                    pass
