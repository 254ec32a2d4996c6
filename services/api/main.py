"""The labeling API: app factory, lifespan (clients, start-up recovery, reconciler), error mapping."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import redis
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from alpipe.access import Forbidden, auth_enabled, check_access_config
from alpipe.config import Settings, get_settings
from alpipe.errors import NotFound, StoreUnavailable, UserError
from alpipe.labelstudio.client import LabelStudioError, LabelStudioNotFound
from alpipe.projects import Busy, Conflict, Invalid, NotAnImage, TooLarge
from alpipe.recovery import recover_all

from . import openapi
from .deps import Clients, require_authentication
from .export_routes import router as export_router
from .health import HealthProbe
from .labelstudio_routes import router as labelstudio_router
from .metrics import ApiMetrics, LatencyMiddleware, multiprocess_dir
from .routes import router
from .ui import router as ui_router

log = logging.getLogger("alpipe.api")

# Most specific first: the first class in an error's MRO that is listed here gives its status.
_STATUS: dict[type[UserError], int] = {
    LabelStudioNotFound: 404, LabelStudioError: 502,
    StoreUnavailable: 503, NotFound: 404, Forbidden: 403, Invalid: 422, Conflict: 409, TooLarge: 413,
    NotAnImage: 415, Busy: 503,
    UserError: 400,
}


class Reconciler:
    """A daemon thread calling alpipe.pipeline.reconcile every interval until stopped, while this process
    holds the reconciler lease in Redis: with several API processes or replicas exactly one reconciles,
    and another takes over within the lease's TTL when that one dies."""

    def __init__(self, clients: Clients, settings: Settings, metrics: ApiMetrics | None = None):
        from alpipe import keys
        from alpipe.work import Lease

        self.clients = clients
        self.settings = settings
        self.metrics = metrics
        self.lease = Lease(clients.redis, keys.reconciler_lease_key(),
                           ttl_s=max(10.0, 5 * settings.reconcile_interval_s))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alpipe-reconciler", daemon=True)
        self.runs = 0
        self.leading = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self.leading:
            try:
                self.lease.release()  # the next process takes over now, not after the TTL
            except redis.RedisError:
                pass

    def _lead(self) -> bool:
        leading = self.lease.hold()
        if leading != self.leading:
            if leading:
                log.info("reconciler: this process reconciles (lease %s)", self.lease.value)
            else:
                log.info("reconciler: %s reconciles; this process stands by", self.lease.holder())
        self.leading = leading
        if self.metrics is not None:
            self.metrics.reconciler_leading.set(int(leading))
        return leading

    def _run(self) -> None:
        from alpipe.pipeline import reconcile

        failing = False
        while not self._stop.wait(self.settings.reconcile_interval_s):
            try:
                if not self._lead():
                    continue
                reconcile(self.clients.redis, self.clients.store(), self.settings)
                self.runs += 1
                if self.metrics is not None:
                    self.metrics.reconciler_passes.inc()
                if failing:
                    log.info("reconciler: working again")
                failing = False
            except Exception as e:
                # Log the first failure of a streak, not one per interval; an outage is a line, not a traceback.
                if not failing:
                    if isinstance(e, (redis.ConnectionError, redis.TimeoutError, StoreUnavailable)):
                        log.warning("reconciler: pass failed (%s); retrying every %.1fs", e,
                                    self.settings.reconcile_interval_s)
                    else:
                        log.exception("reconciler: pass failed; retrying every %.1fs",
                                      self.settings.reconcile_interval_s)
                failing = True


def _recover_missing(clients: Clients, settings: Settings) -> None:
    """Rebuild every project that object storage has and Redis lacks (e.g. after a Redis wipe)."""
    try:
        report = recover_all(clients.redis, clients.store(), settings=settings, only_missing=True)
    except Exception as e:  # Redis or the store is down: start anyway, /health says which
        log.warning("start-up recovery skipped: %s: %s", e.__class__.__name__, e)
        return
    recovered = {name: rep for name, rep in report["projects"].items() if rep.get("status") != "present"}
    if recovered:
        log.info("start-up recovery: %s", recovered)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    if not auth_enabled(settings):
        log.warning("authentication is off (ALPIPE_ADMIN_TOKEN and ALPIPE_LABELERS are empty): anyone who "
                    "reaches this API acts as its admin; set them before exposing it beyond this machine")
    clients = Clients(settings)
    app.state.clients = clients
    await asyncio.to_thread(_recover_missing, clients, settings)
    reconciler = (Reconciler(clients, settings, app.state.metrics) if settings.reconcile_interval_s > 0
                  else None)
    app.state.reconciler = reconciler
    if reconciler is not None:
        reconciler.start()
    try:
        yield
    finally:
        if reconciler is not None:
            await asyncio.to_thread(reconciler.stop)
        clients.close()
        if multiprocess_dir():
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())  # its live gauges (reconciler_leading) stop counting


def _error(status: int, detail: object, **extra: object) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        status = next(_STATUS[cls] for cls in type(exc).__mro__ if cls in _STATUS)
        headers = {"Retry-After": "2"} if status == 503 else None
        response = _error(status, str(exc))
        if headers:
            response.headers.update(headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        problems = []
        for err in errors:
            where = ".".join(str(part) for part in err.get("loc", ()))
            if err.get("type") == "json_invalid":
                reason = (err.get("ctx") or {}).get("error", "a decode error")
                position = err.get("loc", ())[-1:]
                at = f" at character {position[0]}" if position and isinstance(position[0], int) else ""
                problems.append(f"the request body is not valid JSON: {reason}{at}")
            else:
                problems.append(f"{where}: {err.get('msg')}")
        # FastAPI's list stays in "detail" for clients that parse it; "message" is for people.
        detail = [{k: v for k, v in err.items() if k not in ("input", "ctx", "url")} for err in errors]
        return _error(422, detail, message="; ".join(problems))

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("%s %s: Redis unavailable: %s", request.method, request.url.path, exc)
        return _error(503, f"Redis is unavailable: {exc}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = _error(exc.status_code, exc.detail)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route that matched the path only; GET and POST
            # /projects are two routes.
            def serves(method: str) -> bool:
                scope = {**request.scope, "method": method}
                return any(route.matches(scope)[0] == Match.FULL for route in app.routes)

            methods = [m for m in ("GET", "POST", "PUT", "PATCH", "DELETE") if serves(m)]
            response.headers["Allow"] = ", ".join(methods)
        return response

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, "internal error; see the API log")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The labeling API over the given settings (default: from the environment)."""
    settings = settings or get_settings()
    if not settings.redis_url:
        raise UserError("set REDIS_URL (or ALPIPE_REDIS_URL) to the Redis the API should use, "
                        "e.g. redis://127.0.0.1:6379/0; `alpipe up` starts one for you")
    check_access_config(settings)
    # Every route needs a known token (when auth is on) except the public ones: see deps.py.
    app = FastAPI(title="alpipe labeling API", version="0.1.0", lifespan=lifespan,
                  dependencies=[Depends(require_authentication)],
                  description="Active learning for image classification: upload or import images, get the most "
                              "informative ones to label, post labels; the trainer and scorers do the rest.")
    app.state.settings = settings
    app.state.health = HealthProbe(lambda: app.state.clients)
    metrics = ApiMetrics(lambda: app.state.clients.redis)
    app.state.metrics = metrics
    app.add_middleware(LatencyMiddleware, metrics=metrics)
    _install_error_handlers(app)
    app.include_router(router)
    app.include_router(export_router)
    app.include_router(labelstudio_router)
    openapi.install(app, settings)
    app.include_router(ui_router)
    return app


@contextmanager
def _shared_metrics_dir() -> Iterator[None]:
    """A folder for the worker processes' metric files (PROMETHEUS_MULTIPROC_DIR, see metrics.py): the one
    the environment names, emptied of an earlier run's files, else a temporary one removed at the end."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        for stale in Path(given).glob("*.db"):
            stale.unlink(missing_ok=True)
        yield
        return
    folder = tempfile.mkdtemp(prefix="alpipe-api-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    try:
        yield
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(folder, ignore_errors=True)


def serve(host: str, port: int, *, workers: int = 1, access_log: bool = False) -> None:
    """Run the API under uvicorn (what `alpipe api` calls), in `workers` processes sharing the port.

    Each worker process builds its own app (clients, reconciler thread); the reconciler lease lets one
    of them reconcile."""
    import uvicorn

    options = dict(host=host, port=port, log_level="info", proxy_headers=True, access_log=access_log)
    if workers <= 1:
        uvicorn.run(create_app(), **options)
        return
    create_app()  # a configuration error stops here, once, instead of in every worker
    with _shared_metrics_dir():
        uvicorn.run("services.api.main:create_app", factory=True, workers=workers, **options)
