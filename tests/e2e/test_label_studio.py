"""Label Studio drives alpipe: a real Label Studio 1.23.2 (its own virtualenv, sqlite in a temp dir, on
127.0.0.1) with alpipe's stack (API with authentication, trainer, scorer: real processes) as its model.

Everything goes through Label Studio's REST API as its UI would: create a project, import image files,
connect alpipe as the model, annotate in the order Label Studio serves tasks, delete an annotation.
alpipe must ingest the images, train, push predictions with scores and its model version, and Label
Studio's next task must be alpipe's top-ranked image.

`make test` installs Label Studio (`make labelstudio`); without it the test is skipped, except in CI.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from sklearn.datasets import load_digits

from alpipe.config import Settings
from alpipe.labelstudio import links
from alpipe.stack import LocalStack
from alpipe.state import ProjectState
from alpipe.storage import LocalStore
from tests.helpers import free_port, http_answers, wait_until

REPO = Path(__file__).resolve().parents[2]
LABEL_STUDIO = Path(os.environ.get("ALPIPE_TEST_LABEL_STUDIO", REPO / ".venv-labelstudio" / "bin" / "label-studio"))
USER, PASSWORD = "admin@example.com", "alpipe-test-123"
ADMIN = "t-admin-ls"
CONFIG = ('<View><Image name="image" value="$image"/><Choices name="digit" toName="image">'
          '<Choice value="zero"/><Choice value="one"/></Choices></View>')


@dataclass
class LabelStudio:
    url: str
    pat: str  # a personal access token (JWT refresh token)
    log: Path

    def api(self) -> httpx.Client:
        access = httpx.post(f"{self.url}/api/token/refresh/", json={"refresh": self.pat}).json()["access"]
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {access}"}, timeout=60)


def _personal_access_token(url: str) -> str:
    """Log in as a person would (CSRF form) and create a personal access token."""
    with httpx.Client(base_url=url, follow_redirects=True, timeout=60) as web:
        page = web.get("/user/login/")
        form_token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        csrf = form_token.group(1) if form_token else web.cookies["csrftoken"]
        web.post("/user/login/", data={"email": USER, "password": PASSWORD, "csrfmiddlewaretoken": csrf},
                 headers={"Referer": f"{url}/user/login/"})
        assert "sessionid" in web.cookies, "logging in to Label Studio failed"
        created = web.post("/api/token/", json={}, headers={"X-CSRFToken": web.cookies["csrftoken"],
                                                            "Referer": url})
        assert created.status_code in (200, 201), created.text
        return created.json()["token"]


@contextmanager
def running_label_studio(data: Path) -> Iterator[LabelStudio]:
    """Label Studio on a free loopback port with sqlite under `data`, and a personal access token."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = data / "label-studio.log"
    # Label Studio refuses model and webhook URLs on loopback unless both of these are off.
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data), "LABEL_STUDIO_HOST": url, "DJANGO_DB": "sqlite",
           "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false"}
    with log.open("wb") as out:
        proc = subprocess.Popen([str(LABEL_STUDIO), "start", "--no-browser", "--internal-host", "127.0.0.1",
                                 "--port", str(port), "--username", USER, "--password", PASSWORD],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=data)
    try:
        wait_until(lambda: http_answers(f"{url}/health"), timeout=300, what="Label Studio", proc=proc, log=log)
        yield LabelStudio(url=url, pat=_personal_access_token(url), log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    if not LABEL_STUDIO.exists():
        if os.environ.get("CI"):
            pytest.fail(f"Label Studio is not installed at {LABEL_STUDIO}: `make labelstudio` installs it")
        pytest.skip(f"Label Studio is not installed at {LABEL_STUDIO} (`make labelstudio`)")
    with running_label_studio(tmp_path_factory.mktemp("label-studio")) as running:
        yield running


def connect_project(ls: httpx.Client, api_url: str, images: list[tuple[str, bytes, str]], *,
                    extra_params: dict) -> tuple[int, int]:
    """A Label Studio project of these image files, in uncertainty sampling, with alpipe (admin token ADMIN)
    connected as its model, as a person does it in the UI: (project id, model id)."""
    project = ls.post("/api/projects/", json={"title": "digits", "label_config": CONFIG,
                                              "sampling": "Uncertainty sampling"})
    assert project.status_code == 201, project.text
    pid = project.json()["id"]
    # One form field per file: parts that share a name make one task.
    files = [(f"file{i}", (name, data, "image/png")) for i, (name, data, _) in enumerate(images)]
    imported = ls.post(f"/api/projects/{pid}/import", files=files)
    assert imported.status_code == 201, imported.text
    connected = ls.post("/api/ml/", json={
        "url": f"{api_url}/labelstudio", "project": pid, "title": "alpipe",
        "auth_method": "BASIC_AUTH", "basic_auth_user": "labelstudio", "basic_auth_pass": ADMIN,
        "extra_params": extra_params})
    assert connected.status_code == 201, connected.text
    return pid, connected.json()["id"]


def eventually(check, *, timeout: float, what: str, log: Path | None = None) -> None:
    """wait_until, polling twice a second: each check is a few HTTP calls to busy servers."""
    def paced() -> bool:
        time.sleep(0.5)
        return check()

    wait_until(paced, timeout=timeout, what=what, log=log)


def digit_images(n_per_class: int) -> list[tuple[str, bytes, str]]:
    """(file name, PNG bytes, class) of handwritten zeros and ones, scaled up to 32 px."""
    digits = load_digits()
    out = []
    for digit, name in ((0, "zero"), (1, "one")):
        for i in np.flatnonzero(digits.target == digit)[:n_per_class]:
            pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).resize((32, 32), Image.NEAREST).save(buf, format="PNG")
            out.append((f"{name}-{i}.png", buf.getvalue(), name))
    return out


def choice_result(label: str) -> list[dict]:
    return [{"from_name": "digit", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]


def test_label_studio_drives_alpipe(label_studio: LabelStudio, tmp_path: Path) -> None:
    images = digit_images(15)
    truth = {name: label for name, _, label in images}
    settings = Settings(data_dir=tmp_path / "alpipe", redis_url="")
    env = {"ALPIPE_ADMIN_TOKEN": ADMIN, "ALPIPE_LABEL_STUDIO_TOKEN": label_studio.pat, "ALPIPE_TORCH_THREADS": "1"}
    with LocalStack(settings, scorers=1, trainers=1, echo=False, extra_env=env) as stack, label_studio.api() as ls:
        r = redis.Redis.from_url(stack.redis_url)
        store = LocalStore(stack.data_dir / "store")
        admin = {"Authorization": f"Bearer {ADMIN}"}

        pid, ml_backend = connect_project(ls, stack.api_url, images, extra_params={
            "query_size": 6, "model": "small_cnn", "training": {"stop": "epochs:4"}})
        name = f"label-studio-{pid}"

        def alpipe_project() -> dict:
            return httpx.get(f"{stack.api_url}/projects/{name}", headers=admin).json()

        # alpipe made the project of the config's classes and ingested every task's image.
        eventually(lambda: httpx.get(f"{stack.api_url}/projects/{name}", headers=admin).status_code == 200
                   and alpipe_project()["counts"]["pool"] == len(images), timeout=120, what="tasks ingested")
        assert alpipe_project()["project"]["classes"] == ["zero", "one"]
        assert alpipe_project()["project"]["query_size"] == 6
        tasks = {t["id"]: t for t in ls.get("/api/tasks/", params={"project": pid, "page_size": 100}).json()["tasks"]}
        file_of = {tid: Path(t["data"]["image"]).name for tid, t in tasks.items()}

        def label_of(task_id: int) -> str:
            # Label Studio prefixes uploaded files with a short random id: "<8 hex>-<name>".
            return truth[file_of[task_id].split("-", 1)[1]]

        # The cold-start order is pushed before any model: Label Studio knows alpipe's version.
        eventually(lambda: ls.get(f"/api/projects/{pid}/").json()["model_version"].startswith("alpipe-v0"),
                   timeout=120, what="cold-start predictions in Label Studio")

        # A labeler works through Label Studio's queue: 7 annotations (query_size 6: one model).
        annotations = []
        for _ in range(7):
            task = ls.get(f"/api/projects/{pid}/next/").json()
            answer = ls.post(f"/api/tasks/{task['id']}/annotations/",
                             json={"result": choice_result(label_of(task["id"]))})
            assert answer.status_code == 201, answer.text
            annotations.append(answer.json()["id"])
        eventually(lambda: alpipe_project()["counts"]["labeled"] == 7, timeout=60, what="annotations as labels")
        assert alpipe_project()["labelers"] == {"labelstudio:1": 7}

        # alpipe trains, scores, and pushes v1's predictions; Label Studio switches to them.
        state = ProjectState(r, name)
        eventually(lambda: (state.live_version() or 0) >= 1, timeout=300, what="model v1's ranking live",
                   log=stack.log_dir / "trainer1.log")
        version = f"alpipe-v{state.live_version()}"
        eventually(lambda: ls.get(f"/api/projects/{pid}/").json()["model_version"] == version, timeout=120,
                   what=f"Label Studio's model_version {version}", log=stack.log_dir / "scorer1.log")
        predictions = [p for p in ls.get("/api/predictions/", params={"project": pid}).json()
                       if p["model_version"] == version]
        unlabeled = set(tasks) - {t for t in tasks if ls.get(f"/api/tasks/{t}/").json()["is_labeled"]}
        assert {p["task"] for p in predictions} == unlabeled
        assert all(0.0 <= p["score"] <= 1.0 for p in predictions)
        assert all(p["result"][0]["value"]["choices"][0] in ("zero", "one") for p in predictions)

        # Label Studio's next task is alpipe's top-ranked image (the lowest score).
        top_sample, _ = r.zrevrange(state.ranking_key(state.live_version()), 0, 0, withscores=True)[0]
        task_of = {sample: task for task, sample in links.entries(store, r, name, links.TASKS).items()}
        lowest = min(predictions, key=lambda p: p["score"])
        served = ls.get(f"/api/projects/{pid}/next/").json()["id"]
        assert served == lowest["task"] == task_of[top_sample.decode()]

        # Deleting an annotation in Label Studio withdraws its vote in alpipe.
        assert ls.delete(f"/api/annotations/{annotations[0]}/").status_code == 204
        eventually(lambda: alpipe_project()["counts"]["labeled"] == 6, timeout=60, what="the vote withdrawn")
        stack.check_alive()


def test_a_config_that_is_not_image_classification_is_refused(label_studio: LabelStudio, tmp_path: Path) -> None:
    """Connecting fails in Label Studio; it shows the status line and points to the model's log, which says why."""
    settings = Settings(data_dir=tmp_path / "alpipe", redis_url="")
    with LocalStack(settings, scorers=1, trainers=1, echo=False) as stack, label_studio.api() as ls:
        project = ls.post("/api/projects/", json={"title": "boxes", "label_config": (
            '<View><Image name="image" value="$image"/><RectangleLabels name="box" toName="image">'
            '<Label value="cat"/></RectangleLabels></View>')})
        pid = project.json()["id"]
        refused = ls.post("/api/ml/", json={"url": f"{stack.api_url}/labelstudio", "project": pid,
                                            "title": "alpipe"})
        assert refused.status_code == 400, refused.text
        assert "422 Client Error" in refused.text and "/labelstudio/setup" in refused.text
        assert httpx.get(f"{stack.api_url}/projects").json() == []
        eventually(lambda: "<RectangleLabels name='box'>, which alpipe cannot learn from"
                   in (stack.log_dir / "api.log").read_text(), timeout=10, what="the reason in alpipe's log")
