"""An object store that goes away: every read and write says so (StoreUnavailable; 503 with Retry-After in
the API), never an empty answer, and the log says it once when the store goes and once when it is back.

The local store goes away as a directory that is moved (an unmounted volume); the S3 server goes away
behind a TCP proxy that is cut, so it keeps its data.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from alpipe.errors import StoreUnavailable
from alpipe.storage import LocalStore, S3Store
from tests.helpers import TcpProxy
from tests.integration.test_api import png_bytes

STORE_LOG = "alpipe.storage"


def outage_lines(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    messages = [r.getMessage() for r in caplog.records if r.name == STORE_LOG]
    return (sum("is unavailable" in m for m in messages), sum("available again" in m for m in messages))


def test_a_local_store_that_is_gone_is_unavailable_never_empty(local_store: LocalStore,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=STORE_LOG)
    local_store.put_bytes("projects/p/labels/a.jsonl", b"x")
    away = local_store.root.with_name("store-away")
    local_store.root.rename(away)
    for call in (lambda: local_store.get_bytes("projects/p/labels/a.jsonl"),
                 lambda: list(local_store.list("projects/")),
                 lambda: local_store.exists("projects/p/project.json"),
                 lambda: local_store.put_bytes("projects/p/x", b"v"),
                 lambda: local_store.put_if_absent("projects/p/y", b"v"),
                 lambda: local_store.put_new("projects/p/labels/z.jsonl", b"v"),
                 lambda: local_store.delete("projects/p/x")):
        with pytest.raises(StoreUnavailable, match="local directory .* is unavailable"):
            call()
    assert not local_store.root.exists()  # nothing was written to a stand-in root
    away.rename(local_store.root)
    assert list(local_store.list("projects/")) == ["projects/p/labels/a.jsonl"]
    assert outage_lines(caplog) == (1, 1)


def test_a_process_opening_a_local_store_that_is_gone_makes_no_stand_in(local_store: LocalStore) -> None:
    """A worker (re)starting while the directory is away must not make an empty one: the API would write
    acknowledged labels there, lost when the real directory comes back (what make chaos once caught)."""
    local_store.put_bytes("projects/p/labels/a.jsonl", b"x")
    away = local_store.root.with_name("store-away")
    local_store.root.rename(away)
    with pytest.raises(StoreUnavailable, match="is gone"):
        LocalStore(local_store.root)
    assert not local_store.root.exists()
    away.rename(local_store.root)
    assert LocalStore(local_store.root).get_bytes("projects/p/labels/a.jsonl") == b"x"


def test_an_s3_store_behind_a_cut_connection_is_unavailable(s3_server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=STORE_LOG)
    host, port = s3_server.endpoint.split(":")
    proxy = TcpProxy(host, int(port))
    store = S3Store(endpoint=proxy.endpoint, access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                    bucket=f"outage-{uuid.uuid4().hex[:12]}", region=s3_server.region)
    store.put_bytes("projects/p/labels/a.jsonl", b"x")
    proxy.cut()
    try:
        with pytest.raises(StoreUnavailable, match="s3://"):
            list(store.list("projects/"))
        with pytest.raises(StoreUnavailable, match="s3://"):
            store.get_bytes("projects/p/labels/a.jsonl")
    finally:
        proxy.restore()
    assert store.get_bytes("projects/p/labels/a.jsonl") == b"x"  # the data outlived the outage
    assert outage_lines(caplog) == (1, 1)


def test_the_api_answers_503_naming_the_store_and_logs_no_traceback(app_for, local: LocalStore, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    client: TestClient = app_for(local)
    assert client.post("/projects", json={"name": "pets", "classes": ["cat", "dog"]}).status_code == 201
    sample = client.post("/projects/pets/samples", files={"file": ("a.png", png_bytes(1), "image/png")}).json()
    label = {"labeler": "ada", "labels": [{"sample_id": sample["sample_id"], "label": "cat"}]}
    caplog.set_level(logging.WARNING)
    away = local.root.with_name("store-away")
    local.root.rename(away)
    try:
        for method, path, body in (("POST", "/projects/pets/labels", label),
                                   ("GET", "/projects/pets/export?format=csv", None),
                                   ("POST", "/projects/pets/samples", None),
                                   ("POST", "/projects/pets/labels", label)):
            files = {"file": ("b.png", png_bytes(2), "image/png")} if path.endswith("/samples") else None
            answer = client.request(method, path, json=body, files=files)
            assert answer.status_code == 503, (path, answer.text)
            assert answer.headers["Retry-After"]
            assert "object storage (local directory" in answer.json()["detail"]
        health = client.get("/health")
        assert health.status_code == 503 and "unavailable" in health.json()["store"]
    finally:
        away.rename(local.root)
    assert client.post("/projects/pets/labels", json=label).json()["accepted"] == 1
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert outage_lines(caplog) == (1, 1)
