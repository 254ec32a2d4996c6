"""The one HTTP client of the alpipe API, used by `alpipe simulate --api/--stack`, `alpipe label` and `alpipe export`.

It imports httpx only (no torch), so the terminal commands start fast.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from .errors import UserError

# What the user can do about a refusal; said after the API's own reason. A 401's depends on the command
# (ApiClient's token_hint): `alpipe label` has --token, `simulate --api` reads ALPIPE_TOKEN only.
TOKEN_HINT = "pass --token or set ALPIPE_TOKEN"
_FORBIDDEN_HINT = "this token may not do that"


class ApiError(UserError):
    """A non-2xx answer of the API; the message is the API's own, status the HTTP status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def api_error(method: str, path: str, response: httpx.Response, *, token_hint: str = TOKEN_HINT) -> ApiError:
    """The ApiError for a read non-2xx response: `METHOD path failed (status): reason (hint)`, reason being
    the body's `message` or `detail` (FastAPI's), else the body as text, else the status's reason phrase;
    a 401 or 403 ends with what to do about it."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = (body.get("message") or body.get("detail")) if isinstance(body, dict) else None
    detail = detail or response.text.strip() or response.reason_phrase
    hint = {401: token_hint, 403: _FORBIDDEN_HINT}.get(response.status_code)
    return ApiError(f"{method} {path} failed ({response.status_code}): {detail}" + (f" ({hint})" if hint else ""),
                    response.status_code)


class ApiClient:
    """Client of the alpipe API: the bearer token on every request; a non-2xx answer raises ApiError and an
    unreachable API a UserError, each one line. No retries: the callers that wait on the API poll themselves.

    timeout_s is each caller's choice (a whole export can take minutes, a label call should not); token_hint
    says how this command's user passes a token, after a 401.
    """

    def __init__(self, base_url: str, *, timeout_s: float, token: str = "", token_hint: str = TOKEN_HINT):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self.token_hint = token_hint
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def url(self, path: str) -> str:
        """The absolute URL of an API path (to print, or to open in a browser)."""
        return self.base_url + path

    def _unreachable(self, error: httpx.TransportError) -> UserError:
        return UserError(f"cannot reach the alpipe API at {self.base_url}: {error}")

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """The 2xx response to one request (kwargs as httpx's: params, json, files...), e.g. for an image."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise self._unreachable(e) from None
        if response.status_code >= 400:
            raise api_error(method, path, response, token_hint=self.token_hint)
        return response

    def json(self, method: str, path: str, **kwargs):
        """The parsed JSON body of a 2xx answer."""
        return self.request(method, path, **kwargs).json()

    def download(self, path: str, out: Path, *, params: dict | None = None) -> int:
        """Stream GET path into the file out (written whole or not at all); bytes written."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.part")
        try:
            with self.http.stream("GET", path, params=params) as response:
                if response.status_code >= 400:
                    response.read()
                    raise api_error("GET", path, response, token_hint=self.token_hint)
                size = 0
                with open(partial, "wb") as f:
                    for chunk in response.iter_bytes():
                        f.write(chunk)
                        size += len(chunk)
            partial.replace(out)
            return size
        except httpx.TransportError as e:
            raise self._unreachable(e) from None
        finally:
            partial.unlink(missing_ok=True)
