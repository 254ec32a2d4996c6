"""The labeling API over HTTP (FastAPI TestClient) on a real redis-server and a real S3 server (moto)."""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from alpipe import keys, records
from alpipe.config import Settings
from alpipe.projects import cold_start_score
from alpipe.state import ProjectState
from alpipe.storage import ObjectStore, S3Store
from services.api.main import create_app
from tests.helpers import free_port

CLASSES = ["cat", "dog", "fox"]


# --- helpers (test_recovery imports these) ----------------------------------------------------------


def make_settings(tmp_path: Path, redis_url: str, store: ObjectStore, s3_server=None, **overrides) -> Settings:
    """Settings whose object store is `store` (local_store: rooted at tmp_path/store; s3_store: its bucket
    on s3_server) and whose Redis is redis_url. The reconciler is off unless asked for."""
    values: dict = {"data_dir": tmp_path, "redis_url": redis_url, "reconcile_interval_s": 0}
    if isinstance(store, S3Store):
        values.update(s3_endpoint=s3_server.endpoint, s3_access_key=s3_server.access_key,
                      s3_secret_key=s3_server.secret_key, s3_region=s3_server.region, s3_bucket=store.bucket)
    values.update(overrides)
    return Settings(**values)


def png_bytes(seed: int, size: int = 8) -> bytes:
    """A small PNG, different for every seed."""
    digest = hashlib.sha256(str(seed).encode()).digest()
    pixels = (digest * (size * size // len(digest) + 1))[:size * size]
    buf = io.BytesIO()
    Image.frombytes("L", (size, size), pixels).save(buf, format="PNG")
    return buf.getvalue()


def make_image_folder(root: Path, classes: list[str], per_class: int, *, offset: int = 0) -> Path:
    """An ImageFolder <root>/<class>/<n>.png with per_class distinct images per class."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"{i:03d}.png").write_bytes(png_bytes(offset + c * 1000 + i))
    return root


def new_project(client: TestClient, name: str = "pets", classes: list[str] | None = None, **extra) -> dict:
    response = client.post("/projects", json={"name": name, "classes": classes or CLASSES, **extra})
    assert response.status_code == 201, response.text
    return response.json()


def import_folder(client: TestClient, project: str, folder: Path, **extra) -> dict:
    response = client.post(f"/projects/{project}/samples/import", json={"dataset": str(folder), **extra})
    assert response.status_code == 200, response.text
    return response.json()


def label_log(store: ObjectStore, project: str) -> list[str]:
    return list(store.list(keys.label_log_prefix(project)))


def sample_batches(store: ObjectStore, project: str) -> list[str]:
    return list(store.list(keys.samples_prefix(project)))


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture
def client(app_for, store: ObjectStore) -> TestClient:
    return app_for(store)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """3 classes x 10 images."""
    return make_image_folder(tmp_path / "folder", CLASSES, 10)


# --- projects ------------------------------------------------------------------------------------------


def test_create_list_and_get_project(client: TestClient, store: ObjectStore, redis_client) -> None:
    created = new_project(client, strategy="entropy", query_size=5, seed=7)
    assert created["name"] == "pets"
    assert created["project"]["classes"] == CLASSES and created["project"]["strategy"] == "entropy"
    assert created["project"]["created_at"] > 0
    # Object storage first (the source of truth), then Redis.
    stored = json.loads(store.get_bytes(keys.project_key("pets")))
    assert stored["seed"] == 7 and stored["query_size"] == 5
    assert ProjectState(redis_client, "pets").exists()

    listed = client.get("/projects").json()
    assert [p["name"] for p in listed] == ["pets"]
    assert listed[0]["counts"] == {"pool": 0, "labeled": 0, "leased": 0, "test": 0}

    info = client.get("/projects/pets").json()
    assert info["counts"] == {"pool": 0, "labeled": 0, "leased": 0, "test": 0}
    assert info["model"] == {"version": 0, "n_labeled": 0, "test_accuracy": None}
    assert info["live_ranking_version"] is None
    assert info["queues"] == {"train": 0, "score": 0}
    assert info["curve"] == []
    assert info["project"]["strategy"] == "entropy"


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"strategy": "cleverest"}, 422, "unknown strategy 'cleverest'; choose from: random"),
    ({"model": "gpt"}, 422, "unknown model 'gpt'"),
    ({"classes": ["a", "b", "a"]}, 422, "duplicate class names: 'a'"),
    ({"classes": ["a", " "]}, 422, "class names must not be empty"),
    ({"classes": ["only"]}, 422, "at least 2 items"),
    ({"name": "Bad Name"}, 422, "String should match pattern"),
    ({"training": {"stop": "never"}}, 422, "unknown stopping rule 'never'"),
    ({"colour": "blue"}, 422, "Extra inputs are not permitted"),
    ({"query_size": 0}, 422, "greater than or equal to 1"),
    ({"model": "vgg99", "finetune": False}, 422, "unknown model 'vgg99'"),
    ({"model": "small_cnn", "finetune": False}, 422, "small_cnn has no pretrained backbone"),
    ({"model": "efficientnet_lite0", "pretrained": False, "finetune": False}, 422, "is not pretrained"),
    ({"input_size": 8}, 422, "greater than or equal to 32"),
])
def test_create_project_rejects_bad_input(app_for, local: ObjectStore, body: dict, status: int,
                                          message: str) -> None:
    client = app_for(local)
    response = client.post("/projects", json={"name": "pets", "classes": CLASSES, **body})
    assert response.status_code == status
    assert message in json.dumps(response.json())
    assert not local.exists(keys.project_key("pets"))
    assert client.get("/projects").json() == []


def test_existing_name_is_a_conflict(app_for, local: ObjectStore) -> None:
    client = app_for(local)
    first = new_project(client)
    response = client.post("/projects", json={"name": "pets", "classes": ["x", "y"]})
    assert response.status_code == 409
    assert response.json() == {"detail": "project 'pets' already exists"}
    assert json.loads(local.get_bytes(keys.project_key("pets")))["created_at"] == first["project"]["created_at"]


def test_unknown_project_is_404_everywhere(app_for, local: ObjectStore) -> None:
    client = app_for(local)
    expected = {"detail": "project 'nope' not found"}
    for method, path, kwargs in [
        ("GET", "/projects/nope", {}),
        ("GET", "/projects/nope/queries", {}),
        ("GET", "/projects/nope/curve", {}),
        ("GET", "/projects/nope/curve.png", {}),
        ("POST", "/projects/nope/labels", {"json": {"labels": [{"sample_id": "a", "label": "cat"}]}}),
        ("POST", "/projects/nope/samples/import", {"json": {"dataset": "digits"}}),
        ("POST", "/projects/nope/samples", {"files": {"file": ("a.png", png_bytes(1), "image/png")}}),
        ("GET", "/projects/..%2Fetc/queries", {}),
    ]:
        response = client.request(method, path, **kwargs)
        assert response.status_code == 404, (path, response.text)
        if "etc" not in path:
            assert response.json() == expected, path


# --- samples -----------------------------------------------------------------------------------------


def test_upload_image(client: TestClient, store: ObjectStore) -> None:
    new_project(client)
    data = png_bytes(3)
    response = client.post("/projects/pets/samples", files={"file": ("three.png", data, "image/png")})
    assert response.status_code == 201, response.text
    body = response.json()
    sample_id = hashlib.sha256(data).hexdigest()
    assert body == {"sample_id": sample_id, "split": "pool", "created": True,
                    "image_url": f"/projects/pets/samples/{sample_id}/image"}
    assert store.get_bytes(keys.image_key(sample_id)) == data
    [batch] = sample_batches(store, "pets")
    record = json.loads(store.get_bytes(batch))
    assert record["id"] == sample_id and record["name"] == "three.png" and record["split"] == "pool"

    image = client.get(body["image_url"])
    assert image.status_code == 200 and image.content == data
    assert image.headers["content-type"] == "image/png"

    again = client.post("/projects/pets/samples", files={"file": ("copy.png", data, "image/png")})
    assert again.status_code == 200 and again.json()["created"] is False
    assert len(sample_batches(store, "pets")) == 1

    test_upload = client.post("/projects/pets/samples", files={"file": ("t.png", png_bytes(4), "image/png")},
                              data={"split": "test", "label": "dog"})
    assert test_upload.status_code == 201 and test_upload.json()["split"] == "test"
    assert client.get("/projects/pets").json()["counts"] == {"pool": 1, "labeled": 0, "leased": 0, "test": 1}

    # Cold start: the new pool sample can be queried before any model exists.
    queries = client.get("/projects/pets/queries", params={"n": 5}).json()
    assert [s["sample_id"] for s in queries["samples"]] == [sample_id]
    assert queries["model_version"] == 0
    assert queries["samples"][0]["score"] == pytest.approx(cold_start_score(0, sample_id))


def test_upload_rejections_write_nothing(app_for, store: ObjectStore, redis_client) -> None:
    client = app_for(store, max_upload_bytes=2000)
    new_project(client)
    big_image = io.BytesIO()
    Image.frombytes("L", (64, 64), bytes(range(256)) * 16).save(big_image, format="BMP")  # ~5 KB
    cases = [
        ({"files": {"file": ("notes.txt", b"just some text", "text/plain")}}, 415, "not a readable image"),
        ({"files": {"file": ("big.bmp", big_image.getvalue(), "image/bmp")}}, 413, "limit of 2000 bytes"),
        ({"files": {"file": ("huge.bin", b"x" * 200_000, "image/png")}}, 413, "limit of 2000 bytes"),
        ({"files": {"file": ("a.png", png_bytes(1), "image/png")}, "data": {"label": "cow"}}, 422,
         "label 'cow' is not a class of project 'pets'; allowed: cat, dog, fox"),
        ({"files": {"file": ("a.png", png_bytes(1), "image/png")}, "data": {"split": "train"}}, 422,
         "split must be 'pool' or 'test'"),
        ({"files": {"file": ("a.png", png_bytes(1), "image/png")}, "data": {"split": "test"}}, 422,
         "a test sample needs its label"),
        ({"files": {"other": ("a.png", png_bytes(1), "image/png")}}, 422, "form field 'file'"),
        ({"content": png_bytes(1), "headers": {"content-type": "image/png"}}, 415, "multipart/form-data"),
    ]
    for kwargs, status, message in cases:
        response = client.post("/projects/pets/samples", **kwargs)
        assert response.status_code == status, (message, response.text)
        assert message in response.json()["detail"]
    assert sample_batches(store, "pets") == []
    assert list(store.list("images/")) == []
    assert client.get("/projects/pets").json()["counts"] == {"pool": 0, "labeled": 0, "leased": 0, "test": 0}
    assert not redis_client.exists(ProjectState(redis_client, "pets").key("samples"))


def test_import_image_folder(client: TestClient, store: ObjectStore, folder: Path) -> None:
    new_project(client)
    (folder / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    result = import_folder(client, "pets", folder, test_fraction=0.2)
    assert (result["pool"], result["test"], result["already_present"]) == (24, 6, 0)
    assert any("broken.png" in s for s in result["skipped"])
    assert sample_batches(store, "pets") == [result["batch"]]
    lines = store.get_bytes(result["batch"]).decode().splitlines()
    assert len(lines) == 30
    info = client.get("/projects/pets").json()
    assert info["counts"] == {"pool": 24, "labeled": 0, "leased": 0, "test": 6}
    assert info["live_ranking_version"] == 0

    again = import_folder(client, "pets", folder, test_fraction=0.2)
    assert (again["pool"], again["test"], again["already_present"], again["batch"]) == (0, 0, 30, None)
    assert len(sample_batches(store, "pets")) == 1
    assert client.get("/projects/pets").json()["counts"]["pool"] == 24


def test_import_rejections(app_for, local: ObjectStore, folder: Path) -> None:
    client = app_for(local)
    new_project(client)
    unknown = client.post("/projects/pets/samples/import", json={"dataset": "imagenet-22k"})
    assert unknown.status_code == 400
    assert "unknown dataset 'imagenet-22k'" in unknown.json()["detail"]
    empty = client.post("/projects/pets/samples/import", json={"dataset": ""})
    assert empty.status_code == 422 and "at least 1 character" in empty.text
    new_project(client, name="birds", classes=["owl", "jay"])
    mismatch = client.post("/projects/birds/samples/import", json={"dataset": str(folder)})
    assert mismatch.status_code == 422
    assert "no images of the classes of project 'birds' (owl, jay)" in mismatch.json()["detail"]
    bad = client.post("/projects/pets/samples/import", json={"dataset": str(folder), "test_fraction": 1.5})
    assert bad.status_code == 422
    assert sample_batches(local, "pets") == [] and sample_batches(local, "birds") == []


def test_import_with_limit_takes_a_random_subset(app_for, local: ObjectStore, tmp_path: Path,
                                                 redis_client) -> None:
    digits = [str(d) for d in range(10)]
    folder = make_image_folder(tmp_path / "digits", digits, 12)
    client = app_for(local)
    new_project(client, name="digits", classes=digits)
    request = {"dataset": str(folder), "limit": 80, "test_fraction": 0.2}
    result = import_folder(client, "digits", folder, limit=80, test_fraction=0.2)
    assert result["pool"] + result["test"] == 80
    assert 6 <= result["test"] <= 26  # the whole-dataset stratified split (20 of 120), seen through a subset
    state = ProjectState(redis_client, "digits")
    test_labels = state.test_labels()
    assert len(test_labels) == result["test"]
    assert len(set(test_labels.values())) == 10  # a random subset, not the first class folders
    assert state.counts()["pool"] == result["pool"]

    again = client.post("/projects/digits/samples/import", json=request).json()
    assert (again["pool"], again["test"], again["already_present"]) == (0, 0, 80)
    # A larger limit extends the same subset, and a sample's split never changes.
    more = import_folder(client, "digits", folder, limit=100, test_fraction=0.2)
    assert (more["pool"] + more["test"], more["already_present"]) == (20, 80)
    assert {k: v for k, v in state.test_labels().items() if k in test_labels} == test_labels

    new_project(client, name="small", classes=["0", "1", "2"])
    part = import_folder(client, "small", folder, limit=80)
    assert part["pool"] + part["test"] < 80
    assert any("class '9' is not a class of the project" in s for s in part["skipped"])
    assert set(ProjectState(redis_client, "small").test_labels().values()) <= {"0", "1", "2"}


def test_import_builtin_dataset_by_name(app_for, local: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from alpipe import data

    # The built-in path with a small stand-in for sklearn's digits (the real one takes ~15 s to ingest).
    rng = np.random.default_rng(0)
    monkeypatch.setitem(data.BUILTIN_DATASETS, "digits",
                        lambda: (rng.integers(0, 16, size=(60, 8, 8)).astype(np.float64), np.arange(60) % 10))
    client = app_for(local)
    new_project(client, name="digits", classes=[str(d) for d in range(10)])
    result = client.post("/projects/digits/samples/import", json={"dataset": "digits", "limit": 50}).json()
    assert (result["dataset"], result["pool"] + result["test"]) == ("digits", 50)
    assert local.exists(keys.dataset_manifest_key("digits"))


def test_sample_image_of_unknown_sample_is_404(app_for, local: ObjectStore) -> None:
    client = app_for(local)
    new_project(client)
    response = client.get(f"/projects/pets/samples/{'0' * 64}/image")
    assert response.status_code == 404
    assert "not found in project 'pets'" in response.json()["detail"]


# --- queries -----------------------------------------------------------------------------------------


def test_two_labelers_get_disjoint_samples(client: TestClient, folder: Path) -> None:
    new_project(client)
    import_folder(client, "pets", folder)
    first = client.get("/projects/pets/queries", params={"n": 10, "labeler": "ann"}).json()
    second = client.get("/projects/pets/queries", params={"n": 10, "labeler": "bob"}).json()
    ids_a = {s["sample_id"] for s in first["samples"]}
    ids_b = {s["sample_id"] for s in second["samples"]}
    assert len(ids_a) == 10 and len(ids_b) == 10 and not ids_a & ids_b
    assert first["lease_token"] != second["lease_token"]
    assert first["expires_at"] > time.time() + 500  # lease_ttl_s defaults to 600
    rest = client.get("/projects/pets/queries", params={"n": 1000, "labeler": "cy"}).json()
    assert len(rest["samples"]) == 4  # 24 pool samples, 20 of them leased
    assert client.get("/projects/pets").json()["counts"]["leased"] == 24
    image = client.get(first["samples"][0]["image_url"])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


@pytest.mark.parametrize("params", [{"n": 0}, {"n": 1001}, {"n": "ten"}, {"labeler": ""}])
def test_query_bounds(app_for, local: ObjectStore, params: dict) -> None:
    client = app_for(local)
    new_project(client)
    response = client.get("/projects/pets/queries", params=params)
    assert response.status_code == 422
    assert "query." in response.json()["message"]


def test_expired_leases_return_to_the_pool(app_for, local: ObjectStore, folder: Path) -> None:
    client = app_for(local, lease_ttl_s=1)
    new_project(client)
    import_folder(client, "pets", folder)
    everything = client.get("/projects/pets/queries", params={"n": 1000, "labeler": "ann"}).json()
    assert len(everything["samples"]) == 24
    assert client.get("/projects/pets/queries", params={"n": 5, "labeler": "bob"}).json()["samples"] == []
    time.sleep(1.1)
    again = client.get("/projects/pets/queries", params={"n": 5, "labeler": "bob"}).json()
    assert [s["sample_id"] for s in again["samples"]] == [s["sample_id"] for s in everything["samples"][:5]]


def test_released_leases_go_to_the_next_labeler_at_once(app_for, local: ObjectStore, folder: Path) -> None:
    client = app_for(local)
    new_project(client)
    import_folder(client, "pets", folder)
    ann = client.get("/projects/pets/queries", params={"n": 24, "labeler": "ann"}).json()
    ids = [s["sample_id"] for s in ann["samples"]]
    labeled = {"sample_id": ids[0], "label": "cat", "lease_token": ann["lease_token"]}
    assert client.post("/projects/pets/labels", json={"labels": [labeled], "labeler": "ann"}).status_code == 200
    assert client.get("/projects/pets/queries", params={"n": 5, "labeler": "bob"}).json()["samples"] == []

    release = {"lease_token": ann["lease_token"], "labeler": "ann"}
    wrong_token = client.post("/projects/pets/leases/release", json={**release, "lease_token": "nope",
                                                                     "sample_ids": ids})
    assert wrong_token.json() == {"released": 0}
    # The labeled sample and an unknown id are no leases to end; repeats count once.
    handed_back = client.post("/projects/pets/leases/release",
                              json={**release, "sample_ids": ids[:5] + ids[1:3] + ["not-a-sample"]})
    assert handed_back.status_code == 200, handed_back.text
    assert handed_back.json() == {"released": 4}
    assert client.post("/projects/pets/leases/release", json={**release, "sample_ids": ids[:5]}).json() == {
        "released": 0}  # safe to repeat
    assert client.get("/projects/pets").json()["counts"]["leased"] == 19
    assert 'alpipe_samples_released_total{project="pets"} 4.0' in client.get("/metrics").text
    bob = client.get("/projects/pets/queries", params={"n": 5, "labeler": "bob"}).json()
    assert {s["sample_id"] for s in bob["samples"]} == set(ids[1:5])

    for bad in ({"lease_token": "t", "sample_ids": []}, {"sample_ids": ids[:1]},
                {"lease_token": "t", "sample_ids": ids[:1], "extra": 1}):
        response = client.post("/projects/pets/leases/release", json=bad)
        assert response.status_code == 422, bad
    assert client.post("/projects/nope/leases/release", json={**release, "sample_ids": ids[:1]}).status_code == 404


def test_cold_start_order_is_deterministic_for_a_seed(app_for, local: ObjectStore, folder: Path) -> None:
    client = app_for(local)
    orders = {}
    for name, seed in [("one", 3), ("two", 3), ("three", 4)]:
        new_project(client, name=name, seed=seed)
        import_folder(client, name, folder)
        samples = client.get(f"/projects/{name}/queries", params={"n": 100}).json()["samples"]
        orders[name] = [s["sample_id"] for s in samples]
    assert len(orders["one"]) == 24
    assert orders["one"] == orders["two"]
    assert orders["one"] == sorted(orders["one"], key=lambda sid: -cold_start_score(3, sid))
    assert orders["three"] != orders["one"] and set(orders["three"]) == set(orders["one"])


# --- labels ------------------------------------------------------------------------------------------


@pytest.fixture
def train_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Spy on the training trigger (the real one still runs)."""
    from alpipe import pipeline

    calls: list[str] = []
    real = pipeline.maybe_enqueue_train

    def spy(r, project, **kwargs):
        calls.append(project.name)
        return real(r, project, **kwargs)

    monkeypatch.setattr(pipeline, "maybe_enqueue_train", spy)
    return calls


def test_labels_are_durable_before_redis_and_the_answer(client: TestClient, store: ObjectStore, folder: Path,
                                                        redis_client, train_calls: list[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    new_project(client)
    import_folder(client, "pets", folder)
    query = client.get("/projects/pets/queries", params={"n": 3, "labeler": "ann"}).json()
    ids = [s["sample_id"] for s in query["samples"]]

    seen_at_apply: list[tuple[list[str], int]] = []
    real_apply = ProjectState.apply_labels

    def apply_after_log(self, records, **kwargs):
        # The log object must already be there, and training is triggered only after Redis has the labels.
        seen_at_apply.append((label_log(store, "pets"), len(train_calls)))
        return real_apply(self, records, **kwargs)

    monkeypatch.setattr(ProjectState, "apply_labels", apply_after_log)
    labels = [{"sample_id": sid, "label": CLASSES[i], "lease_token": query["lease_token"]}
              for i, sid in enumerate(ids)]
    response = client.post("/projects/pets/labels", json={"labels": labels, "labeler": "ann"})
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 3, "duplicates": 0, "labeled": 3}
    [log_key] = label_log(store, "pets")
    assert seen_at_apply == [([log_key], 0)]
    assert train_calls == ["pets"]
    records = [json.loads(line) for line in store.get_bytes(log_key).decode().splitlines()]
    assert [(r["sample_id"], r["label"], r["labeler"]) for r in records] == [
        (sid, CLASSES[i], "ann") for i, sid in enumerate(ids)]
    state = ProjectState(redis_client, "pets")
    assert state.labels() == {sid: CLASSES[i] for i, sid in enumerate(ids)}
    assert not set(ids) & set(state.pool_ids())
    assert client.get("/projects/pets").json()["counts"] == {"pool": 21, "labeled": 3, "leased": 0, "test": 6}

    # The same labels again (even repeated inside the batch): no-ops, nothing new in the log.
    again = client.post("/projects/pets/labels", json={"labels": labels + labels[:1], "labeler": "ann"})
    assert again.json() == {"accepted": 0, "duplicates": 4, "labeled": 3}
    assert label_log(store, "pets") == [log_key]

    # A different label for a labeled sample is a relabel: accepted, latest wins.
    relabel = client.post("/projects/pets/labels", json={"labels": [{"sample_id": ids[0], "label": "fox"}]})
    assert relabel.json() == {"accepted": 1, "duplicates": 0, "labeled": 3}
    assert len(label_log(store, "pets")) == 2
    assert seen_at_apply[-1] == (label_log(store, "pets"), 1)
    assert state.labels()[ids[0]] == "fox"


def test_a_train_request_outlives_its_lost_job(client: TestClient, store: ObjectStore, folder: Path,
                                              redis_client) -> None:
    """POST /train on a partial batch; the job is lost (its trainer died): the reconciler queues it again."""
    from rq.job import Job

    from alpipe import pipeline

    new_project(client, query_size=10)
    import_folder(client, "pets", folder)
    query = client.get("/projects/pets/queries", params={"n": 3, "labeler": "ann"}).json()
    labels = [{"sample_id": s["sample_id"], "label": "cat", "lease_token": query["lease_token"]}
              for s in query["samples"]]
    assert client.post("/projects/pets/labels", json={"labels": labels, "labeler": "ann"}).status_code == 200
    state = ProjectState(redis_client, "pets")
    assert not state.train_marks().forced_pending

    first = client.post("/projects/pets/train")
    assert first.status_code == 202
    assert first.json() == {"job_id": "train-pets-n3", "labeled": 3, "model_labels": 0}
    assert client.post("/projects/pets/train").json()["job_id"] is None  # coalesced with the queued one
    assert state.train_marks().forced_pending

    Job.fetch("train-pets-n3", connection=redis_client).delete()  # gone with its worker
    settings = client.app.state.settings
    report = pipeline.reconcile(redis_client, store, settings)
    assert report["train"] == {"pets": "train-pets-n3-a2"}

    # A model on those 3 labels answers the request: nothing is due any more.
    state.set_model(1, 3, json.dumps({"model_version": 1, "n_labeled": 3}))
    state.clear_forced_training(3)
    assert not state.train_marks().forced_pending
    assert not pipeline.train_due(state, records.read_project(store, "pets"))


def test_bad_label_batches_write_nothing(client: TestClient, store: ObjectStore, folder: Path,
                                        redis_client) -> None:
    new_project(client)
    import_folder(client, "pets", folder)
    state = ProjectState(redis_client, "pets")
    held = client.get("/projects/pets/queries", params={"n": 2, "labeler": "ann"}).json()
    held_ids = [s["sample_id"] for s in held["samples"]]
    free = client.get("/projects/pets/queries", params={"n": 1, "labeler": "bob"}).json()
    good = {"sample_id": free["samples"][0]["sample_id"], "label": "cat", "lease_token": free["lease_token"]}
    test_id = next(iter(state.test_labels()))

    cases = [
        ([good, {"sample_id": held_ids[0], "label": "cow"}], 422,
         "label 'cow' (sample"),
        ([good, {"sample_id": "f" * 64, "label": "cat"}], 422, f"sample '{'f' * 64}' not found in project 'pets'"),
        ([good, {"sample_id": test_id, "label": "cat"}], 422, "is in the test split"),
        ([good, {"sample_id": held_ids[0], "label": "dog", "lease_token": "not-ann's"}], 409,
         "is leased to labeler 'ann'"),
        ([good, {"sample_id": held_ids[1], "label": "dog"}], 409, "is leased to labeler 'ann'"),
        ([good, {"sample_id": good["sample_id"], "label": "dog", "lease_token": free["lease_token"]}], 422,
         "appears twice in the batch with different labels"),
    ]
    for labels, status, message in cases:
        response = client.post("/projects/pets/labels", json={"labels": labels, "labeler": "bob"})
        assert response.status_code == status, (message, response.text)
        assert message in response.json()["detail"]
    assert "allowed: cat, dog, fox" in client.post(
        "/projects/pets/labels", json={"labels": [{"sample_id": held_ids[0], "label": "cow"}]}).json()["detail"]
    assert label_log(store, "pets") == []
    assert state.labels() == {}

    malformed = client.post("/projects/pets/labels", content=b'{"labels": [', headers={"content-type":
                                                                                          "application/json"})
    assert malformed.status_code == 422
    assert "not valid JSON" in malformed.json()["message"]
    assert malformed.json()["detail"][0]["type"] == "json_invalid"
    missing = client.post("/projects/pets/labels", json={"labels": [{"sample_id": good["sample_id"]}]})
    assert missing.status_code == 422 and "body.labels.0.label: Field required" in missing.json()["message"]
    empty = client.post("/projects/pets/labels", json={"labels": []})
    assert empty.status_code == 422
    assert label_log(store, "pets") == []

    # The lease holder, with its token, may label its samples.
    ok = client.post("/projects/pets/labels", json={"labels": [
        {"sample_id": sid, "label": "dog", "lease_token": held["lease_token"]} for sid in held_ids]})
    assert ok.status_code == 200 and ok.json()["accepted"] == 2


# --- curve, health, metrics, docs ---------------------------------------------------------------------


def test_curve_json_and_png(app_for, local: ObjectStore, redis_client) -> None:
    client = app_for(local)
    new_project(client)
    assert client.get("/projects/pets/curve").json() == []
    empty = client.get("/projects/pets/curve.png")
    assert empty.status_code == 200 and empty.headers["content-type"] == "image/png"
    assert empty.content.startswith(b"\x89PNG\r\n\x1a\n")

    state = ProjectState(redis_client, "pets")
    for version, n, acc in [(1, 10, 0.5), (2, 20, 0.75)]:
        state.set_model(version, n, json.dumps({"model_version": version, "n_labeled": n, "test_accuracy": acc,
                                                "train_s": 1.5, "created_at": 1.0}))
    curve = client.get("/projects/pets/curve").json()
    assert [(p["model_version"], p["n_labeled"], p["test_accuracy"]) for p in curve] == [(1, 10, 0.5), (2, 20, 0.75)]
    png = client.get("/projects/pets/curve.png").content
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png != empty.content
    info = client.get("/projects/pets").json()
    assert info["model"] == {"version": 2, "n_labeled": 20, "test_accuracy": 0.75}
    assert len(info["curve"]) == 2


def test_health_and_metrics(client: TestClient, folder: Path) -> None:
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["redis"] == "ok" and health.json()["store"] == "ok"

    new_project(client)
    import_folder(client, "pets", folder)
    query = client.get("/projects/pets/queries", params={"n": 2}).json()
    client.post("/projects/pets/labels", json={"labels": [
        {"sample_id": s["sample_id"], "label": "cat", "lease_token": query["lease_token"]}
        for s in query["samples"]]})
    text = client.get("/metrics").text
    assert 'alpipe_labels_accepted_total{project="pets"} 2.0' in text
    assert 'alpipe_queries_served_total{project="pets"} 1.0' in text
    assert 'alpipe_project_samples{project="pets",state="pool"} 22.0' in text
    assert 'alpipe_project_samples{project="pets",state="labeled"} 2.0' in text
    assert 'alpipe_queue_depth{queue="train"}' in text and 'alpipe_queue_depth{queue="score"}' in text
    assert 'alpipe_http_request_duration_seconds_count{method="GET",route="/projects/{name}/queries",' \
           'status="200"} 1.0' in text


def test_health_is_503_when_redis_is_down(app_for, local: ObjectStore) -> None:
    client = app_for(local, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    health = client.get("/health")
    assert health.status_code == 503
    body = health.json()
    assert body["status"] == "unavailable" and body["store"] == "ok"
    assert body["redis"].startswith("unreachable")
    projects = client.get("/projects")
    assert projects.status_code == 503 and "Redis is unavailable" in projects.json()["detail"]


def test_internal_errors_carry_no_traceback(settings_for, local: ObjectStore,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from alpipe import projects

    def broken(**kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(projects, "list_projects", broken)
    with TestClient(create_app(settings_for(local)), raise_server_exceptions=False) as client:
        response = client.get("/projects")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error; see the API log"}


def test_openapi_docs(app_for, local: ObjectStore) -> None:
    client = app_for(local)
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in ["/projects", "/projects/{name}", "/projects/{name}/samples", "/projects/{name}/samples/import",
                 "/projects/{name}/queries", "/projects/{name}/labels", "/projects/{name}/curve",
                 "/projects/{name}/curve.png", "/projects/{name}/samples/{sample_id}/image", "/health", "/metrics"]:
        assert path in paths, path
    assert "multipart/form-data" in paths["/projects/{name}/samples"]["post"]["requestBody"]["content"]


def test_reconciler_runs_in_the_background_and_stops(settings_for, local: ObjectStore,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from alpipe import pipeline

    calls: list[tuple] = []

    def fake_reconcile(r, store, settings):
        calls.append((r, store, settings))
        if len(calls) == 1:
            raise RuntimeError("a failing pass must not stop the loop")

    monkeypatch.setattr(pipeline, "reconcile", fake_reconcile)
    with TestClient(create_app(settings_for(local, reconcile_interval_s=0.02))) as client:
        deadline = time.monotonic() + 5
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(calls) >= 3
        r, store, settings = calls[-1]
        assert r is client.app.state.clients.redis and settings.reconcile_interval_s == 0.02
        assert store.describe() == local.describe()
        reconciler = client.app.state.reconciler
    assert not reconciler._thread.is_alive()

