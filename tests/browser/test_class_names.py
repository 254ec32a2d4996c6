"""Class names on the labeling page: long names are shown whole, many classes get a filterable list."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser.test_labeling_page import expect, label_log, press_and_wait, shown

pytestmark = pytest.mark.browser

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "labeling-page-many-classes.png"

# Twelve names like a photo project's: no spaces, longer than a class button of the digits layout.
REGIONS = ["china", "japan", "korea", "india", "nepal"]
PLACES = ["top_left", "top_right", "bottom_left", "bottom_right", "center", "full_frame"]
TWELVE = [f"{i + 1:02d}_{region}_{place}" for i, (region, place) in
          enumerate((r, p) for r in REGIONS[:2] for p in PLACES)]
THIRTY = [f"{i + 1:02d}_{region}_{place}" for i, (region, place) in
          enumerate((r, p) for r in REGIONS for p in PLACES)]

_BOXES = """els => els.map(e => {
  const r = e.getBoundingClientRect();
  return {text: e.innerText, left: r.left, top: r.top, right: r.right, bottom: r.bottom,
          sw: e.scrollWidth, cw: e.clientWidth, sh: e.scrollHeight, ch: e.clientHeight};
})"""


def boxes(page, selector: str) -> list[dict]:
    """Each matching element's text as rendered, its box on the page and its scroll and client sizes."""
    return page.eval_on_selector_all(selector, _BOXES)


def box(page, selector: str) -> dict:
    (only,) = boxes(page, selector)
    return only


def overlap(a: dict, b: dict) -> bool:
    return (a["left"] < b["right"] - 0.5 and b["left"] < a["right"] - 0.5
            and a["top"] < b["bottom"] - 0.5 and b["top"] < a["bottom"] - 0.5)


def inside(inner: dict, outer: dict) -> bool:
    return (inner["left"] >= outer["left"] - 0.5 and inner["right"] <= outer["right"] + 0.5
            and inner["top"] >= outer["top"] - 0.5 and inner["bottom"] <= outer["bottom"] + 0.5)


def cut(b: dict) -> bool:
    """Whether an element's content overflows it (a name cut off or hidden behind an ellipsis)."""
    return b["sw"] > b["cw"] or b["sh"] > b["ch"] + 1


def assert_names_whole(page, names: list[str], *, only_in: dict | None = None) -> None:
    """Every class button shows its whole name, inside the button, apart from its key and the
    other buttons, and clear of the image (only_in: check the buttons within that box only)."""
    buttons = boxes(page, ".class-btn")
    texts = boxes(page, ".class-btn .class-name")
    assert [t["text"] for t in texts] == names, "each button reads its class name, whole, in class order"
    stage = box(page, "#stage")
    checked = 0
    for i, (button, text) in enumerate(zip(buttons, texts, strict=True)):
        if only_in is not None and not inside(button, only_in):
            continue
        checked += 1
        assert not cut(text) and not cut(button), f"{names[i]!r} does not fit its button: {text}, {button}"
        assert inside(text, button), f"{names[i]!r} spills out of its button"
        assert not overlap(button, stage), f"the button of {names[i]!r} overlaps the image"
        assert button["bottom"] <= page.viewport_size["height"], f"{names[i]!r} is below the window"
        for j, other in enumerate(buttons[i + 1:], start=i + 1):
            assert not overlap(button, other), f"the buttons of {names[i]!r} and {names[j]!r} overlap"
    assert checked >= min(len(names), 12), f"only {checked} buttons in view"
    kbds = boxes(page, ".class-btn kbd")
    for kbd, text in zip(kbds, texts, strict=False):  # the first ten have a key, left of the name
        assert not overlap(kbd, text), f"the key {kbd['text']} covers the name {text['text']!r}"


def assert_recent_whole(page, expected: list[str]) -> None:
    """The last-labels strip shows these names (newest first), each whole, inside its entry."""
    expect(page.locator("#recent li")).to_have_count(len(expected))
    entries = boxes(page, "#recent li")
    names = boxes(page, "#recent li span")
    assert [n["text"] for n in names] == expected
    panel = box(page, ".recent")
    for entry, name in zip(entries, names, strict=True):
        assert not cut(name) and inside(name, entry), f"{name['text']!r} is cut in the last-labels strip: {name}"
        assert inside(entry, panel)


def test_long_class_names_are_shown_whole_and_keys_still_work(pages, make_project, stack):
    project = make_project("ui-long-names", pool=20, offset=300, classes=TWELVE)
    page = pages.open(f"/ui/?project={project.name}", token="t-ada")
    current = shown(page)
    expect(page.locator(".class-btn")).to_have_count(12)
    expect(page.locator("#class-filter")).to_be_hidden()  # twelve fit as buttons: no filter
    assert_names_whole(page, TWELVE)
    assert box(page, "#stage")["bottom"] - box(page, "#stage")["top"] >= 260, "the image keeps its room"

    # Keys 1–9 and 0 still pick the first ten classes, in order; the last two are clicked.
    given = {}
    for key, name in (("3", TWELVE[2]), ("0", TWELVE[9]), ("1", TWELVE[0])):
        given[current] = name
        current = press_and_wait(page, key, current)
    for name in (TWELVE[11], TWELVE[10]):
        given[current] = name
        page.locator(f'.class-btn[data-label="{name}"]').click()
        expect(page.locator("#sample-image")).not_to_have_attribute("data-sample-id", current)
        current = shown(page)
    expect(page.locator("#stat-labeled")).to_have_text("5")
    assert {sid: label for sid, (label, _) in label_log(stack, project.name).items()} == given

    assert_recent_whole(page, [TWELVE[10], TWELVE[11], TWELVE[0], TWELVE[9], TWELVE[2]])
    assert_names_whole(page, TWELVE)  # still, with the strip filled


def test_thirty_classes_are_listed_with_a_filter_and_each_can_be_chosen(pages, make_project, stack):
    project = make_project("ui-thirty", pool=66, offset=400, classes=THIRTY)
    page = pages.open(f"/ui/?project={project.name}", token="t-ada")
    current = shown(page)
    expect(page.locator(".class-btn")).to_have_count(30)
    expect(page.locator("#class-filter")).to_be_visible()
    expect(page.locator("#class-filter-count")).to_have_text("30 classes")
    listing = box(page, "#classes")
    assert not overlap(listing, box(page, "#stage")), "the class list overlaps the image"
    assert box(page, "#stage")["bottom"] - box(page, "#stage")["top"] >= 240, "the image keeps its room"
    assert box(page, ".actions")["bottom"] <= page.viewport_size["height"], "skip/undo stay in the window"
    assert_names_whole(page, THIRTY, only_in=listing)
    given: dict[str, str] = {}

    def labeled_as(name: str) -> None:
        nonlocal current
        given[current] = name
        expect(page.locator("#sample-image")).not_to_have_attribute("data-sample-id", current)
        current = shown(page)

    # Every class by the filter: / jumps to it, the words typed narrow the list, Enter labels.
    for name in THIRTY:
        page.keyboard.press("/")
        expect(page.locator("#class-filter")).to_be_focused()
        words = name.split("_")
        page.keyboard.type(f"{words[1]} {' '.join(words[2:])}")  # "japan top left"
        expect(page.locator(".class-btn:visible")).to_have_count(1)
        expect(page.locator(".class-btn.active")).to_have_attribute("data-label", name)
        expect(page.locator("#class-filter-count")).to_have_text("1 of 30")
        page.keyboard.press("Enter")
        labeled_as(name)
        # The filter empties and the keys go back to the page.
        expect(page.locator("#class-filter")).to_have_value("")
        expect(page.locator(".class-btn:visible")).to_have_count(30)
    expect(page.locator("#stat-labeled")).to_have_text("30")

    # Several matches: the first is highlighted, the arrow keys move on; nothing matching labels nothing.
    page.keyboard.press("/")
    page.keyboard.type("korea")
    expect(page.locator(".class-btn:visible")).to_have_count(6)
    expect(page.locator("#class-filter-count")).to_have_text("6 of 30")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    expect(page.locator(".class-btn.active")).to_have_attribute("data-label", "15_korea_bottom_left")
    page.keyboard.press("Enter")
    labeled_as("15_korea_bottom_left")
    page.keyboard.press("/")
    page.keyboard.type("tibet")
    expect(page.locator("#class-filter-count")).to_have_text("no class matches")
    page.keyboard.press("Enter")
    page.wait_for_timeout(200)
    assert page.locator("#sample-image").get_attribute("data-sample-id") == current
    page.keyboard.press("Escape")  # clears the filter, then leaves it
    expect(page.locator(".class-btn:visible")).to_have_count(30)
    page.keyboard.press("Escape")
    expect(page.locator("#class-filter")).not_to_be_focused()

    # Every class by a click, scrolled to in the list where need be.
    for name in THIRTY:
        page.locator(f'.class-btn[data-label="{name}"]').click()
        labeled_as(name)
    # The keys still pick the first ten classes.
    for key, name in (("1", THIRTY[0]), ("0", THIRTY[9])):
        given[current] = name
        current = press_and_wait(page, key, current)
    expect(page.locator("#stat-labeled")).to_have_text(str(len(given)))
    assert {sid: label for sid, (label, _) in label_log(stack, project.name).items()} == given
    assert_recent_whole(page, [THIRTY[9], THIRTY[0], *reversed(THIRTY[-4:])])  # the six newest

    # The screenshot of this layout for the README: the list at the top, the filter empty.
    page.locator("#classes").evaluate("el => { el.scrollTop = 0; }")
    page.mouse.move(0, 0)
    page.locator("#stage").focus()
    page.wait_for_timeout(300)  # let the pressed-button flash fade
    assert_names_whole(page, THIRTY, only_in=box(page, "#classes"))
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_named_classes_get_two_wide_buttons(pages, make_project):
    """Two classes: two wide buttons with their keys, no filter, nothing cut (here and in the strip)."""
    project = make_project("ui-two-classes", pool=6, offset=500, classes=["cat", "dog"])
    page = pages.open(f"/ui/?project={project.name}", token="t-ada")
    current = shown(page)
    expect(page.locator(".class-btn")).to_have_count(2)
    expect(page.locator("#class-filter")).to_be_hidden()
    assert_names_whole(page, ["cat", "dog"])
    assert page.locator("#class-picker").get_attribute("data-layout") == "names"
    press_and_wait(page, "2", current)
    assert_recent_whole(page, ["dog"])
