"""The labeling page (/ui) in headless Chromium against the real stack, access control on."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from alpipe.records import read_label_log
from alpipe.storage import LocalStore

pytestmark = pytest.mark.browser

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "labeling-page.png"


def expect(target):
    from playwright.sync_api import expect as pw_expect

    return pw_expect(target)


def shown(page) -> str:
    """The sample id of the image on the page, once one is shown."""
    image = page.locator("#sample-image")
    expect(image).to_be_visible()
    return image.get_attribute("data-sample-id")


def press_and_wait(page, key: str, previous: str) -> str:
    """Press a key on the page and return the sample id of the image shown next."""
    page.keyboard.press(key)
    expect(page.locator("#sample-image")).not_to_have_attribute("data-sample-id", previous)
    return shown(page)


def label_log(stack, project: str) -> dict[str, tuple[str, str]]:
    """sample id -> (label, labeler), latest first wins, read from the durable label log."""
    out: dict[str, tuple[str, str]] = {}
    for _, records in read_label_log(LocalStore(stack.data_dir / "store"), project):
        for rec in records:
            out[rec.sample_id] = (rec.label, rec.labeler)
    return out


def test_keyboard_labels_and_the_count_follows(pages, make_project, admin, stack):
    project = make_project("ui-keys")
    page = pages.open(f"/ui/?project={project.name}")
    # First visit: the page asks for the token, then opens the project named in the URL.
    expect(page.locator("#signin-view")).to_be_visible()
    page.fill("#signin-input", "t-ada")
    page.keyboard.press("Enter")
    expect(page.locator("#user-name")).to_have_text("ada")
    expect(page.locator("#stat-labeled")).to_have_text("0")

    first = shown(page)
    image = page.locator("#sample-image")
    box = image.bounding_box()
    assert box["width"] >= 300 and box["height"] >= 300, f"an 8x8 image is shown large, got {box}"
    assert image.evaluate("img => getComputedStyle(img).imageRendering") == "pixelated"
    expect(page.locator(".class-btn")).to_have_count(10)
    expect(page.locator(".class-btn").nth(3)).to_contain_text("3")

    # No click anywhere: keys go to the page as it opened.
    given = {}
    current = first
    for _ in range(3):
        label = project.truth[current]
        given[current] = label
        current = press_and_wait(page, label, current)
    expect(page.locator("#stat-labeled")).to_have_text("3")
    expect(page.locator("#stat-mine")).to_have_text("3")
    expect(page.locator("#recent li")).to_have_count(3)
    assert project.counts(admin)["labeled"] == 3

    # A click on a class button labels too.
    given[current] = project.truth[current]
    page.locator(f'.class-btn[data-label="{project.truth[current]}"]').click()
    expect(page.locator("#sample-image")).not_to_have_attribute("data-sample-id", current)
    current = shown(page)
    expect(page.locator("#stat-labeled")).to_have_text("4")
    assert label_log(stack, project.name) == {sid: (label, "ada") for sid, label in given.items()}

    # s skips without labeling; the count stays.
    press_and_wait(page, "s", current)
    page.wait_for_timeout(300)
    assert project.counts(admin)["labeled"] == 4

    # The side panel refreshes from GET /projects/{p}: a label given elsewhere shows up too.
    query = admin.get(f"/projects/{project.name}/queries", params={"n": 1}).json()
    sample = query["samples"][0]["sample_id"]
    answer = admin.post(f"/projects/{project.name}/labels", json={
        "labels": [{"sample_id": sample, "label": project.truth[sample], "lease_token": query["lease_token"]}]})
    assert answer.status_code == 200, answer.text
    expect(page.locator("#stat-labeled")).to_have_text("5", timeout=10_000)


def test_two_labelers_see_different_images(pages, make_project, admin, stack):
    project = make_project("ui-two", offset=40)
    ada = pages.open(f"/ui/?project={project.name}", token="t-ada")
    bob = pages.open(f"/ui/?project={project.name}", token="t-bob")
    seen = {"ada": [shown(ada)], "bob": [shown(bob)]}
    assert seen["ada"][0] != seen["bob"][0], "both labelers were shown the same image"

    for _ in range(3):
        for who, page in (("ada", ada), ("bob", bob)):
            current = seen[who][-1]
            seen[who].append(press_and_wait(page, project.truth[current], current))
    assert not set(seen["ada"]) & set(seen["bob"]), f"an image went to both labelers: {seen}"
    expect(ada.locator("#stat-labeled")).to_have_text("6", timeout=10_000)
    expect(bob.locator("#stat-labeled")).to_have_text("6", timeout=10_000)
    assert project.counts(admin)["labeled"] == 6
    log = label_log(stack, project.name)
    assert {sid: who for sid, (_, who) in log.items()} == {
        **{sid: "ada" for sid in seen["ada"][:3]}, **{sid: "bob" for sid in seen["bob"][:3]}}


def test_undo_takes_the_last_label_back_and_shows_the_image_again(pages, make_project, admin, stack):
    project = make_project("ui-undo", offset=80)
    page = pages.open(f"/ui/?project={project.name}", token="t-ada")
    first = shown(page)
    second = press_and_wait(page, project.truth[first], first)
    third = press_and_wait(page, project.truth[second], second)
    expect(page.locator("#stat-labeled")).to_have_text("2")
    expect(page.locator("#undo-btn")).to_be_enabled()

    assert press_and_wait(page, "u", third) == second
    expect(page.locator("#stat-labeled")).to_have_text("1")
    assert project.counts(admin)["labeled"] == 1
    assert press_and_wait(page, "u", second) == first
    expect(page.locator("#stat-labeled")).to_have_text("0")
    expect(page.locator("#undo-btn")).to_be_disabled()
    assert project.counts(admin)["labeled"] == 0

    # The undone image was leased back to us: labeling it again (differently) is accepted.
    other = "7" if project.truth[first] != "7" else "1"
    assert press_and_wait(page, other, first) == second
    expect(page.locator("#stat-labeled")).to_have_text("1")
    assert project.counts(admin)["labeled"] == 1
    assert label_log(stack, project.name)[first] == (other, "ada")
    expect(page.locator("#banner")).to_be_hidden()


def test_a_wrong_token_is_refused_and_labels_nothing(pages, make_project, admin):
    project = make_project("ui-refused", pool=10, offset=120)
    # A stored token that the API does not know: the page says so and asks again.
    page = pages.open(f"/ui/?project={project.name}", token="t-nobody")
    expect(page.locator("#signin-error")).to_have_text("token refused")
    expect(page.locator("#label-view")).to_be_hidden()
    assert page.evaluate("localStorage.getItem('alpipe.token')") is None
    page.fill("#signin-input", "still-wrong")
    page.keyboard.press("Enter")
    expect(page.locator("#signin-error")).to_have_text("token refused")
    for key in ("1", "2", "u"):
        page.keyboard.press(key)

    # A known labeler without access to the project: told so, shown nothing to label.
    carol = pages.open(f"/ui/?project={project.name}", token="t-carol")
    expect(carol.locator("#banner")).to_contain_text("not allowed")
    expect(carol.locator("#label-view")).to_be_hidden()
    counts = project.counts(admin)
    assert counts["labeled"] == 0 and counts["leased"] == 0


def test_a_label_refused_with_409_moves_on_to_the_next_image(pages, make_project, admin):
    """When the API answers 409 (the lease lapsed and someone else holds the image), the page says so
    and goes on; the API's side of that is tested with the API."""
    project = make_project("ui-conflict", pool=12, offset=160)
    refuse = {"on": False}

    def answer(route):
        if refuse["on"] and route.request.method == "POST":
            route.fulfill(status=409, json={"detail": "the sample is leased to labeler 'bob'"})
        else:
            route.continue_()

    # Routed before the page opens, switched on once the first image shows: no race with the route's set-up.
    page = pages.open(f"/ui/?project={project.name}", token="t-ada",
                      before=lambda context: context.route(f"**/projects/{project.name}/labels", answer))
    first = shown(page)
    refuse["on"] = True
    second = press_and_wait(page, project.truth[first], first)
    expect(page.locator(".toast")).to_contain_text("someone else")
    expect(page.locator("#stat-mine")).to_have_text("0")
    expect(page.locator("#recent li")).to_have_count(0)
    expect(page.locator("#banner")).to_be_hidden()
    refuse["on"] = False
    press_and_wait(page, project.truth[second], second)
    expect(page.locator("#stat-labeled")).to_have_text("1")
    assert project.counts(admin)["labeled"] == 1


def test_an_unreachable_api_is_reported_and_the_page_recovers(pages, make_project):
    project = make_project("ui-offline", pool=6, offset=180)
    blocked = f"**/projects/{project.name}/queries*"
    page = pages.open(f"/ui/?project={project.name}", token="t-ada",
                      before=lambda context: context.route(blocked, lambda route: route.abort()))
    expect(page.locator("#banner")).to_contain_text("cannot reach the labeling API")
    expect(page.locator("#sample-image")).to_be_hidden()
    page.context.unroute(blocked)
    # The page asks again by itself: the image comes and the message goes.
    shown(page)
    expect(page.locator("#banner")).to_be_hidden()


def test_the_page_and_its_files_are_served_without_a_token(stack):
    with httpx.Client(base_url=stack.api_url) as client:
        redirect = client.get("/ui", params={"project": "digits"})
        assert redirect.status_code == 307 and redirect.headers["location"] == "ui/?project=digits"
        page = client.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'src="app.js"' in page.text and 'href="app.css"' in page.text
        for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
            asset = client.get(f"/ui/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), name
        assert client.get("/ui/ui.py").status_code == 404
        assert client.get("/projects").status_code == 401  # the API itself still wants a token


def test_the_page_mid_labeling_with_a_trained_model(pages, make_project, admin, stack):
    """Label a few images until the model has trained, then save the screenshot the README shows."""
    project = make_project("digits-demo", pool=30, test=30, query_size=6, offset=200)
    page = pages.open(f"/ui/?project={project.name}", token="t-ada")
    current = shown(page)
    # The trainer retrains after every 6 labels; the side panel polls and draws the curve. A busy
    # trainer coalesces: labels that arrive before v1 starts training all go into v1. So the second
    # batch is labeled only once v1 shows, which makes it 6 labels the model has not seen.
    for version in (1, 2):
        for _ in range(6):
            current = press_and_wait(page, project.truth[current], current)
        expect(page.locator("#stat-model")).to_have_text(re.compile(rf"v[{version}-9]"), timeout=60_000)
    expect(page.locator("#stat-accuracy")).to_have_text(re.compile(r"\d+\.\d%"))
    assert page.locator("#curve circle").count() >= 2, "one point per model version on the curve"
    # Keep labeling until the served images come from a model, so the page shows its guess.
    for _ in range(12):
        if "%" in page.locator("#meta-guess").inner_text():
            break
        current = press_and_wait(page, project.truth[current], current)
        page.wait_for_timeout(250)
    page.mouse.move(0, 0)
    page.wait_for_timeout(300)  # let the pressed-button flash fade
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_closing_the_page_hands_its_images_back(pages, make_project, admin):
    """Images a closed page was served but not labeled go to the next labeler at once, not after the lease TTL."""
    project = make_project("ui-close", pool=12, offset=270)
    ada = pages.open(f"/ui/?project={project.name}", token="t-ada")
    first = shown(ada)
    skipped = press_and_wait(ada, project.truth[first], first)
    press_and_wait(ada, "s", skipped)
    expect(ada.locator("#stat-labeled")).to_have_text("1")
    assert project.counts(admin)["leased"] >= 2

    ada.close(run_before_unload=True)
    deadline = time.monotonic() + 10
    while project.counts(admin)["leased"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert project.counts(admin) == {"pool": 11, "labeled": 1, "leased": 0, "test": 0}

    # The image ada skipped is the top of the ranking again, so it is the first one bob sees.
    bob = pages.open(f"/ui/?project={project.name}", token="t-bob")
    assert shown(bob) == skipped
