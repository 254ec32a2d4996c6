"""Fixtures shared by the integration tests (the servers themselves are in tests/conftest.py)."""

import pytest

from alpipe.storage import ObjectStore


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    """Each test that takes `store` runs twice: on the local directory and on the real S3 server."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def local(local_store: ObjectStore) -> ObjectStore:
    """For tests whose behaviour does not depend on the backend: the fast local store."""
    return local_store
