"""What the API does to serve many labelers at once: label posts share label-log writes (group commit),
a lease answer comes from one read, several worker processes serve one port, /health coalesces probes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from alpipe import projects
from alpipe.schemas import Project
from alpipe.state import ProjectState
from alpipe.storage import LocalStore, ObjectStore
from services.api import health
from services.api.health import HealthProbe
from tests.helpers import free_port, http_answers, stop_process, wait_until
from tests.integration.test_api import CLASSES, import_folder, label_log, make_image_folder, new_project
from tests.integration.test_workers import env_for


def log_records(store: ObjectStore, project: str) -> list[dict]:
    return [json.loads(line) for key in label_log(store, project)
            for line in store.get_bytes(key).decode().splitlines()]


def test_concurrent_label_posts_share_label_log_writes(app_for, store: ObjectStore, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    client = app_for(store)
    new_project(client, query_size=1000)
    import_folder(client, "pets", make_image_folder(tmp_path / "folder", CLASSES, 12))
    pool = ProjectState(client.app.state.clients.redis, "pets").pool_ids()
    # A slow label-log write, so that posts pile up behind one in flight.
    backend = type(client.app.state.clients.store())
    real_put = backend.put_if_absent

    def slow_put(self, key: str, data: bytes) -> bool:
        if "/labels/" in key:
            time.sleep(0.05)
        return real_put(self, key, data)

    monkeypatch.setattr(backend, "put_if_absent", slow_put)
    posters, per_poster = 8, 3
    durable_at_answer: list[bool] = []
    failures: list[str] = []

    def poster(i: int) -> None:
        for k in range(per_poster):
            sid = pool[i * per_poster + k]
            response = client.post("/projects/pets/labels", json={"labels": [{"sample_id": sid, "label": "dog"}],
                                                                   "labeler": f"p{i}"})
            if response.status_code != 200 or response.json()["accepted"] != 1:
                failures.append(response.text)
            # Acknowledged means durable: the label is in the label log when the answer arrives.
            durable_at_answer.append(any(r["sample_id"] == sid for r in log_records(store, "pets")))

    threads = [threading.Thread(target=poster, args=(i,)) for i in range(posters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
    assert durable_at_answer == [True] * (posters * per_poster)
    labeled = pool[:posters * per_poster]
    records = log_records(store, "pets")
    assert sorted(r["sample_id"] for r in records) == sorted(labeled)
    assert len(label_log(store, "pets")) < posters * per_poster  # some posts shared a write
    # Each request keeps its own batch id inside a shared object.
    assert len({r["batch"] for r in records}) == posters * per_poster
    state = ProjectState(client.app.state.clients.redis, "pets")
    assert state.labels() == {sid: "dog" for sid in labeled}
    assert state.applied() == len(label_log(store, "pets")) + 1  # + the imported sample batch


class SwitchingRedis(redis.Redis):
    """A client after each of whose commands the live ranking switches to the other version, as if a scorer
    made one live at exactly that moment: an answer built from two reads mixes the two rankings."""

    switch_key = ""

    def execute_command(self, *args, **options):
        out = super().execute_command(*args, **options)
        if self.switch_key:
            live = super().execute_command("GET", self.switch_key)
            super().execute_command("SET", self.switch_key, 1 if live == b"2" else 2)
        return out


def test_the_lease_answer_comes_from_one_read_even_while_the_ranking_switches(redis_url: str) -> None:
    r = SwitchingRedis.from_url(redis_url)
    project = Project(name="switch", classes=["a", "b"], created_at=time.time())
    state = ProjectState(r, "switch")
    state.register(project.model_dump_json())
    ids = [f"{i:064x}" for i in range(8)]
    state.add_samples([(sid, "pool", None) for sid in ids])
    # v1 ranks the ids in order and guesses class a; v2 ranks them backwards and guesses class b.
    state.add_scores(1, {sid: 10.0 - i for i, sid in enumerate(ids)}, {sid: (0, 0.6) for sid in ids})
    state.add_scores(2, {sid: float(i) for i, sid in enumerate(ids)}, {sid: (1, 0.7) for sid in ids})
    r.set(state.key("ranking_live"), 1)
    top = {1: ids, 2: ids[::-1]}
    r.switch_key = state.key("ranking_live")
    for attempt in range(4):
        answer = projects.lease_queries(project, n=2, labeler=f"l{attempt}", ttl_s=60, r=r)
        version = answer.model_version
        leased = [s.sample_id for s in answer.samples]
        expected = [sid for sid in top[version] if sid not in taken_before(r, state, leased)][:2]
        assert leased == expected, f"answer says v{version} but leased another ranking's top"
        assert {s.guess.label for s in answer.samples} == {"a" if version == 1 else "b"}
    r.switch_key = ""


def taken_before(r, state: ProjectState, now_leased: list[str]) -> set[str]:
    """Samples leased by earlier attempts (all leased ones but those of this answer)."""
    return {m.decode() for m in r.zrange(state.key("leases"), 0, -1)} - set(now_leased)


# --- several worker processes ------------------------------------------------------------------------


@pytest.fixture
def api_server(settings_for, local: ObjectStore, tmp_path: Path):
    """`alpipe api --workers 2` on a free port: (its process, url)."""
    settings = settings_for(local, reconcile_interval_s=0.2)
    env = {**os.environ, **env_for(settings), "PYTHONUNBUFFERED": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    port = free_port()
    log = tmp_path / "api.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "alpipe.cli", "api", "--host", "127.0.0.1", "--port",
                                 str(port), "--workers", "2"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_answers(f"{url}/health"), timeout=90, what="alpipe api --workers 2", proc=proc,
                   log=log)
        yield proc, url
    finally:
        stop_process(proc)


def metric(text: str, name: str, labels: str = "") -> float:
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_worker_processes_share_one_port_and_report_one_set_of_metrics(api_server, tmp_path: Path) -> None:
    proc, url = api_server
    workers = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    assert len(workers) == 2
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.post("/projects", json={"name": "pets", "classes": CLASSES, "query_size": 1000}).status_code == 201
        folder = make_image_folder(tmp_path / "folder", CLASSES, 8)
        assert http.post("/projects/pets/samples/import", json={"dataset": str(folder)}).status_code == 200
        query = http.get("/projects/pets/queries", params={"n": 20, "labeler": "ann"}).json()
        ids, token = [s["sample_id"] for s in query["samples"]], query["lease_token"]

    def post(sid: str) -> int:
        # A new connection per post, so the kernel spreads them over both worker processes.
        with httpx.Client(base_url=url, timeout=30) as one:
            return one.post("/projects/pets/labels", json={"labels": [{"sample_id": sid, "label": "cat",
                                                                       "lease_token": token}],
                                                           "labeler": "ann"}).status_code

    results: list[int] = []
    threads = [threading.Thread(target=lambda s=sid: results.append(post(s))) for sid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * len(ids)
    # Whichever process answers the scrape, it reports every process's counts.
    for _ in range(4):
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, "alpipe_labels_accepted_total", '{project="pets"}') == len(ids)
        assert metric(text, "alpipe_project_samples", '{project="pets",state="labeled"}') == len(ids)
    # One of the two processes reconciles.
    wait_until(lambda: metric(httpx.get(f"{url}/metrics").text, "alpipe_reconciler_passes_total") > 3,
               timeout=30, what="reconciler passes")
    assert metric(httpx.get(f"{url}/metrics").text, "alpipe_reconciler_leading") == 1.0


@pytest.mark.parametrize("command", [["api", "--workers", "0"], ["up", "--api-workers", "0"]])
def test_workers_below_one_is_refused(settings_for, local: ObjectStore, command: list[str]) -> None:
    env = {**os.environ, **env_for(settings_for(local))}
    done = subprocess.run([sys.executable, "-m", "alpipe.cli", *command], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"{command[1]} must be at least 1" in done.stderr


# --- /health ----------------------------------------------------------------------------------------


def test_health_probes_in_flight_answer_every_request_that_arrives_meanwhile(monkeypatch: pytest.MonkeyPatch,
                                                                             tmp_path: Path) -> None:
    calls: list[float] = []

    def counting_probe(clients) -> dict:
        calls.append(time.monotonic())
        time.sleep(0.1)
        return {"status": "ok", "redis": "ok", "store": "ok"}

    monkeypatch.setattr(health, "probe", counting_probe)
    probe = HealthProbe(lambda: None)

    async def burst() -> list[dict]:
        return await asyncio.gather(*(probe.check() for _ in range(50)))

    answers = run_in_fresh_loop(burst())
    assert len(calls) == 1 and all(a["status"] == "ok" for a in answers)
    run_in_fresh_loop(probe.check())  # the next request after it finished starts a new probe
    assert len(calls) == 2


def run_in_fresh_loop(coroutine):
    """asyncio.run in a thread of its own: this test process may have an event loop running already (the
    browser tests' Playwright leaves one)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result(timeout=60)


def test_health_says_which_part_is_down(redis_url: str, tmp_path: Path) -> None:
    class Down:
        redis = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)

        @staticmethod
        def store():
            return LocalStore(tmp_path / "store")

    out = health.probe(Down())
    assert out["status"] == "unavailable" and out["redis"].startswith("unreachable") and out["store"] == "ok"


def test_workers_run_at_lower_cpu_priority(workers, settings_for, local: ObjectStore) -> None:
    proc = workers(settings_for(local)).start("scorer", "nice-scorer")
    wait_until(lambda: psutil.Process(proc.pid).nice() == 10, timeout=60, what="the scorer lowering its priority",
               proc=proc)

