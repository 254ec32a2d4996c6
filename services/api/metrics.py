"""Prometheus metrics of the API: request counters and latency, and project gauges read at scrape time.

With several API worker processes (`alpipe api --workers N`), a scrape reaches one of them, so the
counters live in prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, set by
services.api.main.serve) and every scrape sums all processes' values.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from alpipe import embed_pass
from alpipe.projects import queue_depths
from alpipe.schemas import Project
from alpipe.state import ProjectState, project_names

log = logging.getLogger(__name__)


class _StateCollector:
    """Per-project sample counts, model versions, embedding passes and queue depths, read from Redis on each scrape."""

    def __init__(self, get_redis: Callable[[], redis.Redis]):
        self.get_redis = get_redis

    def collect(self) -> Iterator[Metric]:
        samples = GaugeMetricFamily("alpipe_project_samples", "Samples of a project by state",
                                    labels=["project", "state"])
        models = GaugeMetricFamily("alpipe_project_model_version", "Current model version of a project",
                                   labels=["project"])
        ranking = GaugeMetricFamily("alpipe_project_live_ranking_version",
                                    "Model version whose ranking is served (0 = cold start)", labels=["project"])
        embedded = GaugeMetricFamily("alpipe_embedding_images",
                                     "Images of a project's embedding pass by state (total, done, failed)",
                                     labels=["project", "state"])
        embed_rate = GaugeMetricFamily("alpipe_embedding_images_per_second",
                                       "Speed of a project's embedding pass so far", labels=["project"])
        embed_eta = GaugeMetricFamily("alpipe_embedding_eta_seconds",
                                      "Seconds left in a project's embedding pass at its speed so far (0 when done)",
                                      labels=["project"])
        queues = GaugeMetricFamily("alpipe_queue_depth", "Jobs waiting in an rq queue", labels=["queue"])
        up = GaugeMetricFamily("alpipe_redis_up", "1 when the last scrape could read Redis")
        try:
            r = self.get_redis()
            for name in project_names(r):
                state = ProjectState(r, name)
                for kind, value in state.counts().items():
                    samples.add_metric([name, kind], value)
                models.add_metric([name], state.model_version())
                live = state.live_version()
                if live is not None:
                    ranking.add_metric([name], live)
                meta = state.meta()
                progress = embed_pass.progress(r, Project.model_validate_json(meta)) if meta else None
                if progress is not None:
                    for kind in ("total", "done", "failed"):
                        embedded.add_metric([name, kind], getattr(progress, kind))
                    embed_rate.add_metric([name], progress.images_per_s or 0.0)
                    if progress.eta_s is not None:
                        embed_eta.add_metric([name], progress.eta_s)
            for queue, depth in queue_depths(r=r).items():
                queues.add_metric([queue], depth)
            up.add_metric([], 1)
        except redis.RedisError as e:
            log.warning("metrics: cannot read Redis: %s", e)
            up.add_metric([], 0)
        yield from (samples, models, ranking, embedded, embed_rate, embed_eta, queues, up)


def multiprocess_dir() -> str | None:
    """Where the worker processes keep their metric values; None in single-process mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class ApiMetrics:
    """One registry per app (tests build many apps in one process). `registry` is what /metrics serves."""

    def __init__(self, get_redis: Callable[[], redis.Redis]):
        shared_dir = multiprocess_dir()
        # In multiprocess mode the metrics below write to per-process files; the registry a scrape reads
        # sums those files, so the metrics themselves go to a registry nobody collects (else counted twice).
        self.registry = CollectorRegistry()
        own = CollectorRegistry() if shared_dir else self.registry
        if shared_dir:
            multiprocess.MultiProcessCollector(self.registry, path=shared_dir)
        self.labels_accepted = Counter("alpipe_labels_accepted", "Labels written to the label log",
                                       ["project"], registry=own)
        self.label_duplicates = Counter("alpipe_label_duplicates", "Labels received that were already recorded",
                                        ["project"], registry=own)
        self.labels_retracted = Counter("alpipe_labels_retracted", "Labels withdrawn by their labeler (undo)",
                                        ["project"], registry=own)
        self.queries_served = Counter("alpipe_queries_served", "Query requests answered", ["project"],
                                      registry=own)
        self.samples_leased = Counter("alpipe_samples_leased", "Samples handed out by queries", ["project"],
                                      registry=own)
        self.samples_released = Counter("alpipe_samples_released", "Leased samples handed back unlabeled",
                                        ["project"], registry=own)
        self.samples_added = Counter("alpipe_samples_added", "Samples added by upload or import",
                                     ["project", "split"], registry=own)
        self.reconciler_passes = Counter("alpipe_reconciler_passes", "Reconciler passes the API processes ran",
                                         registry=own)
        # livesum: the processes' values added up, dead processes left out; 1 while one of them leads.
        self.reconciler_leading = Gauge("alpipe_reconciler_leading",
                                        "1 while an API process of this server holds the reconciler lease",
                                        registry=own, multiprocess_mode="livesum")
        self.request_seconds = Histogram("alpipe_http_request_duration_seconds", "HTTP request latency",
                                         ["method", "route", "status"], registry=own,
                                         buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.registry.register(_StateCollector(get_redis))


class LatencyMiddleware:
    """Times every HTTP request by route template (not raw path, which would explode label values)."""

    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.request_seconds.labels(scope["method"], route, str(status)).observe(
                time.perf_counter() - started)

