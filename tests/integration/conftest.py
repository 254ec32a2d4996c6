"""Fixtures shared by the integration tests (the servers themselves are in tests/conftest.py)."""

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from alpipe.config import Settings
from alpipe.storage import ObjectStore, S3Store
from services.api.main import create_app
from tests.integration.test_api import make_settings
from tests.integration.test_workers import workers  # noqa: F401  (worker processes, for every suite)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    """Each test that takes `store` runs twice: on the local directory and on the real S3 server."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def local(local_store: ObjectStore) -> ObjectStore:
    """For tests whose behaviour does not depend on the backend: the fast local store."""
    return local_store


@pytest.fixture
def settings_for(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str):
    """settings_for(store, **overrides) -> Settings over that store and the test's Redis."""

    def make(store: ObjectStore, **overrides) -> Settings:
        s3 = request.getfixturevalue("s3_server") if isinstance(store, S3Store) else None
        return make_settings(tmp_path, overrides.pop("redis_url", redis_url), store, s3, **overrides)

    return make


@pytest.fixture
def app_for(settings_for):
    """app_for(store, **settings) -> a started TestClient; all are stopped at the end of the test."""
    clients: list[TestClient] = []

    def start(store: ObjectStore, **overrides) -> TestClient:
        client = TestClient(create_app(settings_for(store, **overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield start
    for client in reversed(clients):
        client.__exit__(None, None, None)
