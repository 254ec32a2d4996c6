"""Label Studio's ML-backend protocol, replayed: the request shapes Label Studio 1.23 sends to /setup,
/predict, /webhook and /train (label_studio/ml/api_connector.py, webhooks/models.py), and every bad input.

No Label Studio here (tests/e2e/test_label_studio.py runs a real one): task images are data: URIs,
which alpipe reads without calling Label Studio. A real redis-server and the local store.
"""

from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from alpipe.labelstudio.backend import prediction_scores
from alpipe.labelstudio.label_config import parse_label_config
from alpipe.projects import Invalid
from alpipe.recovery import load_or_recover
from alpipe.state import ProjectState
from alpipe.storage import ObjectStore

CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image" choice="single">'
          '<Choice value="cat"/><Choice value="dog"/></Choices></View>')
ADMIN = "t-admin"


def data_uri(seed: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def setup_body(ls_project: int = 7, config: str = CONFIG, **extra) -> dict:
    return {"project": f"{ls_project}.1764629412", "schema": config, "hostname": "http://127.0.0.1:1",
            "access_token": "legacy-token", "extra_params": extra or None}


def task(task_id: int, ls_project: int = 7, image: str | None = None) -> dict:
    return {"id": task_id, "data": {"image": image or data_uri(task_id)}, "meta": {}, "project": ls_project,
            "annotations": [], "predictions": []}


def annotation_event(action: str, annotation_id: int, task_id: int, choice: str | None, *, user: int = 1,
                     cancelled: bool = False, ls_project: int = 7) -> dict:
    result = ([{"id": "a1", "from_name": "label", "to_name": "image", "type": "choices", "origin": "manual",
                "value": {"choices": [choice]}}] if choice is not None else [])
    return {"action": action,
            "annotation": {"id": annotation_id, "result": result, "task": task_id, "completed_by": user,
                           "was_cancelled": cancelled, "ground_truth": False, "project": ls_project,
                           "lead_time": 2.5, "created_at": "2026-12-01T22:00:00Z"},
            "task": task(task_id, ls_project),
            "project": {"id": ls_project, "title": "pets", "label_config": CONFIG}}


@pytest.fixture
def client(app_for, local: ObjectStore) -> TestClient:
    return app_for(local)


def counts(client: TestClient, name: str = "label-studio-7") -> dict:
    return client.get(f"/projects/{name}").json()["counts"]


def votes(client: TestClient, name: str = "label-studio-7") -> dict:
    return client.get(f"/projects/{name}").json()["labelers"]


# --- label configs ----------------------------------------------------------------------------------


def test_label_config_gives_the_image_field_and_the_classes() -> None:
    config = parse_label_config('<View><Header value="Pick one"/><Image name="img" value="$photo" zoom="true"/>'
                                '<Choices name="cls" toName="img"><Choice value="a"/><Choice value="b" '
                                'alias="bee"/></Choices></View>')
    assert (config.data_key, config.image_name, config.choices_name) == ("photo", "img", "cls")
    assert config.classes == ["a", "bee"]  # an alias is what annotations store
    assert config.result("a") == [{"from_name": "cls", "to_name": "img", "type": "choices",
                                   "value": {"choices": ["a"]}}]
    assert config.label_of(config.result("bee")) == "bee"
    assert config.label_of([]) is None


@pytest.mark.parametrize("xml, says", [
    ("not xml", "not valid XML"),
    ("<View/>", "0 <Image>"),
    ('<View><Image name="a" value="$a"/><Image name="b" value="$b"/></View>', "2 <Image>"),
    ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"><Label value="x"/>'
     '</RectangleLabels></View>', "<RectangleLabels name='r'>"),
    ('<View><Image name="i" value="$i"/><Choices name="c" toName="i" choice="multiple"><Choice value="a"/>'
     '<Choice value="b"/></Choices></View>', "several classes"),
    ('<View><Image name="i" value="$i"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>',
     "at least two"),
    ('<View><Image name="i" value="$i"/><Choices name="c" toName="i"><Choice value="a"/><Choice value="a"/>'
     '</Choices></View>', "repeat"),
    ('<View><Image name="i" value="i"/><Choices name="c" toName="i"><Choice value="a"/><Choice value="b"/>'
     '</Choices></View>', 'value="$<data field>"'),
    ('<View><Image name="i" value="$i"/><Choices name="c" toName="other"><Choice value="a"/><Choice value="b"/>'
     '</Choices></View>', "toName='i'"),
])
def test_label_configs_that_are_not_single_image_classification_are_refused(xml: str, says: str) -> None:
    with pytest.raises(Invalid, match=None) as refused:
        parse_label_config(xml)
    assert says in str(refused.value)


def test_a_choice_outside_the_classes_is_refused() -> None:
    config = parse_label_config(CONFIG)
    with pytest.raises(Invalid, match="'bird' is not a class"):
        config.label_of(config.result("bird"))


# --- health and setup -------------------------------------------------------------------------------


def test_health_answers_up(client: TestClient) -> None:
    answer = client.get("/labelstudio/health")
    assert answer.status_code == 200 and answer.json()["status"] == "UP"


def test_setup_creates_the_project_from_the_label_config_once(client: TestClient) -> None:
    first = client.post("/labelstudio/setup", json=setup_body())
    assert first.status_code == 200, first.text
    assert first.json() == {"model_version": "alpipe-v0"}
    project = client.get("/projects/label-studio-7").json()
    assert project["project"]["classes"] == ["cat", "dog"]
    again = client.post("/labelstudio/setup", json=setup_body())
    assert again.status_code == 200 and again.json() == first.json()
    assert [p["name"] for p in client.get("/projects").json()] == ["label-studio-7"]


def test_setup_takes_the_project_name_and_fields_from_extra_params(client: TestClient) -> None:
    answer = client.post("/labelstudio/setup", json=setup_body(alpipe_project="pets", query_size=5,
                                                              strategy="margin"))
    assert answer.status_code == 200, answer.text
    config = client.get("/projects/pets").json()["project"]
    assert (config["query_size"], config["strategy"]) == (5, "margin")


def test_setup_can_move_a_connection_to_another_alpipe_project(client: TestClient, local: ObjectStore) -> None:
    from alpipe.labelstudio.links import read_link

    client.post("/labelstudio/setup", json=setup_body())
    moved = client.post("/labelstudio/setup", json=setup_body(alpipe_project="pets-2"))
    assert moved.status_code == 200, moved.text
    assert read_link(local, "label-studio-7") is None and read_link(local, "pets-2").ls_project == 7
    client.post("/labelstudio/webhook", json=annotation_event("ANNOTATION_CREATED", 81, 1, "cat"))
    assert counts(client, "pets-2")["labeled"] == 1 and counts(client)["labeled"] == 0


@pytest.mark.parametrize("body, status, says", [
    (setup_body(config="<View><Image name='i' value='$i'/></View>"), 422, "<Choices>"),
    (setup_body(query_size=0), 422, "query_size"),
    (setup_body(colour="red"), 422, "colour"),
    (setup_body(strategy="psychic"), 422, "psychic"),
    ({**setup_body(), "project": "seven"}, 422, "string_pattern_mismatch"),
    ({**setup_body(), "hostname": ""}, 422, "LABEL_STUDIO_HOST"),
    ({**setup_body(), "extra_params": "{not json"}, 422, "JSON"),
])
def test_bad_setups_are_refused_and_write_nothing(client: TestClient, body: dict, status: int, says: str) -> None:
    answer = client.post("/labelstudio/setup", json=body)
    assert answer.status_code == status, answer.text
    assert says in str(answer.json()["detail"])
    assert client.get("/projects").json() == []


def test_setup_refuses_a_project_with_other_classes(client: TestClient) -> None:
    assert client.post("/projects", json={"name": "label-studio-7", "classes": ["cat", "cow"]}).status_code == 201
    answer = client.post("/labelstudio/setup", json=setup_body())
    assert answer.status_code == 409 and "classes" in answer.json()["detail"]
    connected = client.post("/labelstudio/setup", json=setup_body(ls_project=8))
    assert connected.status_code == 200
    other = setup_body(ls_project=8, config=CONFIG.replace('"dog"', '"cow"'))
    changed = client.post("/labelstudio/setup", json=other)
    assert changed.status_code == 409 and "no longer" in changed.json()["detail"]


# --- predict ----------------------------------------------------------------------------------------


def predict_body(tasks: list[dict], ls_project: int = 7) -> dict:
    return {"tasks": tasks, "project": f"{ls_project}.1764629412", "label_config": CONFIG,
            "params": {"login": None, "password": None, "context": None}}


def test_predict_ingests_new_tasks_and_answers_one_result_per_task(client: TestClient) -> None:
    client.post("/labelstudio/setup", json=setup_body())
    tasks = [task(i) for i in range(1, 6)]
    answer = client.post("/labelstudio/predict", json=predict_body(tasks))
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == 5
    assert all(r["model_version"] == "alpipe-v0" and r["result"] == [] and 0 <= r["score"] <= 1 for r in results)
    assert counts(client)["pool"] == 5
    # The cold-start order: lowest score first is alpipe's order, one place each.
    assert len({r["score"] for r in results}) == 5
    again = client.post("/labelstudio/predict", json=predict_body(tasks[::-1])).json()["results"]
    assert [r["score"] for r in again] == [r["score"] for r in results][::-1]
    assert counts(client)["pool"] == 5


def test_predict_leaves_many_new_tasks_to_the_sync_job(client: TestClient, redis_client, monkeypatch) -> None:
    """"Retrieve predictions" over a big new project must not fetch every image inside one request."""
    from alpipe.labelstudio import backend
    from alpipe.work import job_states

    monkeypatch.setattr(backend, "INLINE_INGEST", 2)
    client.post("/labelstudio/setup", json=setup_body())
    redis_client.delete("rq:job:labelstudio-sync-label-studio-7")  # the one /setup queued has not run
    answer = client.post("/labelstudio/predict", json=predict_body([task(i) for i in range(1, 4)]))
    assert answer.status_code == 200, answer.text
    assert [(r["result"], r["score"]) for r in answer.json()["results"]] == [([], 1.0)] * 3
    assert counts(client)["pool"] == 0
    assert job_states(redis_client, ["labelstudio-sync-label-studio-7"])[0][0] == "queued"
    few = client.post("/labelstudio/predict", json=predict_body([task(1), task(2)]))
    assert len(few.json()["results"]) == 2 and counts(client)["pool"] == 2


@pytest.mark.parametrize("tasks, status, says", [
    ([task(1), {"id": 2, "data": {"text": "no image"}}], 422, "task 2 has no image in data.image"),
    ([task(1), task(2, image="data:image/png;base64," + base64.b64encode(b"plain text").decode())], 415,
     "task 2"),
    ([task(1), {"id": "x", "data": {}}], 422, "int_parsing"),
])
def test_predict_refuses_unusable_tasks_and_adds_nothing(client: TestClient, tasks: list, status: int,
                                                         says: str) -> None:
    client.post("/labelstudio/setup", json=setup_body())
    answer = client.post("/labelstudio/predict", json=predict_body(tasks))
    assert answer.status_code == status, answer.text
    assert says in str(answer.json()["detail"])
    assert counts(client)["pool"] == 0


def test_predict_for_an_unconnected_project_is_404(client: TestClient) -> None:
    answer = client.post("/labelstudio/predict", json=predict_body([task(1)], ls_project=99))
    assert answer.status_code == 404 and "not connected" in answer.json()["detail"]


def test_prediction_scores_follow_the_live_ranking(client: TestClient, redis_client, local: ObjectStore,
                                                  settings_for) -> None:
    """Label Studio serves the lowest score first: that must be alpipe's top-ranked image."""
    client.post("/labelstudio/setup", json=setup_body(strategy="margin"))
    tasks = [task(i) for i in range(1, 5)]
    client.post("/labelstudio/predict", json=predict_body(tasks))
    project = load_or_recover(redis_client, local, "label-studio-7", settings=settings_for(local))
    state = ProjectState(redis_client, project.name)
    samples = state.pool_ids()
    margins = dict(zip(samples, [0.9, 0.2, 0.6, 0.4], strict=True))  # margin's score: 1 - (p1 - p2)
    state.begin_ranking(1, 1)
    state.add_scores(1, margins, guesses={sid: (i % 2, 0.7) for i, sid in enumerate(samples)})
    assert state.shard_done(1, 0, 1)
    scores = prediction_scores(state, project, 1, samples)
    assert scores == pytest.approx([0.1, 0.8, 0.4, 0.6])  # the margin between the two best classes
    answer = client.post("/labelstudio/predict", json=predict_body(tasks)).json()
    assert {r["model_version"] for r in answer["results"]} == {"alpipe-v1"}
    by_order = sorted(answer["results"], key=lambda r: r["score"])
    top = max(samples, key=margins.get)
    assert by_order[0]["score"] == pytest.approx(1 - margins[top])
    assert all(r["result"][0]["value"]["choices"][0] in ("cat", "dog") for r in answer["results"])
    # A strategy without confidences (random) gets the place in the ranking instead.
    random_project = project.model_copy(update={"strategy": "random"})
    places = prediction_scores(state, random_project, 1, samples)
    assert sorted(places) == [0.0, 0.25, 0.5, 0.75] and places[samples.index(top)] == 0.0


# --- webhook ----------------------------------------------------------------------------------------


def test_annotations_become_votes_of_the_label_studio_user(client: TestClient) -> None:
    client.post("/labelstudio/setup", json=setup_body())
    created = client.post("/labelstudio/webhook", json=annotation_event("ANNOTATION_CREATED", 11, 1, "cat"))
    assert created.status_code == 200, created.text
    assert created.json()["status"] == "labeled"
    assert counts(client)["labeled"] == 1 and votes(client) == {"labelstudio:1": 1}
    # Another user on the same image: a second vote, still one labeled image.
    client.post("/labelstudio/webhook", json=annotation_event("ANNOTATION_CREATED", 12, 1, "dog", user=2))
    assert counts(client)["labeled"] == 1 and votes(client) == {"labelstudio:1": 1, "labelstudio:2": 1}
    updated = client.post("/labelstudio/webhook", json=annotation_event("ANNOTATION_UPDATED", 11, 1, "dog"))
    assert updated.json()["accepted"] == 1
    disagreements = client.get("/projects/label-studio-7").json()["disagreements"]
    assert disagreements["count"] == 0  # both now say dog
    deleted = client.post("/labelstudio/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": 7},
                                                         "annotations": [{"id": 11}, {"id": 12}, {"id": 999}]})
    assert deleted.json() == {"status": "deleted", "withdrawn": 2, "unknown": 1}
    assert counts(client)["labeled"] == 0 and counts(client)["pool"] == 1


def test_bulk_created_annotations_are_votes(client: TestClient) -> None:
    """ANNOTATIONS_CREATED (Label Studio's bulk action) sends lists under the keys `annotation` and `task`."""
    client.post("/labelstudio/setup", json=setup_body())
    one = annotation_event("ANNOTATION_CREATED", 71, 1, "cat")
    two = annotation_event("ANNOTATION_CREATED", 72, 2, "dog")
    bulk = {"action": "ANNOTATIONS_CREATED", "project": one["project"], "annotation": [one["annotation"],
            two["annotation"]], "task": [one["task"], two["task"]]}
    answer = client.post("/labelstudio/webhook", json=bulk)
    assert answer.status_code == 200 and answer.json() == {"status": "applied", "labeled": 2}
    assert counts(client)["labeled"] == 2


def test_a_skipped_annotation_is_not_a_label(client: TestClient) -> None:
    client.post("/labelstudio/setup", json=setup_body())
    skipped = client.post("/labelstudio/webhook", json=annotation_event("ANNOTATION_CREATED", 21, 2, None,
                                                                         cancelled=True))
    assert skipped.status_code == 200 and skipped.json()["status"] == "skipped"
    assert counts(client)["labeled"] == 0 and counts(client)["pool"] == 1
    client.post("/labelstudio/webhook", json=annotation_event("ANNOTATION_CREATED", 22, 2, "cat"))
    assert counts(client)["labeled"] == 1
    # Updated to skipped: the vote is withdrawn.
    client.post("/labelstudio/webhook", json=annotation_event("ANNOTATION_UPDATED", 22, 2, "cat", cancelled=True))
    assert counts(client)["labeled"] == 0


def test_a_label_studio_vote_is_taken_on_an_image_leased_in_alpipe(client: TestClient) -> None:
    client.post("/labelstudio/setup", json=setup_body())
    client.post("/labelstudio/predict", json=predict_body([task(1)]))
    leased = client.get("/projects/label-studio-7/queries", params={"n": 1, "labeler": "ada"}).json()
    assert len(leased["samples"]) == 1
    answer = client.post("/labelstudio/webhook", json=annotation_event("ANNOTATION_CREATED", 31, 1, "cat"))
    assert answer.status_code == 200 and counts(client)["labeled"] == 1


@pytest.mark.parametrize("event, status, says", [
    (annotation_event("ANNOTATION_CREATED", 41, 1, "bird"), 422, "'bird' is not a class"),
    (annotation_event("ANNOTATION_CREATED", 41, 1, "cat", ls_project=99), 404, "not connected"),
    ({**annotation_event("ANNOTATION_CREATED", 41, 1, "cat"), "annotation": None}, 422, "needs the annotation"),
    ({**annotation_event("ANNOTATION_CREATED", 41, 1, "cat"), "project": None}, 422, "needs project"),
    ({"action": "ANNOTATIONS_DELETED", "project": {"id": 7}, "annotations": []}, 422, "annotations"),
    ({**annotation_event("ANNOTATION_CREATED", 41, 1, "cat"), "task": {"id": 1, "data": {}}}, 422, "no image"),
])
def test_bad_webhooks_are_refused_and_write_nothing(client: TestClient, event: dict, status: int,
                                                    says: str) -> None:
    client.post("/labelstudio/setup", json=setup_body())
    answer = client.post("/labelstudio/webhook", json=event)
    assert answer.status_code == status, answer.text
    assert says in str(answer.json()["detail"])
    assert counts(client) == {"pool": 0, "labeled": 0, "leased": 0, "test": 0}


def test_other_actions_are_ignored_and_start_training_trains(client: TestClient) -> None:
    client.post("/labelstudio/setup", json=setup_body(model="small_cnn"))
    ignored = client.post("/labelstudio/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 7}})
    assert ignored.status_code == 200 and ignored.json()["status"] == "ignored"
    client.post("/labelstudio/webhook", json=annotation_event("ANNOTATION_CREATED", 51, 1, "cat"))
    training = client.post("/labelstudio/webhook", json={"action": "START_TRAINING",
                                                          "project": {"id": 7, "title": "pets"}})
    assert training.status_code == 200 and training.json()["status"] == "queued"
    assert training.json()["job_id"].startswith("train-label-studio-7")
    legacy = client.post("/labelstudio/train", json={"annotations": [], "project": "7.1764629412",
                                                     "label_config": CONFIG, "params": {}})
    assert legacy.status_code == 200 and legacy.json()["status"] == "not queued"  # one is queued already


# --- authentication ---------------------------------------------------------------------------------


def test_with_authentication_label_studio_uses_basic_auth_and_the_webhook_secret(app_for, local: ObjectStore,
                                                                                 redis_client) -> None:
    client = app_for(local, admin_token=ADMIN)
    basic = {"Authorization": "Basic " + base64.b64encode(f"alpipe:{ADMIN}".encode()).decode()}
    assert client.get("/labelstudio/health").status_code == 200
    assert client.post("/labelstudio/setup", json=setup_body()).status_code == 401
    assert client.post("/labelstudio/setup", json=setup_body(), headers=basic).status_code == 200
    event = annotation_event("ANNOTATION_CREATED", 61, 1, "cat")
    refused = client.post("/labelstudio/webhook", json=event)
    assert refused.status_code == 401 and "secret" in refused.json()["detail"]
    assert client.post("/labelstudio/webhook", json=event, headers={"Authorization": "Bearer nope"}).status_code == 401
    from alpipe.labelstudio.links import read_link

    secret = read_link(local, "label-studio-7").webhook_secret
    accepted = client.post("/labelstudio/webhook", json=event, headers={"Authorization": f"Bearer {secret}"})
    assert accepted.status_code == 200, accepted.text
    # Events alpipe ignores need no secret (Label Studio sends every action to the model's webhook).
    assert client.post("/labelstudio/webhook", json={"action": "PROJECT_UPDATED"}).status_code == 200


# --- durability -------------------------------------------------------------------------------------


def test_the_connection_outlives_a_redis_wipe(client: TestClient, redis_client) -> None:
    """Link, task map and annotation map are objects first: after FLUSHALL (and the project's rebuild)
    a webhook still finds its project, its task's sample, and what a deleted annotation had voted."""
    client.post("/labelstudio/setup", json=setup_body())
    client.post("/labelstudio/predict", json=predict_body([task(1), task(2)]))
    client.post("/labelstudio/webhook", json=annotation_event("ANNOTATION_CREATED", 91, 1, "cat"))
    redis_client.flushall()
    assert counts(client) == {"pool": 1, "labeled": 1, "leased": 0, "test": 0}  # rebuilt from the objects
    again = client.post("/labelstudio/predict", json=predict_body([task(1), task(2)]))
    assert again.status_code == 200 and counts(client)["pool"] == 1  # no image ingested twice
    deleted = client.post("/labelstudio/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": 7},
                                                         "annotations": [{"id": 91}]})
    assert deleted.json() == {"status": "deleted", "withdrawn": 1, "unknown": 0}
    assert counts(client)["labeled"] == 0
