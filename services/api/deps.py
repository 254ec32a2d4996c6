"""FastAPI dependencies: settings, the app's one Redis client and one object store, the project.

The clients are made once per app (in the lifespan, see main.py) and handed to routes through
`Annotated[..., Depends(...)]` aliases; the core functions get them as keyword arguments.
"""

from __future__ import annotations

import threading
from typing import Annotated

import redis
from fastapi import Depends, HTTPException, Request

from alpipe.config import Settings
from alpipe.recovery import load_or_recover
from alpipe.schemas import Project
from alpipe.storage import ObjectStore, open_store

from .metrics import ApiMetrics


def open_redis(settings: Settings) -> redis.Redis:
    """The Redis client of the settings (connects lazily, so a Redis that is down does not stop start-up)."""
    # Short connect timeout: /health must answer quickly when Redis is gone.
    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0, socket_timeout=30.0,
                                health_check_interval=30)


class Clients:
    """The app's collaborators. The store opens on first use, so the API starts (and /health can
    say what is wrong) even while object storage is unreachable."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis = open_redis(settings)
        self._store: ObjectStore | None = None
        self._lock = threading.Lock()

    def store(self) -> ObjectStore:
        with self._lock:
            if self._store is None:
                self._store = open_store(self.settings)
            return self._store

    def close(self) -> None:
        self.redis.close()


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_clients(request: Request) -> Clients:
    return request.app.state.clients


def get_redis(request: Request) -> redis.Redis:
    return get_clients(request).redis


def get_store(request: Request) -> ObjectStore:
    try:
        return get_clients(request).store()
    except Exception as e:  # bucket check or creation failed: the store is unreachable or refuses us
        raise HTTPException(503, f"object storage is unavailable: {e.__class__.__name__}: {e}") from None


def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]


def get_project(name: str, r: RedisDep, store: StoreDep, settings: SettingsDep) -> Project:
    """The project named in the path (404 when unknown; rebuilt first if only object storage has it)."""
    return load_or_recover(r, store, name, settings=settings)


ProjectDep = Annotated[Project, Depends(get_project)]
