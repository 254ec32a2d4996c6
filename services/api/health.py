"""GET /health's probe: Redis answers a PING and object storage a HEAD, coalesced under load.

Load balancers and monitors poll /health, sometimes thousands of times a second. Every request waits
for a probe that started no earlier than the request arrived or that is still in flight; requests
arriving while a probe runs share it, so a burst costs one PING and one HEAD, not one per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from alpipe import records

from .deps import Clients


def probe(clients: Clients) -> dict[str, Any]:
    """`ok` when Redis and object storage both answer; otherwise the part that does not, and why."""
    out: dict[str, Any] = {"status": "ok", "redis": "ok", "store": "ok"}
    try:
        clients.redis.ping()
    except Exception as e:
        out["redis"] = f"unreachable: {e.__class__.__name__}: {e}"
    try:
        store = clients.store()
        records.probe(store)
        out["store_location"] = store.describe()
    except Exception as e:
        out["store"] = f"unreachable: {e.__class__.__name__}: {e}"
    if out["redis"] != "ok" or out["store"] != "ok":
        out["status"] = "unavailable"
    return out


class HealthProbe:
    """One probe in flight at a time per process; every request arriving meanwhile gets its answer."""

    def __init__(self, get_clients: Callable[[], Clients]):
        self.get_clients = get_clients
        self._running: asyncio.Future | None = None

    async def check(self) -> dict[str, Any]:
        if self._running is None or self._running.done():
            # The probe blocks (redis-py and the store are synchronous): off the event loop.
            self._running = asyncio.ensure_future(asyncio.to_thread(probe, self.get_clients()))
        return dict(await asyncio.shield(self._running))
