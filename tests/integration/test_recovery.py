"""Wipe safety: after Redis loses everything, object storage brings every acknowledged label back."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from rq import Queue

from alpipe import cli, keys, pipeline
from alpipe.config import get_settings
from alpipe.errors import NotFound
from alpipe.projects import Busy, cold_start_score
from alpipe.recovery import recover_all, recover_project
from alpipe.state import ProjectState
from alpipe.storage import ObjectStore
from services.api.main import create_app
from tests.integration.test_api import (
    CLASSES,
    import_folder,
    label_log,
    make_image_folder,
    new_project,
    png_bytes,
)


@pytest.fixture
def scoring_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Spy on pipeline.enqueue_scoring (the real one still runs and queues score jobs)."""
    calls: list[tuple[str, int]] = []
    real = pipeline.enqueue_scoring

    def spy(r, store, project, version, **kwargs):
        calls.append((project.name, version))
        return real(r, store, project, version, **kwargs)

    monkeypatch.setattr(pipeline, "enqueue_scoring", spy)
    return calls


def snapshot(r: redis.Redis, name: str) -> dict:
    """Everything recovery must bring back (leases are deliberately not durable)."""
    state = ProjectState(r, name)
    counts = state.counts()
    del counts["leased"]
    return {"meta": json.loads(state.meta() or "null"), "labels": state.labels(), "pool": state.pool_ids(),
            "test_labels": state.test_labels(), "counts": counts, "model_version": state.model_version(),
            "model_labels": state.model_labels(), "curve": state.curve()}


def write_models(store: ObjectStore, r: redis.Redis, name: str) -> None:
    """What the trainer leaves behind: v1 and v2 complete (pointer at v2), v3 crashed before the pointer moved."""
    state = ProjectState(r, name)
    for version, n, acc in [(1, 5, 0.4), (2, 8, 0.6), (3, 9, 0.9)]:
        point = {"model_version": version, "n_labeled": n, "test_accuracy": acc, "train_s": 0.5,
                 "created_at": 1000.0 + version}
        store.put_json(keys.model_metrics_key(name, version), point)
        if version <= 2:
            store.put_json(keys.current_model_key(name),
                           {"version": version, "n_labeled": n, "key": keys.checkpoint_key(name, version)})
            state.set_model(version, n, json.dumps(point))


def label_through_api(client: TestClient, store: ObjectStore, tmp_path: Path) -> dict[str, str]:
    """A project with imported and uploaded samples, labels from two labelers and a relabel.

    Returns every label the API acknowledged (latest wins).
    """
    new_project(client, query_size=100, seed=5)
    import_folder(client, "pets", make_image_folder(tmp_path / "folder", CLASSES, 10))
    upload = client.post("/projects/pets/samples", files={"file": ("u.png", png_bytes(99), "image/png")})
    assert upload.status_code == 201
    acknowledged: dict[str, str] = {}
    for labeler, n in [("ann", 5), ("bob", 3)]:
        query = client.get("/projects/pets/queries", params={"n": n, "labeler": labeler}).json()
        labels = [{"sample_id": s["sample_id"], "label": CLASSES[i % 3], "lease_token": query["lease_token"]}
                  for i, s in enumerate(query["samples"])]
        response = client.post("/projects/pets/labels", json={"labels": labels, "labeler": labeler})
        assert response.status_code == 200 and response.json()["accepted"] == n
        acknowledged.update({item["sample_id"]: item["label"] for item in labels})
    first = next(iter(acknowledged))
    relabel = "fox" if acknowledged[first] != "fox" else "dog"
    assert client.post("/projects/pets/labels", json={"labels": [{"sample_id": first, "label": relabel}]}
                       ).json()["accepted"] == 1
    acknowledged[first] = relabel
    client.get("/projects/pets/queries", params={"n": 2, "labeler": "cy"})  # live leases, to be forgotten
    assert len(label_log(store, "pets")) == 3
    return acknowledged


def test_recover_all_after_flushall(settings_for, store: ObjectStore, redis_client, tmp_path: Path,
                                    scoring_calls: list) -> None:
    settings = settings_for(store)
    with TestClient(create_app(settings)) as client:
        acknowledged = label_through_api(client, store, tmp_path)
        write_models(store, redis_client, "pets")
        before = snapshot(redis_client, "pets")
    assert before["labels"] == acknowledged
    assert before["counts"] == {"pool": 25 - 8, "labeled": 8, "test": 6}

    redis_client.flushall()
    report = recover_all(redis_client, store, settings=settings)

    rep = report["projects"]["pets"]
    assert rep["status"] == "recovered"
    assert (rep["sample_batches"], rep["label_batches"], rep["label_records"]) == (2, 3, 9)
    assert (rep["pool"], rep["labeled"], rep["model_version"], rep["curve_points"]) == (17, 8, 2, 2)
    after = snapshot(redis_client, "pets")
    assert after == before
    assert after["labels"] == acknowledged  # every acknowledged label, the relabel included
    assert not set(acknowledged) & set(after["pool"])
    state = ProjectState(redis_client, "pets")
    assert state.counts()["leased"] == 0
    # Served at once from the cold-start ranking; the current model's scoring is queued to replace it.
    assert state.live_version() == 0
    ranking = dict(redis_client.zrange(state.ranking_key(0), 0, -1, withscores=True))
    assert {k.decode(): v for k, v in ranking.items()} == {sid: pytest.approx(cold_start_score(5, sid))
                                                          for sid in after["pool"]}
    assert scoring_calls == [("pets", 2)]
    assert Queue(keys.QUEUE_SCORE, connection=redis_client).count == rep["scoring"] == 1


def test_restarted_api_recovers_at_startup(settings_for, store: ObjectStore, redis_client, tmp_path: Path,
                                           scoring_calls: list) -> None:
    settings = settings_for(store)
    with TestClient(create_app(settings)) as client:
        acknowledged = label_through_api(client, store, tmp_path)
        before = snapshot(redis_client, "pets")
    redis_client.flushall()

    with TestClient(create_app(settings)) as client:
        assert ProjectState(redis_client, "pets").exists()  # rebuilt by the lifespan, before any request
        assert snapshot(redis_client, "pets") == before
        info = client.get("/projects/pets").json()
        assert info["counts"] == {"pool": 17, "labeled": 8, "leased": 0, "test": 6}
        served = client.get("/projects/pets/queries", params={"n": 1000, "labeler": "dan"}).json()
        assert {s["sample_id"] for s in served["samples"]} == set(before["pool"])
        sid, label = next(iter(acknowledged.items()))
        again = client.post("/projects/pets/labels", json={"labels": [{"sample_id": sid, "label": label}]})
        assert again.json() == {"accepted": 0, "duplicates": 1, "labeled": 8}
    assert scoring_calls == []  # no model yet: nothing to score


def test_project_lost_while_the_api_runs_is_rebuilt_on_access(settings_for, local_store: ObjectStore,
                                                               redis_client, tmp_path: Path) -> None:
    with TestClient(create_app(settings_for(local_store))) as client:
        acknowledged = label_through_api(client, local_store, tmp_path)
        redis_client.flushall()
        info = client.get("/projects/pets")
        assert info.status_code == 200
        assert info.json()["counts"]["labeled"] == len(acknowledged)
        assert ProjectState(redis_client, "pets").labels() == acknowledged
        assert [p["name"] for p in client.get("/projects").json()] == ["pets"]


def test_a_durable_label_survives_a_crash_before_redis(settings_for, local_store: ObjectStore, redis_client,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(local_store)
    with TestClient(create_app(settings)) as client:
        new_project(client)
        import_folder(client, "pets", make_image_folder(tmp_path / "folder", CLASSES, 4))
        query = client.get("/projects/pets/queries", params={"n": 1}).json()
        sid, token = query["samples"][0]["sample_id"], query["lease_token"]

        def redis_dies(self, records, **kwargs):
            raise redis.ConnectionError("connection lost")

        monkeypatch.setattr(ProjectState, "apply_labels", redis_dies)
        response = client.post("/projects/pets/labels", json={"labels": [{"sample_id": sid, "label": "dog",
                                                                        "lease_token": token}]})
        assert response.status_code == 503
        assert "Redis is unavailable" in response.json()["detail"]
        monkeypatch.undo()
    assert len(label_log(local_store, "pets")) == 1
    assert ProjectState(redis_client, "pets").labels() == {}

    redis_client.flushall()
    recover_all(redis_client, local_store, settings=settings)
    assert ProjectState(redis_client, "pets").labels() == {sid: "dog"}
    assert sid not in ProjectState(redis_client, "pets").pool_ids()


def test_recovery_is_idempotent(settings_for, local_store: ObjectStore, redis_client, tmp_path: Path) -> None:
    settings = settings_for(local_store)
    with TestClient(create_app(settings)) as client:
        label_through_api(client, local_store, tmp_path)
        write_models(local_store, redis_client, "pets")
    before = snapshot(redis_client, "pets")
    assert recover_all(redis_client, local_store, settings=settings, only_missing=True) == {
        "projects": {"pets": {"status": "present"}}}
    recover_project(redis_client, local_store, "pets", settings=settings)  # over live state: no change
    assert snapshot(redis_client, "pets") == before
    redis_client.flushall()
    recover_project(redis_client, local_store, "pets", settings=settings)
    recover_project(redis_client, local_store, "pets", settings=settings)
    assert snapshot(redis_client, "pets") == before


def test_recovery_errors(settings_for, local_store: ObjectStore, redis_client) -> None:
    settings = settings_for(local_store)
    with pytest.raises(NotFound, match="project 'ghost' not found"):
        recover_project(redis_client, local_store, "ghost", settings=settings)

    with TestClient(create_app(settings)) as client:
        new_project(client, name="good")
        new_project(client, name="held")
    redis_client.flushall()
    local_store.put_bytes(keys.project_key("broken"), b"{not json")
    redis_client.set(ProjectState(redis_client, "held").key("recovering"), "someone-else", ex=60)
    with pytest.raises(Busy):
        recover_project(redis_client, local_store, "held", settings=settings)

    report = recover_all(redis_client, local_store, settings=settings)["projects"]
    assert report["good"]["status"] == "recovered"
    assert report["held"]["status"] == "error" and "being rebuilt" in report["held"]["error"]
    assert report["broken"]["status"] == "error"
    assert ProjectState(redis_client, "good").exists() and not ProjectState(redis_client, "held").exists()


def test_cli_recover(settings_for, local_store: ObjectStore, redis_client, redis_url: str, tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    with TestClient(create_app(settings_for(local_store))) as client:
        acknowledged = label_through_api(client, local_store, tmp_path)
    redis_client.flushall()
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("ALPIPE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("ALPIPE_S3_ENDPOINT", raising=False)
    get_settings.cache_clear()
    try:
        assert cli.main(["recover", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["projects"]["pets"]["labeled"] == len(acknowledged)
        assert ProjectState(redis_client, "pets").labels() == acknowledged
        votes = sum(len(v) for v in ProjectState(redis_client, "pets").all_votes().values())
        assert report["projects"]["pets"]["votes"] == votes >= len(acknowledged)

        # Per project, what came back; a project that cannot be rebuilt makes the command fail.
        redis_client.flushall()
        local_store.put_bytes(keys.project_key("broken"), b"{not json")
        assert cli.main(["recover"]) == 1
        out, err = capsys.readouterr()
        assert "pets: rebuilt from" in out and f"{len(acknowledged)} labeled ({votes} votes)" in out
        assert "broken: error:" in out and "1 project(s) not recovered: broken" in err
    finally:
        get_settings.cache_clear()


def test_recover_waits_for_a_rebuild_another_process_started(settings_for, local_store: ObjectStore,
                                                             redis_client, tmp_path: Path) -> None:
    """Right after a wipe the API may already be rebuilding a project (it got a request first): recover
    waits for it and reports what the project has, instead of an error."""
    settings = settings_for(local_store)
    with TestClient(create_app(settings)) as client:
        acknowledged = label_through_api(client, local_store, tmp_path)
    redis_client.flushall()
    # The other process: it holds the lock while it rebuilds, and lets go half a second later.
    recover_project(redis_client, local_store, "pets", settings=settings)
    lock = ProjectState(redis_client, "pets").key("recovering")
    redis_client.set(lock, "the-api", ex=60)
    threading.Timer(0.5, redis_client.delete, args=(lock,)).start()
    report = recover_all(redis_client, local_store, settings=settings, wait_s=10)["projects"]
    assert report["pets"]["status"] == "rebuilt by another process"
    assert report["pets"]["labeled"] == len(acknowledged)

    redis_client.set(lock, "a-stuck-process", ex=60)
    report = recover_all(redis_client, local_store, settings=settings, wait_s=0.5)["projects"]
    assert report["pets"]["status"] == "error" and "still being rebuilt" in report["pets"]["error"]
