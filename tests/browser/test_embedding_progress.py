"""The side panel shows the backbone embedding pass (GET /projects/{p} `embedding`) while it runs and once done.

The API's own answer carries the field only for a project in embedding mode, so the test rewrites
the real answer of GET /projects/<name> in the browser (page.route): the page polls it as it does
for the counts and the model.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest

from tests.browser.test_labeling_page import expect, shown

pytestmark = pytest.mark.browser

BACKBONE = "efficientnet_lite0@224/3f2a9c1d"
RUNNING = {"backbone": BACKBONE, "total": 5000, "done": 1234, "failed": 1, "images_per_s": 310.5, "eta_s": 12.3,
           "complete": False}
NO_RATE_YET = {**RUNNING, "done": 0, "failed": 0, "images_per_s": None, "eta_s": None}
SLOWER = {**RUNNING, "done": 4000, "failed": 0, "images_per_s": 2.25, "eta_s": 444.4}
COMPLETE = {**RUNNING, "done": 5000, "failed": 0, "images_per_s": None, "eta_s": None, "complete": True}
COMPLETE_BUT_ONE = {**COMPLETE, "done": 4999, "failed": 1}
NOT_SET = object()  # the real answer as it is


def test_the_side_panel_shows_the_embedding_pass(pages, make_project):
    project = make_project("ui-embedding", pool=8, offset=560)
    embedding: dict = {"value": NOT_SET}

    def is_project(url: str) -> bool:
        return urlsplit(url).path.endswith(f"/projects/{project.name}")

    def rewrite(route):
        if route.request.method != "GET" or embedding["value"] is NOT_SET:
            route.continue_()
            return
        response = route.fetch()
        body = response.json()
        body["embedding"] = embedding["value"]
        route.fulfill(response=response, json=body)

    page = pages.open(f"/ui/?project={project.name}", token="t-ada",
                      before=lambda context: context.route(is_project, rewrite))
    shown(page)
    wait = {"timeout": 15_000}  # a poll comes every 4 s
    card = page.locator("#stat-embedding")
    text = page.locator("#embedding-text")
    bar = page.locator("#embedding-progress")
    # Nothing about embeddings for a project without the field (or with null).
    expect(page.locator("#stat-labeled")).to_have_text("0")
    expect(card).to_be_hidden()

    def answers(value) -> None:
        """From the next poll of GET /projects/<name> on (every 4 s), the API answers with this embedding."""
        embedding["value"] = value

    answers(RUNNING)
    expect(text).to_have_text("Embedding images: 1,234 / 5,000 · 310 img/s · ~12 s left · 1 failed", **wait)
    expect(card).to_be_visible()
    expect(bar).to_be_visible()
    expect(bar).to_have_attribute("aria-valuenow", "24")  # 1,234 embedded and 1 failed of 5,000
    width = page.locator("#embedding-bar").evaluate("el => el.style.width")
    assert width == "24.7%", width
    expect(page.locator("#embedding-sub")).to_contain_text("efficientnet_lite0@224")
    expect(page.locator("#embedding-sub")).to_contain_text("random image order until done")

    answers(NO_RATE_YET)  # before the first batch: no rate or ETA, no failures
    expect(text).to_have_text("Embedding images: 0 / 5,000", **wait)
    answers(SLOWER)
    expect(text).to_have_text("Embedding images: 4,000 / 5,000 · 2.3 img/s · ~7 min left", **wait)

    answers(COMPLETE)
    expect(text).to_have_text("Embeddings ready (5,000 images)", **wait)
    expect(bar).to_be_hidden()
    expect(card).to_have_class(re.compile(r"\bcomplete\b"))
    # The labeling around it goes on as before.
    expect(page.locator("#stat-model")).to_have_text("none")

    answers(COMPLETE_BUT_ONE)  # an image that could not be decoded is said
    expect(text).to_have_text("Embeddings ready (4,999 of 5,000 images) · 1 failed", **wait)
    expect(bar).to_be_hidden()

    answers(None)  # a project out of embedding mode again: the card goes
    expect(card).to_be_hidden(**wait)
