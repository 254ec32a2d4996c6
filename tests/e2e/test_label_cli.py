"""`alpipe label` and `alpipe export` against a real API process (`alpipe api` on the session redis-server).

Also the labeling loop in-process, with a stub API, for what a real API makes hard to reach
(an API without undo, more than ten classes).
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from alpipe.api_client import ApiError
from alpipe.label_cli import LabelSession, class_keys
from tests.helpers import free_port, stop_process, wait_until
from tests.integration.test_api import png_bytes

CLASSES = ["cat", "dog", "fox"]
ADMIN = {"Authorization": "Bearer admin-secret"}


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without alpipe settings or a display (no image viewer pops up), plus extra."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ALPIPE_") and k not in ("REDIS_URL", "DISPLAY", "WAYLAND_DISPLAY")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture
def api_url(tmp_path: Path, redis_url: str) -> Iterator[str]:
    """A real `alpipe api` with authentication on: the admin, and labeler ann on project pets."""
    port = free_port()
    env = clean_env(REDIS_URL=redis_url, ALPIPE_DATA_DIR=str(tmp_path / "data"), ALPIPE_RECONCILE_INTERVAL_S="0",
                    ALPIPE_ADMIN_TOKEN="admin-secret",
                    ALPIPE_LABELERS=json.dumps({"ann": {"token": "ann-secret", "projects": ["pets"]}}))
    log = tmp_path / "api.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "alpipe.cli", "api", "--port", str(port)], cwd=tmp_path,
                                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/health", timeout=1).status_code == 200, timeout=60, what="alpipe api",
                   proc=proc, log=log)
        yield url
    finally:
        stop_process(proc)


def alpipe(args: list[str], *, cwd: Path, stdin: str = "", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alpipe.cli", *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd, env=clean_env(**env), timeout=60)


def test_label_and_export_from_the_terminal(api_url: str, tmp_path: Path) -> None:
    api = httpx.Client(base_url=api_url, timeout=10)
    assert api.post("/projects", json={"name": "pets", "classes": CLASSES}, headers=ADMIN).status_code == 201
    for i in range(6):
        upload = api.post("/projects/pets/samples", files={"file": (f"img{i}.png", png_bytes(i), "image/png")},
                          headers=ADMIN)
        assert upload.status_code == 201, upload.text

    # cat, skip, a wrong key, dog, undo the dog (the same sample comes back), cat, quit.
    keys = "1\ns\nx\n2\nu\n1\nq\n"
    run = alpipe(["label", "--api", api_url, "--project", "pets", "--batch", "3"], cwd=tmp_path, stdin=keys,
                 ALPIPE_TOKEN="ann-secret")
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "project 'pets': 0 labeled, 6 unlabeled, model v0; labeling as 'ann'" in out
    assert "  1  cat\n  2  dog\n  3  fox\n" in out
    assert "keys: 1 cat  2 dog  3 fox  |  s skip  u undo  q quit" in out
    assert f"{api_url}/projects/pets/samples/" in out and "image: " in out  # the URL, and the file it saved
    assert "'x' is not a key. keys: 1 cat" in out
    assert "(cold start: random order)" in out  # no model yet
    assert "labeled 'cat': 1 labeled in the project, model v0" in out
    assert "labeled 'dog': 2 labeled in the project, model v0" in out
    assert "undid 'dog' on sample" in out
    assert "this session: 2 labeled, 1 skipped, 1 undone; project 'pets': 2 labeled, model v0" in out
    shown = [line.split()[2] for line in out.splitlines() if line.startswith("[")]
    # u came at the 4th sample (the next batch): the undone 3rd one is shown again, then the 4th.
    assert len(shown) == 6 and shown[4] == shown[2] and shown[5] == shown[3]

    info = api.get("/projects/pets", headers=ADMIN).json()
    assert info["counts"]["labeled"] == 2 and info["counts"]["pool"] == 4
    # On q, the skipped sample, the one shown and the two still queued were handed back.
    assert info["counts"]["leased"] == 0
    assert info.get("labelers", {"ann": 2}) == {"ann": 2}

    # Export through the CLI: the token from --token or ALPIPE_TOKEN, streamed into the file.
    out_csv = tmp_path / "exports" / "pets.csv"
    run = alpipe(["export", "--api", api_url, "--project", "pets", "--format", "csv", "--out", str(out_csv),
                  "--token", "admin-secret"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"wrote {out_csv} (")
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert [(r["label"], r["labeler"], r["retracted"]) for r in rows] == [
        ("cat", "ann", "false"), ("dog", "ann", "false"), ("dog", "ann", "true"), ("cat", "ann", "false")]
    assert rows[0]["name"].startswith("img") and rows[1]["sample_id"] == rows[3]["sample_id"]

    run = alpipe(["export", "--api", api_url, "--project", "pets", "--format", "imagefolder"], cwd=tmp_path,
                 ALPIPE_TOKEN="admin-secret")
    assert run.returncode == 0, run.stderr
    with zipfile.ZipFile(tmp_path / "pets-labels.zip") as zf:
        assert sorted(zf.namelist()) == sorted([f"cat/{rows[0]['sample_id']}.png",
                                                f"cat/{rows[1]['sample_id']}.png", "labels.csv"])

    # Errors are one line, with the API's reason; nothing is left behind.
    for token_args, status, reason in [(["--token", "ann-secret"], "403", "is for the admin only"),
                                       ([], "401", "pass --token or set ALPIPE_TOKEN")]:
        run = alpipe(["export", "--api", api_url, "--project", "pets", "--out", "denied.csv", *token_args],
                     cwd=tmp_path)
        assert run.returncode == 2
        assert run.stderr.count("\n") == 1 and run.stderr.startswith("alpipe: error: GET /projects/pets/export")
        assert f"({status})" in run.stderr and reason in run.stderr
        assert not (tmp_path / "denied.csv").exists()

    # A labeler cannot label as someone else; the pool left is still there to label.
    run = alpipe(["label", "--api", api_url, "--project", "pets", "--labeler", "bob", "--token", "ann-secret"],
                 cwd=tmp_path, stdin="q\n")
    assert run.returncode == 2 and "your token belongs to 'ann'" in run.stderr


# --- the loop in-process, over a stub API ----------------------------------------------------------------


class StubApi:
    """Answers like the API for one project; records the requests; undo answers `undo_status`."""

    base_url = "http://stub"

    def __init__(self, classes: list[str], n_samples: int = 4, undo_status: int | None = 405):
        self.classes = classes
        self.samples = [f"{i:064x}" for i in range(n_samples)]
        self.undo_status = undo_status
        self.labels: dict[str, str] = {}
        self.released: list[str] = []
        self.calls: list[tuple[str, str]] = []

    def url(self, path: str) -> str:
        return self.base_url + path

    def request(self, method: str, path: str, **kwargs):
        raise AssertionError("no images in these tests")

    def json(self, method: str, path: str, **kwargs):
        self.calls.append((method, path))
        if path == "/me":
            raise ApiError("GET /me failed (404): Not Found", 404)
        if method == "GET" and path.endswith("/queries"):
            free = [s for s in self.samples if s not in self.labels][:kwargs["params"]["n"]]
            self.samples = [s for s in self.samples if s not in free] + free  # leased: served once
            return {"lease_token": "t", "samples": [{"sample_id": s, "score": 0.5, "image_url": f"/i/{s}",
                                                     "guess": {"label": self.classes[0], "confidence": 0.625}}
                                                    for s in free if kwargs["params"]["n"]]}
        if method == "GET":
            return {"project": {"classes": self.classes}, "counts": {"labeled": len(self.labels), "pool": 9},
                    "model": {"version": 3}}
        if method == "POST" and path.endswith("/leases/release"):
            self.released.extend(kwargs["json"]["sample_ids"])
            return {"released": len(kwargs["json"]["sample_ids"])}
        if method == "POST":
            for item in kwargs["json"]["labels"]:
                self.labels[item["sample_id"]] = item["label"]
            return {"accepted": 1, "duplicates": 0, "labeled": len(self.labels)}
        if method == "DELETE":
            detail = "Method Not Allowed" if self.undo_status == 405 else "Not Found"
            raise ApiError(f"DELETE {path} failed ({self.undo_status}): {detail}", self.undo_status)
        raise AssertionError((method, path))


def run_session(api: StubApi, keys: list[str]) -> tuple[LabelSession, str]:
    out = io.StringIO()
    lines = iter(keys)

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    session = LabelSession(api=api, project="p", default_labeler="tester", batch=2, input_fn=read, out=out)
    session.run()
    return session, out.getvalue()


def test_more_than_ten_classes_keys_then_names() -> None:
    classes = [f"c{i}" for i in range(12)]
    keys = class_keys(classes)
    assert list(keys) == list("1234567890") and keys["1"] == "c0" and keys["0"] == "c9"
    api = StubApi(classes)
    session, out = run_session(api, ["0", "C11", "c10", "13", "q"])
    assert "  -  c11" in out and "(type the name: c10, c11)" in out
    assert "guess: c0 (62%)" in out and "score 0.500" in out
    assert "'13' is not a key" in out
    assert list(api.labels.values()) == ["c9", "c11", "c10"]
    assert session.labeler == "tester"  # no /me: an API without access control


@pytest.mark.parametrize("status", [405, 404])
def test_undo_on_an_api_without_it_keeps_the_label(status: int) -> None:
    api = StubApi(CLASSES, undo_status=status)
    session, out = run_session(api, ["u", "2", "u", "3"])  # then the input ends: quit
    assert "nothing to undo yet" in out
    first = next(iter(api.labels))
    assert f"undo is not available on this API (DELETE /projects/p/labels/{first} answered {status})" in out
    assert "the label 'dog' stays" in out
    assert list(api.labels.values()) == ["dog", "fox"]
    assert session.labeled == 2 and session.undone == 0


def test_unlabeled_samples_are_handed_back_at_the_end() -> None:
    api = StubApi(CLASSES, n_samples=4)
    s0, s1, s2, s3 = api.samples
    session, _ = run_session(api, ["s", "1"])  # then the input ends while the second batch's first shows
    assert session.labeled == 1 and session.skipped == 1 and list(api.labels) == [s1]
    # The skipped one, the one shown when the input ended, and the one still queued.
    assert api.released == [s0, s2, s3]


def test_an_empty_pool_ends_the_session() -> None:
    api = StubApi(CLASSES, n_samples=1)
    session, out = run_session(api, ["1"])
    assert "nothing left to label" in out and session.labeled == 1


def test_digit_classes_are_their_own_keys_as_on_the_web_page():
    assert class_keys([str(d) for d in range(10)])["3"] == "3"
    assert class_keys(["cat", "dog", "3"]) == {"1": "cat", "2": "dog", "3": "3"}


def test_auto_names_its_representative_picks() -> None:
    class AutoApi(StubApi):
        def json(self, method: str, path: str, **kwargs):
            answer = super().json(method, path, **kwargs)
            if method == "GET" and path.endswith("/queries"):
                for sample in answer["samples"]:
                    sample["score"] = 1.25  # a lifted pick: 1 + its margin
            elif method == "GET" and "project" in answer:
                answer["project"]["strategy"] = "auto"
            return answer

    _, out = run_session(AutoApi(CLASSES), ["q"])
    assert "score 1.250  (representative of the uncertain)" in out
    _, out = run_session(StubApi(CLASSES), ["q"])
    assert "representative" not in out
