"""The labeling page in a real browser: Debian's Chromium driven by Playwright, against a real stack.

One local stack (redis-server, API, a trainer and a scorer as processes) serves the whole
module, with access control on: an admin token and three labelers. Each test creates its own
project over HTTP, with 8×8 digit images rendered to PNG here, so tests never share a pool.

Chromium comes from Debian (`apt-get install chromium`; .ci/run installs it): Playwright's own
browser download cannot reach its servers here. Without it the tests skip, except under CI
(CI=true), where a missing browser is a failure.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from alpipe.config import Settings
from alpipe.stack import LocalStack

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking switches Chromium keeps calling home, which fails here.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}

ADMIN_TOKEN = "t-admin"
LABELERS = {
    "ada": {"token": "t-ada", "projects": ["*"]},
    "bob": {"token": "t-bob", "projects": ["*"]},
    "carol": {"token": "t-carol", "projects": ["not-a-test-project"]},
}
CLASSES = [str(d) for d in range(10)]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does this)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: pip install -e '.[dev]'"
    return None


# --------------------------------------------------------------------------- the stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    data_dir = tmp_path_factory.mktemp("browser-stack")
    env = {"ALPIPE_ADMIN_TOKEN": ADMIN_TOKEN, "ALPIPE_LABELERS": json.dumps(LABELERS),
           "ALPIPE_TORCH_THREADS": "1"}
    with LocalStack(Settings(data_dir=data_dir, redis_url=""), scorers=1, echo=False, extra_env=env) as running:
        yield running


@pytest.fixture(scope="session")
def admin(stack: LocalStack) -> Iterator[httpx.Client]:
    """An HTTP client of the stack's API with the admin token."""
    with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                      timeout=30) as client:
        yield client


# --------------------------------------------------------------------------- projects


def digit_pngs(n: int, *, start: int = 0) -> list[tuple[bytes, str]]:
    """n distinct 8×8 grayscale PNGs of handwritten digits (scikit-learn's set), dark ink on white."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    out, seen = [], set()
    for pixels, target in zip(digits.images[start:], digits.target[start:], strict=True):
        img = Image.fromarray((255 - pixels * 255 / 16).round().astype("uint8"), mode="L")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data = buf.getvalue()
        if data not in seen:
            seen.add(data)
            out.append((data, str(int(target))))
        if len(out) == n:
            break
    return out


@dataclass
class DigitProject:
    name: str
    truth: dict[str, str] = field(default_factory=dict)  # pool sample id -> its real digit

    def counts(self, admin: httpx.Client) -> dict:
        response = admin.get(f"/projects/{self.name}")
        response.raise_for_status()
        return response.json()["counts"]


@pytest.fixture(scope="session")
def make_project(admin: httpx.Client) -> Callable[..., DigitProject]:
    """Create a digits project over HTTP (admin token) with `pool` pool images and `test` test images.

    Other `classes` than the digits name the classes of a layout test; its images are still digits,
    so it takes no test images (their labels are digits)."""

    def make(name: str, *, pool: int = 30, test: int = 0, query_size: int = 1000, offset: int = 0,
             classes: list[str] | None = None) -> DigitProject:
        assert classes is None or test == 0, "test images are labeled with digits"
        response = admin.post("/projects", json={
            "name": name, "classes": classes or CLASSES, "strategy": "margin", "query_size": query_size,
            "training": {"stop": "epochs:5", "augment": False}})
        assert response.status_code == 201, response.text
        project = DigitProject(name)
        images = digit_pngs(pool + test, start=offset)
        for i, (data, label) in enumerate(images):
            split = "pool" if i < pool else "test"
            form = {"split": split, **({"label": label} if split == "test" else {})}
            response = admin.post(f"/projects/{name}/samples", files={"file": (f"{i}.png", data, "image/png")},
                                  data=form)
            assert response.status_code == 201, response.text
            if split == "pool":
                project.truth[response.json()["sample_id"]] = label
        # The cold-start order is settled before a page opens: a scorer finishing it mid-test would reorder
        # the ranking under the page (workers run at a lower CPU priority, so on a busy machine it comes late).
        deadline = time.monotonic() + 120
        while admin.get(f"/projects/{name}").json()["cold_start"] == "pending":
            assert time.monotonic() < deadline, f"{name}: the cold-start order is still pending after 120 s"
            time.sleep(0.1)
        return project

    return make


# --------------------------------------------------------------------------- the browser


@pytest.fixture(scope="session")
def browser():
    problem = _browser_missing()
    if problem:
        if _in_ci():
            pytest.fail(f"browser tests cannot run in CI: {problem}")
        pytest.skip(problem)
    from playwright.sync_api import expect, sync_playwright

    # A loaded CI machine (two cores shared with the stack) can be slow; real failures still fail.
    expect.set_options(timeout=10_000)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Pages:
    """Opens labeling pages, each in its own browser context (its own localStorage: one labeler)."""

    browser: object
    api_url: str
    contexts: list = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def open(self, path: str = "/ui/", *, token: str | None = None, before: Callable | None = None):
        """A new labeler's page at path; before(context) runs first (to route requests, say)."""
        context = self.browser.new_context(viewport=VIEWPORT, locale="en-US")  # 1,234 as numbers read
        if before is not None:
            before(context)
        context.set_default_timeout(15_000)
        if token is not None:  # as if this labeler had signed in before
            context.add_init_script(f"window.localStorage.setItem('alpipe.token', {json.dumps(token)})")
        self.contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught error on the page: {exc}"))
        page.goto(self.api_url + path)
        return page


@pytest.fixture
def pages(browser, stack: LocalStack) -> Iterator[Pages]:
    opened = Pages(browser, stack.api_url)
    try:
        yield opened
    finally:
        for context in opened.contexts:
            context.close()
    assert not opened.errors, opened.errors
