"""Access control of the labeling API: bearer tokens, admin-only routes, per-project grants, who labels."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from alpipe import keys
from alpipe.config import Settings
from alpipe.errors import UserError
from alpipe.state import ProjectState
from alpipe.storage import ObjectStore
from services.api.main import create_app
from tests.integration.test_api import CLASSES, label_log, make_image_folder, make_settings, png_bytes

ADMIN = "t-admin"
ADA = "t-ada"  # labeler of project pets only
BOB = "t-bob"  # labeler of every project
UNAUTHORIZED = {"detail": "missing or unknown token; send Authorization: Bearer <token>"}
GRANTS = {"ada": {"token": ADA, "projects": ["pets"]}, "bob": {"token": BOB, "projects": ["*"]}}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def client(tmp_path: Path, redis_url: str, local_store: ObjectStore):
    settings = make_settings(tmp_path, redis_url, local_store, admin_token=ADMIN, labelers=GRANTS)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def projects(client: TestClient, tmp_path: Path) -> dict[str, list[str]]:
    """Projects pets and secret, each with 3 x 4 imported images; their pool sample ids."""
    folder = make_image_folder(tmp_path / "folder", CLASSES, 4)
    pools = {}
    for name in ("pets", "secret"):
        created = client.post("/projects", json={"name": name, "classes": CLASSES}, headers=auth(ADMIN))
        assert created.status_code == 201, created.text
        imported = client.post(f"/projects/{name}/samples/import", json={"dataset": str(folder)},
                               headers=auth(ADMIN))
        assert imported.status_code == 200, imported.text
        pools[name] = ProjectState(client.app.state.clients.redis, name).pool_ids()
    return pools


def test_no_token_or_an_unknown_one_is_401(client: TestClient, projects: dict) -> None:
    for headers in ({}, auth("t-wrong"), auth(""), {"Authorization": f"Basic {ADMIN}"}, {"Authorization": ADMIN}):
        for method, path in [("GET", "/projects"), ("GET", "/projects/pets"), ("GET", "/me"),
                             ("GET", "/projects/pets/queries"), ("POST", "/projects/pets/train"),
                             ("DELETE", f"/projects/pets/labels/{'a' * 64}"), ("POST", "/projects/pets/leases/release"),
                             ("GET", "/projects/nope/curve")]:
            response = client.request(method, path, headers=headers)
            assert response.status_code == 401, (headers, path, response.text)
            assert response.json() == UNAUTHORIZED
            assert response.headers["www-authenticate"] == "Bearer"
    # 401 comes before the body is looked at: nothing is written.
    response = client.post("/projects", json={"name": "sneaky", "classes": CLASSES})
    assert response.status_code == 401
    assert not client.app.state.clients.store().exists(keys.project_key("sneaky"))
    # Only the image and the curve plot take the token as a query parameter.
    assert client.get("/projects", params={"token": ADMIN}).status_code == 401


def test_public_routes_need_no_token(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/docs").status_code == 200
    assert client.get("/redoc").status_code == 200
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    assert "HTTPBearer" in spec.json()["components"]["securitySchemes"]


def test_admin_only_routes_refuse_labelers(client: TestClient, projects: dict) -> None:
    cases = [
        ("POST", "/projects", {"json": {"name": "mine", "classes": CLASSES}}, "POST /projects"),
        ("POST", "/projects/pets/samples", {"files": {"file": ("a.png", png_bytes(99_999), "image/png")}},
         "POST /projects/{name}/samples"),
        ("POST", "/projects/pets/samples/import", {"json": {"dataset": "digits"}},
         "POST /projects/{name}/samples/import"),
        ("POST", "/projects/pets/train", {}, "POST /projects/{name}/train"),
    ]
    for token in (ADA, BOB):
        for method, path, kwargs, action in cases:
            response = client.request(method, path, headers=auth(token), **kwargs)
            assert response.status_code == 403, (path, response.text)
            who = "ada" if token == ADA else "bob"
            assert response.json()["detail"] == (f"{action} is for the admin only; labeler '{who}' may list, "
                                                 "query and label its projects")
    store = client.app.state.clients.store()
    assert not store.exists(keys.project_key("mine"))
    assert len(list(store.list(keys.samples_prefix("pets")))) == 1  # the fixture's import only
    # The admin may.
    upload = client.post("/projects/pets/samples", files={"file": ("a.png", png_bytes(99_999), "image/png")},
                         headers=auth(ADMIN))
    assert upload.status_code == 201
    assert client.post("/projects/pets/train", headers=auth(ADMIN)).status_code == 202


def test_labelers_see_and_use_only_their_projects(client: TestClient, projects: dict) -> None:
    listed = {token: [p["name"] for p in client.get("/projects", headers=auth(token)).json()]
              for token in (ADMIN, ADA, BOB)}
    assert listed == {ADMIN: ["pets", "secret"], ADA: ["pets"], BOB: ["pets", "secret"]}

    secret_id = projects["secret"][0]
    for method, path, kwargs in [
        ("GET", "/projects/secret", {}),
        ("GET", "/projects/secret/queries", {}),
        ("GET", "/projects/secret/curve", {}),
        ("GET", "/projects/secret/curve.png", {}),
        ("GET", f"/projects/secret/samples/{secret_id}/image", {}),
        ("POST", "/projects/secret/labels", {"json": {"labels": [{"sample_id": secret_id, "label": "cat"}]}}),
        ("DELETE", f"/projects/secret/labels/{secret_id}", {}),
        ("POST", "/projects/secret/leases/release", {"json": {"lease_token": "x", "sample_ids": [secret_id]}}),
        ("GET", "/projects/nope", {}),  # not granted: no telling whether it exists
    ]:
        response = client.request(method, path, headers=auth(ADA), **kwargs)
        assert response.status_code == 403, (path, response.text)
        project = path.split("/")[2]
        assert response.json() == {"detail": f"labeler 'ada' has no access to project '{project}'"}
    assert label_log(client.app.state.clients.store(), "secret") == []

    assert client.get("/projects/pets", headers=auth(ADA)).status_code == 200
    assert client.get("/projects/secret", headers=auth(BOB)).status_code == 200
    assert client.get("/projects/nope", headers=auth(BOB)).status_code == 404


def test_labels_are_recorded_as_the_token_holder(client: TestClient, projects: dict) -> None:
    r = client.app.state.clients.redis
    state = ProjectState(r, "pets")
    store = client.app.state.clients.store()
    query = client.get("/projects/pets/queries", params={"n": 3}, headers=auth(ADA)).json()
    ids = [s["sample_id"] for s in query["samples"]]
    assert state.lease_holder(ids[0]) == (query["lease_token"], "ada")
    # Naming yourself is fine; naming someone else is not.
    assert client.get("/projects/pets/queries", params={"n": 1, "labeler": "ada"},
                      headers=auth(ADA)).status_code == 200
    refused = client.get("/projects/pets/queries", params={"n": 1, "labeler": "bob"}, headers=auth(ADA))
    assert refused.status_code == 403
    assert refused.json()["detail"].startswith("you are 'ada' and cannot label as 'bob'")

    labels = [{"sample_id": sid, "label": "cat", "lease_token": query["lease_token"]} for sid in ids]
    as_bob = client.post("/projects/pets/labels", json={"labels": labels, "labeler": "bob"}, headers=auth(ADA))
    assert as_bob.status_code == 403 and "cannot label as 'bob'" in as_bob.json()["detail"]
    assert label_log(store, "pets") == []
    ok = client.post("/projects/pets/labels", json={"labels": labels[:2]}, headers=auth(ADA))
    assert ok.json() == {"accepted": 2, "duplicates": 0, "labeled": 2}
    named = client.post("/projects/pets/labels", json={"labels": labels[2:], "labeler": "ada"}, headers=auth(ADA))
    assert named.json()["accepted"] == 1
    admin = client.post("/projects/pets/labels", json={"labels": [{"sample_id": ids[0], "label": "dog"}]},
                        headers=auth(ADMIN))
    assert admin.json()["accepted"] == 1
    records = [json.loads(line) for key in label_log(store, "pets")
               for line in store.get_bytes(key).decode().splitlines()]
    assert sorted((rec["labeler"], rec["sample_id"]) for rec in records) == sorted(
        [("ada", sid) for sid in ids] + [("admin", ids[0])])
    assert state.votes([ids[0]]) == [{"ada": {"label": "cat", "at": pytest.approx(records[0]["at"])},
                                      "admin": {"label": "dog", "at": pytest.approx(records[-1]["at"])}}]
    assert client.get("/projects/pets", headers=auth(ADA)).json()["labelers"] == {"ada": 3, "admin": 1}

    # Undo: your own label only.
    assert client.delete(f"/projects/pets/labels/{ids[1]}", params={"labeler": "bob"},
                         headers=auth(ADA)).status_code == 403
    assert client.delete(f"/projects/pets/labels/{ids[1]}", headers=auth(BOB)).status_code == 404
    undone = client.delete(f"/projects/pets/labels/{ids[1]}", headers=auth(ADA))
    assert undone.status_code == 200, undone.text
    assert state.lease_holder(ids[1]) == (undone.json()["lease_token"], "ada")


def test_only_the_holder_releases_its_leases(client: TestClient, projects: dict) -> None:
    state = ProjectState(client.app.state.clients.redis, "pets")
    query = client.get("/projects/pets/queries", params={"n": 2}, headers=auth(ADA)).json()
    body = {"lease_token": query["lease_token"], "sample_ids": [s["sample_id"] for s in query["samples"]]}
    # Bob has ada's lease token (it leaked): still not his leases.
    assert client.post("/projects/pets/leases/release", json=body, headers=auth(BOB)).json() == {"released": 0}
    as_ada = client.post("/projects/pets/leases/release", json={**body, "labeler": "ada"}, headers=auth(BOB))
    assert as_ada.status_code == 403 and "cannot label as 'ada'" in as_ada.json()["detail"]
    assert all(state.lease_holder(sid) == (query["lease_token"], "ada") for sid in body["sample_ids"])
    assert client.post("/projects/pets/leases/release", json=body, headers=auth(ADA)).json() == {"released": 2}
    assert all(state.lease_holder(sid) is None for sid in body["sample_ids"])


def test_image_and_curve_take_the_token_as_a_query_parameter(client: TestClient, projects: dict) -> None:
    sid = projects["pets"][0]
    path = f"/projects/pets/samples/{sid}/image"
    assert client.get(path).status_code == 401
    assert client.get(path, params={"token": "t-wrong"}).status_code == 401
    for token in (ADA, ADMIN):
        image = client.get(path, params={"token": token})
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert client.get(f"/projects/secret/samples/{projects['secret'][0]}/image",
                      params={"token": ADA}).status_code == 403
    assert client.get("/projects/pets/curve.png").status_code == 401
    plot = client.get("/projects/pets/curve.png", params={"token": ADA})
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")
    assert client.get("/projects/pets/curve", params={"token": ADA}).status_code == 401


def test_me(client: TestClient, tmp_path: Path, redis_url: str, local_store: ObjectStore) -> None:
    assert client.get("/me", headers=auth(ADMIN)).json() == {"name": "admin", "is_admin": True, "projects": ["*"],
                                                            "auth": True}
    assert client.get("/me", headers=auth(ADA)).json() == {"name": "ada", "is_admin": False, "projects": ["pets"],
                                                          "auth": True}
    assert client.get("/me", headers=auth(BOB)).json()["projects"] == ["*"]
    with TestClient(create_app(make_settings(tmp_path, redis_url, local_store))) as open_client:
        assert open_client.get("/me").json() == {"name": "anonymous", "is_admin": True, "projects": ["*"],
                                                 "auth": False}


def test_admin_token_alone_turns_auth_on(tmp_path: Path, redis_url: str, local_store: ObjectStore) -> None:
    with TestClient(create_app(make_settings(tmp_path, redis_url, local_store, admin_token=ADMIN))) as c:
        assert c.get("/projects").status_code == 401
        assert c.get("/projects", headers=auth(ADMIN)).json() == []
        assert c.get("/projects", headers=auth(ADA)).status_code == 401


def test_auth_off_is_logged_at_start(tmp_path: Path, redis_url: str, local_store: ObjectStore,
                                     caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="alpipe.api"):
        with TestClient(create_app(make_settings(tmp_path, redis_url, local_store))):
            pass
    assert any("authentication is off" in rec.getMessage() for rec in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alpipe.api"):
        with TestClient(create_app(make_settings(tmp_path, redis_url, local_store, admin_token=ADMIN))):
            pass
    assert not any("authentication is off" in rec.getMessage() for rec in caplog.records)


def test_labelers_come_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALPIPE_ADMIN_TOKEN", "t-env-admin")
    monkeypatch.setenv("ALPIPE_LABELERS", '{"ada": {"token": "t-ada", "projects": ["digits"]}, '
                                          '"bob": {"token": "t-bob"}}')
    settings = Settings(_env_file=None)
    assert settings.admin_token == "t-env-admin"
    assert {name: (g.token, g.projects) for name, g in settings.labelers.items()} == {
        "ada": ("t-ada", ["digits"]), "bob": ("t-bob", ["*"])}


@pytest.mark.parametrize(("fields", "message"), [
    ({"admin_token": ADMIN, "labelers": {"ada": {"token": ADMIN}}}, "same token as 'admin'"),
    ({"labelers": {"ada": {"token": "x"}, "bob": {"token": "x"}}}, "same token as 'ada'"),
    ({"labelers": {"admin": {"token": "x"}}}, "give the labeler another name"),
    ({"labelers": {"ada": {"token": "x", "projects": []}}}, "has no projects"),
])
def test_ambiguous_access_config_is_refused(tmp_path: Path, redis_url: str, local_store: ObjectStore,
                                            fields: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        create_app(make_settings(tmp_path, redis_url, local_store, **fields))
