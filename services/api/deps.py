"""FastAPI dependencies: settings, the app's one Redis client and one object store, the caller, the project.

The clients are made once per app (in the lifespan, see main.py) and handed to routes through
`Annotated[..., Depends(...)]` aliases; the core functions get them as keyword arguments.

Dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency in its thread pool,
and a thread-pool round trip per dependency was most of a request's CPU (see the README's benchmarks).
The ones that talk to Redis or storage (get_project; get_store the first time) stay off the event loop.

Access control (alpipe.access): `require_authentication` runs for every route of the app and
answers 401 unless the request carries a known bearer token (or the route is public, or
authentication is off). Routes then ask for what they need:
- `PrincipalDep`: the caller (a `Principal`: name, is_admin, projects, can_access(project)).
- `AdminDep` (or `dependencies=[Depends(require_admin)]`): 403 unless the caller is the admin.
- `ProjectDep` (alias `ProjectAccessDep`): the project named in the path; 403 when the caller may
  not access it, checked before the project is even looked up.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
from typing import Annotated

import redis
from fastapi import Depends, HTTPException, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from alpipe import access
from alpipe.access import Principal
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

    def opened_store(self) -> ObjectStore | None:
        """The store when it is open already (no I/O), else None."""
        return self._store

    def store(self) -> ObjectStore:
        with self._lock:
            if self._store is None:
                self._store = open_store(self.settings)
            return self._store

    def close(self) -> None:
        self.redis.close()


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_clients(request: Request) -> Clients:
    return request.app.state.clients


async def get_redis(request: Request) -> redis.Redis:
    return request.app.state.clients.redis


async def get_store(request: Request) -> ObjectStore:
    clients: Clients = request.app.state.clients
    try:
        # Opening the store checks (or makes) its bucket: I/O, once per process, off the event loop.
        return clients.opened_store() or await run_in_threadpool(clients.store)
    except Exception as e:  # bucket check or creation failed: the store is unreachable or refuses us
        raise HTTPException(503, f"object storage is unavailable: {e.__class__.__name__}: {e}",
                            headers={"Retry-After": "2"}) from None


async def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]


# --- access control ---------------------------------------------------------------------------------

UNAUTHORIZED = "missing or unknown token; send Authorization: Bearer <token>"

# Open without a token: liveness, scraping, the API docs and the static web page (which asks for a token).
_PUBLIC_PATHS = {"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc",
                 # Label Studio's health check; its webhook checks its own secret (labelstudio_routes.py).
                 "/labelstudio/health", "/labelstudio/webhook"}
_PUBLIC_PREFIX = "/ui"
# Where a browser's <img> fetches, which cannot send headers: `?token=` is accepted too.
QUERY_TOKEN_ROUTES = {"/projects/{name}/samples/{sample_id}/image", "/projects/{name}/curve.png"}
_QUERY_TOKEN_PATH = re.compile(r"^/projects/[^/]+/(samples/[^/]+/image|curve\.png)$")

_bearer = HTTPBearer(auto_error=False, description="the admin token or a labeler's token (ALPIPE_ADMIN_TOKEN, "
                                                   "ALPIPE_LABELERS); not needed when the API runs without them")


def is_public(path: str) -> bool:
    return path in _PUBLIC_PATHS or path == _PUBLIC_PREFIX or path.startswith(_PUBLIC_PREFIX + "/")


def _route_path(request: Request) -> str | None:
    """The matched route's path template ('/projects/{name}'), None before routing."""
    return getattr(request.scope.get("route"), "path", None)


def _accepts_query_token(request: Request) -> bool:
    template = _route_path(request)
    if template is not None:
        return template in QUERY_TOKEN_ROUTES
    return bool(_QUERY_TOKEN_PATH.fullmatch(request.url.path))


def bearer_or_basic_token(request: Request) -> str | None:
    """The token of `Authorization: Bearer <token>`, or the password of Basic auth (what Label Studio's
    model settings send; the user name is not used)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode().partition(":")[2] or None
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


async def get_principal(request: Request, settings: SettingsDep,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> Principal:
    """The caller of the request (401 for a missing or unknown token; the dev principal when auth is off)."""
    cached = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    token = credentials.credentials if credentials is not None else bearer_or_basic_token(request)
    if token is None and _accepts_query_token(request):
        token = request.query_params.get("token") or None
    principal = access.authenticate(settings, token)
    if principal is None:
        raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def require_authentication(request: Request, settings: SettingsDep,
                                 credentials: Annotated[HTTPAuthorizationCredentials | None,
                                                        Security(_bearer)]) -> None:
    """App-wide: every route but the public ones needs a known token (when authentication is on)."""
    if is_public(_route_path(request) or request.url.path):
        return
    await get_principal(request, settings, credentials)


def _action(request: Request) -> str:
    return f"{request.method} {_route_path(request) or request.url.path}"


async def require_admin(request: Request, principal: PrincipalDep) -> Principal:
    """The caller, when it is the admin; 403 for a labeler."""
    access.require_admin(principal, _action(request))
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]


async def require_project_access(name: str, principal: PrincipalDep) -> Principal:
    """The caller, when it may access the project named in the path; 403 otherwise."""
    access.require_project(principal, name)
    return principal


ProjectAccessPrincipalDep = Annotated[Principal, Depends(require_project_access)]


def get_project(principal: ProjectAccessPrincipalDep, name: str, r: RedisDep, store: StoreDep,
                settings: SettingsDep) -> Project:
    """The project named in the path: 403 when the caller may not access it (asked first, so a
    labeler learns nothing of other projects), 404 when unknown (rebuilt first if only object
    storage has it)."""
    del principal  # the dependency is the check
    return load_or_recover(r, store, name, settings=settings)


ProjectDep = Annotated[Project, Depends(get_project)]
ProjectAccessDep = ProjectDep
