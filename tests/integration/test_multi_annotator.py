"""Several labelers per sample: votes, label policies, disagreements, undo, recovery; the model's guesses."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from alpipe import keys, pipeline
from alpipe.projects import cold_start_score
from alpipe.recovery import recover_all
from alpipe.state import ProjectState
from alpipe.storage import ObjectStore
from services.api.main import create_app
from tests.integration.test_api import CLASSES, label_log, make_image_folder, make_settings

# Labeler names in the order they vote, alphabetical too: equal vote times (same millisecond)
# are ordered by name, so the tests do not depend on the clock's resolution.
ANN, BOB, CY = "ann", "bob", "cy"


@pytest.fixture
def client(tmp_path: Path, redis_url: str, local_store: ObjectStore):
    with TestClient(create_app(make_settings(tmp_path, redis_url, local_store))) as c:
        yield c


def make_project(client: TestClient, tmp_path: Path, name: str, **extra) -> list[str]:
    """A project over 3 classes x 4 images; its pool ids in cold-start order."""
    assert client.post("/projects", json={"name": name, "classes": CLASSES, **extra}).status_code == 201
    folder = tmp_path / "folder"
    if not folder.exists():
        make_image_folder(folder, CLASSES, 4)
    assert client.post(f"/projects/{name}/samples/import", json={"dataset": str(folder)}).status_code == 200
    r = client.app.state.clients.redis
    return [m.decode() for m in r.zrevrange(ProjectState(r, name).ranking_key(0), 0, -1)]


def vote(client: TestClient, project: str, labeler: str, sample_id: str, label: str, **extra) -> dict:
    response = client.post(f"/projects/{project}/labels",
                           json={"labeler": labeler, "labels": [{"sample_id": sample_id, "label": label, **extra}]})
    assert response.status_code == 200, response.text
    time.sleep(0.002)  # the next vote is later by the log's millisecond clock
    return response.json()


def undo(client: TestClient, project: str, labeler: str, sample_id: str):
    return client.delete(f"/projects/{project}/labels/{sample_id}", params={"labeler": labeler})


def snapshot(r, name: str) -> dict:
    """The labeling state recovery must rebuild (leases are deliberately not durable)."""
    state = ProjectState(r, name)
    return {"votes": state.all_votes(), "labels": state.labels(), "pool": state.pool_ids(),
            "labelers": state.labeler_counts(), "disagreements": state.disagreements(), "counts": {
                k: v for k, v in state.counts().items() if k != "leased"}}


def test_disagreeing_labelers_keep_their_votes(client: TestClient, tmp_path: Path) -> None:
    ids = make_project(client, tmp_path, "pets")
    r = client.app.state.clients.redis
    state = ProjectState(r, "pets")
    x, y = ids[0], ids[1]
    query = client.get("/projects/pets/queries", params={"n": 2, "labeler": ANN}).json()
    assert [s["sample_id"] for s in query["samples"]] == [x, y]
    assert vote(client, "pets", ANN, x, "cat", lease_token=query["lease_token"])["labeled"] == 1
    assert vote(client, "pets", ANN, y, "dog", lease_token=query["lease_token"])["labeled"] == 2
    # Another labeler on a labeled sample: a second vote, not a relabel.
    assert vote(client, "pets", BOB, x, "dog") == {"accepted": 1, "duplicates": 0, "labeled": 2}
    assert vote(client, "pets", BOB, y, "dog") == {"accepted": 1, "duplicates": 0, "labeled": 2}
    [votes_x] = state.votes([x])
    assert {who: v["label"] for who, v in votes_x.items()} == {ANN: "cat", BOB: "dog"}
    assert state.labels() == {x: "dog", y: "dog"}  # latest wins

    info = client.get("/projects/pets").json()
    assert info["label_policy"] == "latest" and info["project"]["label_policy"] == "latest"
    assert info["labelers"] == {ANN: 2, BOB: 2}
    assert info["disagreements"] == {"count": 1, "samples": [{"sample_id": x, "votes": {ANN: "cat", BOB: "dog"}}]}
    assert info["counts"]["labeled"] == 2

    # Re-sending your own label is a no-op; changing it replaces your vote (and ends the disagreement).
    assert vote(client, "pets", ANN, x, "cat") == {"accepted": 0, "duplicates": 1, "labeled": 2}
    assert len(label_log(client.app.state.clients.store(), "pets")) == 4
    assert vote(client, "pets", ANN, x, "dog")["accepted"] == 1
    info = client.get("/projects/pets").json()
    assert info["disagreements"] == {"count": 0, "samples": []}
    assert info["labelers"] == {ANN: 2, BOB: 2}
    assert state.labels() == {x: "dog", y: "dog"}


@pytest.mark.parametrize(("policy", "expected"), [("latest", ["dog", "dog", "cat"]),
                                                  ("majority", ["cat", "dog", "cat"])])
def test_label_policy_picks_the_training_label(client: TestClient, tmp_path: Path, redis_client,
                                               policy: str, expected: list[str]) -> None:
    ids = make_project(client, tmp_path, policy, label_policy=policy)
    state = ProjectState(redis_client, policy)
    a, b, c = ids[:3]
    # a: cat, cat, dog -> majority cat, latest dog.
    for who, label in [(ANN, "cat"), (BOB, "cat"), (CY, "dog")]:
        vote(client, policy, who, a, label)
    # b: cat, dog -> a tie: the most recent of the tied, dog, under both policies.
    for who, label in [(ANN, "cat"), (BOB, "dog")]:
        vote(client, policy, who, b, label)
    # c: dog, fox, cat, cat -> cat under both.
    for who, label in [(ANN, "dog"), (BOB, "fox"), (CY, "cat"), ("dan", "cat")]:
        vote(client, policy, who, c, label)
    assert [state.labels()[sid] for sid in (a, b, c)] == expected
    info = client.get(f"/projects/{policy}").json()
    assert info["label_policy"] == policy
    assert info["disagreements"]["count"] == 3
    # The most recently voted on first.
    assert [d["sample_id"] for d in info["disagreements"]["samples"]] == [c, b, a]
    assert info["disagreements"]["samples"][0]["votes"] == {ANN: "dog", BOB: "fox", CY: "cat", "dan": "cat"}
    assert info["labelers"] == {ANN: 3, BOB: 3, CY: 2, "dan": 1}

    # Undo can flip it back: without cy's vote, a is cat under both policies.
    assert undo(client, policy, CY, a).json()["training_label"] == "cat"
    assert state.labels()[a] == "cat"


def test_bad_label_policy_is_refused(client: TestClient) -> None:
    response = client.post("/projects", json={"name": "pets", "classes": CLASSES, "label_policy": "loudest"})
    assert response.status_code == 422 and "label_policy" in response.json()["message"]


def test_undo_returns_the_sample_to_you(client: TestClient, tmp_path: Path) -> None:
    ids = make_project(client, tmp_path, "pets", seed=3)
    r = client.app.state.clients.redis
    state = ProjectState(r, "pets")
    store = client.app.state.clients.store()
    query = client.get("/projects/pets/queries", params={"n": 2, "labeler": ANN}).json()
    x, y = (s["sample_id"] for s in query["samples"])
    assert [x, y] == ids[:2]
    vote(client, "pets", ANN, x, "cat", lease_token=query["lease_token"])
    vote(client, "pets", ANN, y, "fox", lease_token=query["lease_token"])
    assert x not in state.pool_ids()

    response = undo(client, "pets", ANN, x)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["sample_id"] == x and body["labeled"] == 1 and body["training_label"] is None
    assert body["lease_token"]
    # Back in the pool and in the cold-start ranking, leased to the undoer: nobody else gets it meanwhile.
    assert x in state.pool_ids() and x not in state.labels() and state.votes([x]) == [{}]
    assert r.zscore(state.ranking_key(0), x) == pytest.approx(cold_start_score(3, x))
    assert state.lease_holder(x) == (body["lease_token"], ANN)
    others = client.get("/projects/pets/queries", params={"n": 100, "labeler": BOB}).json()["samples"]
    assert x not in {s["sample_id"] for s in others}
    info = client.get("/projects/pets").json()
    assert info["counts"]["labeled"] == 1 and info["labelers"] == {ANN: 1}
    # Durable first: the log has the retraction.
    last = [json.loads(line) for line in store.get_bytes(label_log(store, "pets")[-1]).decode().splitlines()]
    assert [(rec["sample_id"], rec["label"], rec["labeler"], rec["retract"]) for rec in last] == [
        (x, "cat", ANN, True)]
    # The new lease lets the undoer label it again.
    assert vote(client, "pets", ANN, x, "dog", lease_token=body["lease_token"])["labeled"] == 2
    assert state.labels()[x] == "dog"

    # With other votes left the sample stays labeled, by them; nothing is leased.
    vote(client, "pets", BOB, y, "dog")
    kept = undo(client, "pets", BOB, y).json()
    assert kept == {"sample_id": y, "labeled": 2, "training_label": "fox", "lease_token": None}
    assert y not in state.pool_ids() and state.lease_holder(y) is None


def test_undo_of_a_label_you_do_not_have_is_404(client: TestClient, tmp_path: Path) -> None:
    ids = make_project(client, tmp_path, "pets")
    store = client.app.state.clients.store()
    vote(client, "pets", ANN, ids[0], "cat")
    n_log = len(label_log(store, "pets"))
    for labeler, sid, message in [
        (BOB, ids[0], f"labeler 'bob' has no label on sample '{ids[0]}' in project 'pets'; there is nothing to undo"),
        (ANN, ids[1], f"labeler 'ann' has no label on sample '{ids[1]}' in project 'pets'"),
        (ANN, "f" * 64, f"sample '{'f' * 64}' not found in project 'pets'"),
    ]:
        response = undo(client, "pets", labeler, sid)
        assert response.status_code == 404
        assert response.json()["detail"].startswith(message)
    assert undo(client, "nope", ANN, ids[0]).status_code == 404
    assert undo(client, "pets", ANN, ids[0]).status_code == 200
    assert undo(client, "pets", ANN, ids[0]).status_code == 404  # undone already
    assert len(label_log(store, "pets")) == n_log + 1
    # With auth off an unnamed caller is 'anonymous', as for labels.
    vote_anon = client.post("/projects/pets/labels", json={"labels": [{"sample_id": ids[2], "label": "fox"}]})
    assert vote_anon.status_code == 200
    assert client.delete(f"/projects/pets/labels/{ids[2]}").status_code == 200


@pytest.mark.parametrize("policy", ["latest", "majority"])
def test_recovery_rebuilds_votes_labels_and_undo(client: TestClient, tmp_path: Path, redis_client,
                                                 local_store: ObjectStore, policy: str) -> None:
    ids = make_project(client, tmp_path, "pets", label_policy=policy)
    a, b, c, d = ids[:4]
    for who, sid, label in [(ANN, a, "cat"), (BOB, a, "dog"), (CY, a, "cat"), (ANN, b, "fox"), (BOB, b, "cat"),
                            (ANN, c, "dog"), (ANN, d, "cat"), (BOB, d, "cat"), (BOB, a, "fox")]:
        vote(client, "pets", who, sid, label)
    assert undo(client, "pets", ANN, c).status_code == 200  # c: back in the pool
    assert undo(client, "pets", BOB, b).status_code == 200  # b: ann's vote alone
    assert undo(client, "pets", ANN, d).status_code == 200  # d: bob's vote alone
    vote(client, "pets", CY, b, "dog")
    before = snapshot(redis_client, "pets")
    assert c in before["pool"] and c not in before["labels"]
    assert before["labels"][a] == ("fox" if policy == "latest" else "cat")
    assert before["labels"][b] == "dog" and before["labels"][d] == "cat"
    assert before["labelers"] == {ANN: 2, BOB: 2, CY: 2}
    assert before["disagreements"][0] == 2

    redis_client.flushall()
    report = recover_all(redis_client, local_store, settings=client.app.state.settings)
    assert report["projects"]["pets"]["status"] == "recovered"
    assert snapshot(redis_client, "pets") == before
    # And over live state, recovery changes nothing.
    recover_all(redis_client, local_store, settings=client.app.state.settings)
    assert snapshot(redis_client, "pets") == before


def test_guesses_come_with_queries_once_a_model_scored_the_pool(redis_url, redis_client, local_store: ObjectStore,
                                                                tmp_path: Path) -> None:
    from services.scorer import jobs as scorer_jobs
    from tests.integration import test_workers as tw

    settings = tw.make_settings(redis_url, tw.store_settings(local_store), reconcile_interval_s=0)
    setup = tw.make_project(local_store, redis_client)
    name, state = setup.project.name, setup.state
    with TestClient(create_app(settings)) as client:
        cold = client.get(f"/projects/{name}/queries", params={"n": 3, "labeler": "early"}).json()
        assert cold["samples"] and all(s["guess"] is None for s in cold["samples"])

        tw.give_labels(local_store, setup, 20, batch="b1")
        assert tw.in_process_trainer_round(local_store, redis_client, settings, name)["version"] == 1
        scorer_jobs.configure(settings, redis_client=redis_client, store=local_store)
        tw.run_burst(redis_client, keys.QUEUE_SCORE)
        assert state.live_version() == 1

        served = client.get(f"/projects/{name}/queries", params={"n": 10, "labeler": "ann"}).json()
        assert served["model_version"] == 1 and len(served["samples"]) == 10
        for sample in served["samples"]:
            assert sample["score"] is not None
            assert sample["guess"]["label"] in tw.CLASSES
            assert 0.0 <= sample["guess"]["confidence"] <= 1.0
        stored = state.guesses(1, [s["sample_id"] for s in served["samples"]])
        assert [(tw.CLASSES[g[0]], pytest.approx(g[1], abs=1e-6)) for g in stored] == [
            (s["guess"]["label"], s["guess"]["confidence"]) for s in served["samples"]]
        # Every scored sample has its guess, and the guess is the most likely class: at least 1/3.
        scored = [m.decode() for m in redis_client.zrange(state.ranking_key(1), 0, -1)]
        assert all(g is not None and g[1] >= 1 / 3 - 1e-6 for g in state.guesses(1, scored))

    # Guesses go with their ranking when a newer one is live.
    state.begin_ranking(2, 0)
    assert state.shard_done(2, 0, 0)
    pipeline.finish_ranking(redis_client, name, 2)
    assert not redis_client.exists(state.guess_key(1)) and not redis_client.exists(state.ranking_key(1))
