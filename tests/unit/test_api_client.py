"""alpipe.api_client against a real tiny HTTP server (http.server in a thread, on a free loopback port)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from alpipe.api_client import ApiClient, ApiError
from alpipe.errors import UserError
from tests.helpers import free_port

# path -> (status, content type, body)
ANSWERS = {
    "/projects/nope": (404, "application/json", json.dumps({"detail": "project 'nope' does not exist"})),
    "/crash": (500, "text/plain", "Internal Server Error\n"),
    "/empty": (502, "text/plain", ""),
    "/export": (200, "text/csv", "sample_id,label\na,cat\n"),
}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/me"):  # echo the auth header, to check the token is sent
            status, kind, body = 200, "application/json", json.dumps({"auth": self.headers.get("Authorization")})
        elif self.path.startswith("/admin"):
            status, kind, body = 401, "application/json", json.dumps({"detail": "missing token"})
        else:
            status, kind, body = ANSWERS.get(self.path.split("?")[0], (404, "text/plain", "no route"))
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_json_detail_becomes_the_message_with_the_status(url: str) -> None:
    with ApiClient(url, timeout_s=5) as api, pytest.raises(ApiError) as caught:
        api.json("GET", "/projects/nope")
    assert caught.value.status == 404
    assert str(caught.value) == "GET /projects/nope failed (404): project 'nope' does not exist"
    assert isinstance(caught.value, UserError)  # the CLI prints it as one line


def test_a_non_json_error_reads_as_its_text_or_reason(url: str) -> None:
    with ApiClient(url, timeout_s=5) as api:
        with pytest.raises(ApiError, match=r"^GET /crash failed \(500\): Internal Server Error$") as caught:
            api.request("GET", "/crash")
        assert caught.value.status == 500
        with pytest.raises(ApiError, match=r"^GET /empty failed \(502\): Bad Gateway$"):
            api.json("GET", "/empty")


def test_token_and_auth_hint(url: str) -> None:
    with ApiClient(url + "/", timeout_s=5, token="s3cret") as api:
        assert api.json("GET", "/me") == {"auth": "Bearer s3cret"}
        assert api.url("/x") == url + "/x"
        with pytest.raises(ApiError, match=r"failed \(401\): missing token \(pass --token or set ALPIPE_TOKEN\)$"):
            api.json("GET", "/admin")
    with ApiClient(url, timeout_s=5) as api:
        assert api.json("GET", "/me") == {"auth": None}
    # A command without --token (simulate --api) names the way its user has.
    with ApiClient(url, timeout_s=5, token_hint="set ALPIPE_TOKEN") as api:
        with pytest.raises(ApiError, match=r"failed \(401\): missing token \(set ALPIPE_TOKEN\)$"):
            api.json("GET", "/admin")


def test_download_is_whole_or_nothing(url: str, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "labels.csv"
    with ApiClient(url, timeout_s=5) as api:
        assert api.download("/export", out, params={"format": "csv"}) == len(ANSWERS["/export"][2])
        assert out.read_text() == ANSWERS["/export"][2]
        with pytest.raises(ApiError, match=r"failed \(500\)"):
            api.download("/crash", tmp_path / "failed.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # neither the file nor its .part


def test_an_unreachable_api_is_a_user_error_not_an_api_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with ApiClient(url, timeout_s=5) as api, pytest.raises(UserError, match="cannot reach the alpipe API") as caught:
        api.json("GET", "/health")
    assert not isinstance(caught.value, ApiError)
