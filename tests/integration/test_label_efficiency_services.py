"""The label-efficiency strategies through the services: TypiClust cold start on a real scorer, bald
shards, disjoint leases under stochastic acquisition, and the refusals for bald without dropout."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alpipe import cold_start, keys, pipeline
from alpipe.projects import cold_start_score
from alpipe.state import ProjectState
from alpipe.storage import ObjectStore
from alpipe.strategies.representative import PICK_FLOOR, picks_per_shard
from services.scorer import jobs as scorer_jobs
from tests.integration.test_api import import_folder, new_project
from tests.integration.test_export import names_to_ids
from tests.integration.test_workers import (
    _image,
    give_labels,
    in_process_trainer_round,
    make_project,
    make_settings,
    run_burst,
    store_settings,
    wait_for,
)

SHAPES = ["left", "right", "bottom"]


def shapes_folder(root: Path, per_class: int) -> Path:
    """An ImageFolder of the three shape classes (28-px grayscale), well apart in pixel space."""
    rng = np.random.default_rng(11)
    for c, name in enumerate(SHAPES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"{i:03d}.png").write_bytes(_image(c, rng))
    return root


def class_of(folder_names: dict[str, str], sample_id: str) -> str:
    return folder_names[sample_id].split("/")[0]


def test_first_query_is_typiclust_on_a_real_scorer(app_for, local: ObjectStore, tmp_path: Path, workers,
                                                   redis_url, redis_client) -> None:
    """A new project's first images come from TypiClust's order once a scorer has made it; a project on
    the random baseline keeps the seeded random order."""
    folder = shapes_folder(tmp_path / "shapes", per_class=40)
    client = app_for(local)
    created = new_project(client, name="typical", classes=SHAPES, model="small_cnn", pretrained=False, query_size=6)
    assert created["project"]["strategy"] == "auto"  # the default
    new_project(client, name="baseline", classes=SHAPES, model="small_cnn", pretrained=False, strategy="random")
    for name in ("typical", "baseline"):
        import_folder(client, name, folder)
    assert client.get("/projects/typical").json()["cold_start"] == "pending"
    assert client.get("/projects/baseline").json()["cold_start"] == "random"

    settings = make_settings(redis_url, store_settings(local))
    w = workers(settings)
    w.start("scorer", "scorer-1")
    wait_for(lambda: client.get("/projects/typical").json()["cold_start"] == "typiclust", timeout=90,
             what="the cold-start order", logs=w.all_logs)

    state = ProjectState(redis_client, "typical")
    seeded = sorted(state.pool_ids(), key=lambda sid: -cold_start_score(0, sid))
    first = [s["sample_id"] for s in client.get("/projects/typical/queries", params={"n": 6}).json()["samples"]]
    assert first != seeded[:6]
    # The first stage: one typical image from each of 6 clusters, so all three shapes are covered.
    names = {sid: name for name, sid in names_to_ids(local, "typical").items()}
    assert {class_of(names, sid) for sid in first} == set(SHAPES)
    top = [m.decode() for m, score in redis_client.zrevrange(state.ranking_key(0), 0, 5, withscores=True)
           if score > 1.0]
    assert top == first  # TypiClust's picks sit above the random order's [0, 1)
    baseline = ProjectState(redis_client, "baseline")
    got = [s["sample_id"] for s in client.get("/projects/baseline/queries", params={"n": 6}).json()["samples"]]
    assert got == sorted(baseline.pool_ids(), key=lambda sid: -cold_start_score(0, sid))[:6]


def test_cold_start_keeps_labels_and_leases_where_they_are(redis_url, redis_client, local: ObjectStore) -> None:
    r = redis_client
    settings = make_settings(redis_url, store_settings(local))
    setup = make_project(local, r, name="coldstart", strategy="auto")
    state = setup.state
    state.set_cold_start_ranking({sid: cold_start_score(0, sid) for sid in state.pool_ids()})
    labeled = give_labels(local, setup, 5, batch="b1")
    leased = [sid for sid, _ in state.lease(3, token="t", labeler="ann", ttl_s=60)]
    job = cold_start.maybe_enqueue(r, setup.project, settings=settings)
    assert job == f"coldstart-coldstart-n{120}"
    assert cold_start.maybe_enqueue(r, setup.project, settings=settings) is None  # queued once
    scorer_jobs.configure(settings, redis_client=r, store=local)
    run_burst(r, keys.QUEUE_SCORE)
    assert cold_start.status(r, setup.project) == "typiclust"
    ranked = dict((m.decode(), s) for m, s in r.zrange(state.ranking_key(0), 0, -1, withscores=True))
    assert not set(labeled) & set(ranked)  # labeled samples stay out of the ranking
    picks = [sid for sid, s in ranked.items() if s > 1.0]
    assert picks and not set(picks) & (set(leased) | set(labeled))
    assert all(ranked[sid] < 1.0 for sid in leased)  # leased ones keep their place
    assert cold_start.maybe_enqueue(r, setup.project, settings=settings) is None  # up to date
    assert pipeline.reconcile(r, local, settings)["cold_start"] == {}
    # Once a model's ranking is live, no cold-start order is made any more, even a missing one.
    r.delete(state.key("cold_start", "ordered"))
    r.set(state.key("ranking_live"), 1)
    assert cold_start.maybe_enqueue(r, setup.project, settings=settings) is None


def test_diverse_auto_and_bald_rankings_lease_disjointly(redis_url, redis_client, local: ObjectStore) -> None:
    """Two labelers on a ranking scored by stochastic acquisition (power_margin), by auto (representative picks
    lifted per shard) and by bald: disjoint leases that together are the top of the ranking."""
    r = redis_client
    settings = make_settings(redis_url, store_settings(local))
    scorer_jobs.configure(settings, redis_client=r, store=local)
    for strategy in ("power_margin", "auto", "bald"):
        setup = make_project(local, r, name=f"p-{strategy}", strategy=strategy)
        give_labels(local, setup, 20, batch="b1")
        in_process_trainer_round(local, r, settings, setup.project.name)
        run_burst(r, keys.QUEUE_SCORE)
        assert setup.state.live_version() == 1
        ranking = [m.decode() for m in r.zrevrange(setup.state.ranking_key(1), 0, -1)]
        assert len(ranking) == 100
        first = [sid for sid, _ in setup.state.lease(20, token="a", labeler="ann", ttl_s=60)]
        second = [sid for sid, _ in setup.state.lease(20, token="b", labeler="bob", ttl_s=60)]
        assert not set(first) & set(second)
        assert first + second == ranking[:40]
        guesses = setup.state.guesses(1, first)
        assert all(g is not None and 0 <= g[0] < 3 for g in guesses)
        if strategy == "auto":
            # Each of the 3 shards (40, 40 and 20 images) lifted its share of the query of 10 above every margin.
            scores = [s for _, s in r.zrevrange(setup.state.ranking_key(1), 0, -1, withscores=True)]
            lifted = 3 * picks_per_shard(setup.project.query_size, 3)
            assert min(scores[:lifted]) >= PICK_FLOOR > max(scores[lifted:])


def test_a_failed_cold_start_job_is_reported_and_not_requeued(redis_url, redis_client, local: ObjectStore,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    r = redis_client
    settings = make_settings(redis_url, store_settings(local))
    setup = make_project(local, r, name="poison", strategy="auto")
    setup.state.set_cold_start_ranking({sid: cold_start_score(0, sid) for sid in setup.state.pool_ids()})
    assert cold_start.maybe_enqueue(r, setup.project, settings=settings) == "coldstart-poison-n120"
    assert cold_start.status(r, setup.project) == "pending"

    def broken(*args, **kwargs):
        raise RuntimeError("the features could not be computed")

    monkeypatch.setattr(scorer_jobs.scoring, "order_cold_start", broken)
    scorer_jobs.configure(settings, redis_client=r, store=local)
    run_burst(r, keys.QUEUE_SCORE)
    assert cold_start.status(r, setup.project) == "failed"
    assert cold_start.maybe_enqueue(r, setup.project, settings=settings) is None  # not every reconciler pass
    # The random order is still served.
    served = [sid for sid, _ in setup.state.lease(3, token="t", labeler="ann", ttl_s=60)]
    assert served == sorted(setup.state.pool_ids(), key=lambda sid: -cold_start_score(0, sid))[:3]


@pytest.mark.parametrize("body, message", [
    ({"strategy": "bald", "model": "resnet18", "pretrained": False}, "no dropout"),
    ({"strategy": "bald", "model": "efficientnet_lite0"}, "embedding mode"),
    ({"strategy": "bald", "model": "small_cnn", "mc_samples": 1}, "mc_samples"),
    ({"strategy": "auto", "cold_start": "kmeans"}, "cold_start"),
])
def test_bad_strategy_settings_are_422(app_for, local: ObjectStore, body: dict, message: str) -> None:
    client = app_for(local)
    response = client.post("/projects", json={"name": "bad", "classes": SHAPES, **body})
    assert response.status_code == 422 and message in response.text, response.text
    assert client.get("/projects/bad").status_code == 404


def test_bald_on_auto_resolved_to_embedding_mode_is_refused_at_import(app_for, local: ObjectStore,
                                                                      tmp_path: Path) -> None:
    """auto decides the model from the first images; colour photos mean embedding mode, whose head has
    no dropout: the import is refused and writes nothing."""
    root = tmp_path / "colour"
    for c, name in enumerate(SHAPES):
        (root / name).mkdir(parents=True)
        for i in range(3):
            buf = io.BytesIO()
            Image.new("RGB", (96, 96), (80 * c, 40 * i, 200)).save(buf, format="PNG")
            (root / name / f"{i}.png").write_bytes(buf.getvalue())
    client = app_for(local)
    new_project(client, name="photos", classes=SHAPES, strategy="bald")
    response = client.post("/projects/photos/samples/import", json={"dataset": str(root)})
    assert response.status_code == 422 and "no dropout" in response.text, response.text
    assert list(local.list(keys.samples_prefix("photos"))) == []
    assert client.get("/projects/photos").json()["counts"]["pool"] == 0
