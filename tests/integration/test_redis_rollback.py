"""A Redis that comes back with less than it acknowledged (restored from an older AOF copy, or a host crash
under appendfsync everysec): the reconciler sees the new run_id, finds the projects whose store holds
batches Redis never applied, and rebuilds them, with no operator. Its own redis-server with AOF."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from alpipe import pipeline
from alpipe.state import ProjectState
from alpipe.storage import ObjectStore
from services.api.main import create_app
from tests.helpers import find_redis_server, free_port, stop_process, wait_until
from tests.integration.test_api import CLASSES, new_project, png_bytes


class AofRedis:
    """redis-server writing every command to its append-only file in `folder` (appendfsync always)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis.from_url(self.url)
        wait_until(client.ping, timeout=30, what="redis-server with AOF", proc=self.proc)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    @property
    def aof(self) -> Path:
        return self.folder / "appendonlydir"


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[AofRedis]:
    folder = tmp_path / "redis"
    folder.mkdir()
    server = AofRedis(folder)
    server.start()
    yield server
    server.stop()


def label(client: TestClient, sample_ids: list[str], labeler: str) -> dict[str, str]:
    labels = {sid: CLASSES[i % len(CLASSES)] for i, sid in enumerate(sample_ids)}
    answer = client.post("/projects/pets/labels", json={"labeler": labeler, "labels": [
        {"sample_id": sid, "label": lab} for sid, lab in labels.items()]})
    assert answer.status_code == 200 and answer.json()["accepted"] == len(labels)
    return labels


def test_a_redis_restored_from_an_older_aof_gets_back_every_acknowledged_label(
        aof_redis: AofRedis, settings_for, local: ObjectStore, tmp_path: Path) -> None:
    settings = settings_for(local, redis_url=aof_redis.url, reconcile_interval_s=0.2)
    with TestClient(create_app(settings)) as client:
        new_project(client, query_size=100)
        ids = [client.post("/projects/pets/samples", files={"file": (f"{i}.png", png_bytes(i), "image/png")}
                           ).json()["sample_id"] for i in range(6)]
        acknowledged = label(client, ids[:2], "ann")
        snapshot = tmp_path / "aof-snapshot"
        shutil.copytree(aof_redis.aof, snapshot)  # the older copy an operator restores
        acknowledged |= label(client, ids[2:4], "bob")
        new_project(client, name="late")  # a project created after the snapshot
    aof_redis.stop()
    shutil.rmtree(aof_redis.aof)
    shutil.copytree(snapshot, aof_redis.aof)
    aof_redis.start()
    r = redis.Redis.from_url(aof_redis.url)
    assert ProjectState(r, "pets").counts()["labeled"] == 2  # Redis lost two acknowledged labels

    with TestClient(create_app(settings)):  # the API's reconciler, nobody else
        wait_until(lambda: ProjectState(r, "pets").labels() == acknowledged, timeout=30,
                   what="the lost labels back in Redis")
    assert ProjectState(r, "late").exists()
    assert ProjectState(r, "pets").counts()["pool"] == 2

    # The next pass, and a restart that lost nothing, rebuild nothing.
    assert pipeline.reconcile(r, local, settings)["rebuilt"] == {}
    aof_redis.stop()
    aof_redis.start()
    assert pipeline.reconcile(r, local, settings)["rebuilt"] == {}
    assert ProjectState(r, "pets").labels() == acknowledged
