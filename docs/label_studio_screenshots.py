"""The README's picture of Label Studio with alpipe as its model: docs/label-studio-labeling.png, the task
Label Studio serves next (alpipe's top-ranked image) with alpipe's guess and its prediction per model version.

Run from the repository root, after `make setup labelstudio`, where Debian's Chromium is installed:
    .venv/bin/python docs/label_studio_screenshots.py
It starts Label Studio and alpipe's stack, labels seven digits through Label Studio's queue, waits
for alpipe's first model's predictions, and photographs Label Studio's pages in headless Chromium.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from playwright.sync_api import sync_playwright  # noqa: E402

from alpipe.config import Settings  # noqa: E402
from alpipe.stack import LocalStack  # noqa: E402
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, VIEWPORT  # noqa: E402
from tests.e2e.test_label_studio import (  # noqa: E402
    ADMIN,
    PASSWORD,
    USER,
    choice_result,
    connect_project,
    digit_images,
    eventually,
    running_label_studio,
)


def main() -> None:
    images = digit_images(15)
    truth = {name: label for name, _, label in images}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "ls").mkdir()
        with running_label_studio(tmp_path / "ls") as label_studio:
            env = {"ALPIPE_ADMIN_TOKEN": ADMIN, "ALPIPE_LABEL_STUDIO_TOKEN": label_studio.pat}
            settings = Settings(data_dir=tmp_path / "alpipe", redis_url="")
            with LocalStack(settings, scorers=1, trainers=1, echo=False, extra_env=env) as stack, \
                    label_studio.api() as ls:
                pid, _ = connect_project(ls, stack.api_url, images, extra_params={"query_size": 6,
                                                                                   "model": "small_cnn"})
                eventually(lambda: ls.get(f"/api/projects/{pid}/").json()["model_version"].startswith("alpipe-v0"),
                           timeout=180, what="cold-start predictions")
                for _ in range(7):
                    task = ls.get(f"/api/projects/{pid}/next/").json()
                    name = Path(task["data"]["image"]).name.split("-", 1)[1]
                    ls.post(f"/api/tasks/{task['id']}/annotations/", json={"result": choice_result(truth[name])})
                eventually(lambda: ls.get(f"/api/projects/{pid}/").json()["model_version"] == "alpipe-v1",
                           timeout=300, what="model v1's predictions")
                next_task = ls.get(f"/api/projects/{pid}/next/").json()["id"]
                shoot(label_studio.url, pid, next_task)


def shoot(url: str, pid: int, task_id: int) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(f"{url}/user/login/")
        page.fill("input[name=email]", USER)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
        page.goto(f"{url}/projects/{pid}/data?task={task_id}")
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(4000)
        page.screenshot(path=str(REPO / "docs" / "label-studio-labeling.png"))
        browser.close()


if __name__ == "__main__":
    main()
