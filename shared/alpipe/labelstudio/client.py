"""alpipe's calls into Label Studio's REST API: task images, the task list, predictions, the webhook.

Label Studio has two kinds of API token. A personal access token is a JWT refresh token: it is
exchanged at /api/token/refresh/ for a short-lived access token sent as `Bearer` (and exchanged
again when that expires). A legacy token (what Label Studio itself sends as `access_token` in
/setup) is sent as `Token`; Label Studio refuses it unless legacy tokens are enabled for the
organization.
"""

from __future__ import annotations

import base64
import binascii
import logging
from urllib.parse import quote, urlsplit

import httpx

from ..errors import NotFound, UserError

log = logging.getLogger(__name__)

PAGE_SIZE = 100
# Predictions go to Label Studio in requests of this many tasks.
PREDICTIONS_PER_REQUEST = 500


class LabelStudioError(UserError):
    """Label Studio refused or could not be reached; the message says which call and why."""


class LabelStudioNotFound(LabelStudioError, NotFound):
    """Label Studio has no such task (or project, or file)."""


def _is_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


class LabelStudioClient:
    def __init__(self, url: str, token: str, *, timeout_s: float = 30.0):
        if not url.startswith(("http://", "https://")):
            raise LabelStudioError(f"Label Studio's URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.token = token
        self._access: str | None = None
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, follow_redirects=True)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- authentication -----------------------------------------------------------------------------

    def _auth_header(self, *, renew: bool = False) -> dict[str, str]:
        if not self.token:
            return {}
        if not _is_jwt(self.token):
            return {"Authorization": f"Token {self.token}"}
        if self._access is None or renew:
            answer = self._http.post("/api/token/refresh/", json={"refresh": self.token})
            if answer.status_code != 200:
                raise LabelStudioError(f"Label Studio at {self.url} refused the personal access token "
                                       f"({answer.status_code}: {answer.text[:200]})")
            self._access = answer.json()["access"]
        return {"Authorization": f"Bearer {self._access}"}

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """A call with authentication (renewed once on 401); LabelStudioError for any error answer."""
        try:
            answer = self._http.request(method, path, headers=self._auth_header(), **kwargs)
            if answer.status_code == 401 and _is_jwt(self.token):
                answer = self._http.request(method, path, headers=self._auth_header(renew=True), **kwargs)
        except httpx.HTTPError as e:
            raise LabelStudioError(f"Label Studio at {self.url} is unreachable ({method} {path}): "
                                   f"{e.__class__.__name__}: {e}") from None
        if answer.status_code >= 400:
            hint = (" (give alpipe a personal access token: see the README's Label Studio section)"
                    if answer.status_code == 401 else "")
            error = LabelStudioNotFound if answer.status_code == 404 else LabelStudioError
            raise error(f"Label Studio answered {answer.status_code} to {method} {path}: "
                        f"{answer.text[:300]}{hint}")
        return answer

    # --- tasks and their images ---------------------------------------------------------------------

    def tasks(self, project: int) -> list[dict]:
        """Every task of the project ({id, data, ...})."""
        out: list[dict] = []
        page = 1
        while True:
            try:
                answer = self.request("GET", "/api/tasks/", params={"project": project, "page": page,
                                                                    "page_size": PAGE_SIZE})
            except LabelStudioNotFound:
                if page > 1:
                    break  # past the last page
                raise
            body = answer.json()
            batch = body.get("tasks", []) if isinstance(body, dict) else body
            out.extend(batch)
            total = body.get("total") if isinstance(body, dict) else None
            if not batch or len(batch) < PAGE_SIZE or (total is not None and len(out) >= total):
                break
            page += 1
        return out

    def task(self, task_id: int) -> dict:
        return self.request("GET", f"/api/tasks/{task_id}/").json()

    def annotations(self, task_id: int) -> list[dict]:
        """The task's annotations (skipped ones too), oldest first."""
        return self.request("GET", f"/api/tasks/{task_id}/annotations/").json()

    def image(self, task_id: int, url: str) -> bytes:
        """The bytes behind a task's image URL: Label Studio's own files, any http(s) URL, a data: URI, or a
        cloud-storage URI (s3://, gs://...) that Label Studio resolves for its own storage."""
        if url.startswith("data:"):
            try:
                return base64.b64decode(url.partition(",")[2], validate=False)
            except (binascii.Error, ValueError):
                raise LabelStudioError(f"task {task_id}: its image is a data: URI that is not base64") from None
        parts = urlsplit(url)
        if url.startswith("/"):
            return self.request("GET", url).content
        if parts.scheme in ("http", "https"):
            if f"{parts.scheme}://{parts.netloc}" == f"{urlsplit(self.url).scheme}://{urlsplit(self.url).netloc}":
                return self.request("GET", url).content
            try:
                answer = httpx.get(url, timeout=30.0, follow_redirects=True)
            except httpx.HTTPError as e:
                raise LabelStudioError(f"task {task_id}: its image {url} is unreachable: {e}") from None
            if answer.status_code >= 400:
                raise LabelStudioError(f"task {task_id}: its image {url} answered {answer.status_code}")
            return answer.content
        if parts.scheme:
            encoded = base64.urlsafe_b64encode(url.encode()).decode()
            return self.request("GET", f"/tasks/{task_id}/resolve/?fileuri={quote(encoded)}").content
        raise LabelStudioError(f"task {task_id}: {url!r} is not an image URL (http(s), /data/..., data: or a "
                               "storage URI)")

    # --- what alpipe writes back --------------------------------------------------------------------

    def import_predictions(self, project: int, predictions: list[dict]) -> int:
        """Add predictions ({task, result, score, model_version}) to the project; how many were created."""
        created = 0
        for start in range(0, len(predictions), PREDICTIONS_PER_REQUEST):
            chunk = predictions[start:start + PREDICTIONS_PER_REQUEST]
            answer = self.request("POST", f"/api/projects/{project}/import/predictions", json=chunk)
            body = answer.json() if answer.content else {}
            created += int(body.get("created", len(chunk))) if isinstance(body, dict) else len(chunk)
        return created

    def set_model_version(self, project: int, version: str) -> None:
        self.request("PATCH", f"/api/projects/{project}/", json={"model_version": version})

    def webhooks(self, project: int) -> list[dict]:
        return self.request("GET", "/api/webhooks/", params={"project": project}).json()

    def update_webhook(self, webhook_id: int, **fields: object) -> None:
        self.request("PATCH", f"/api/webhooks/{webhook_id}/", json=fields)

    def create_webhook(self, project: int, url: str, headers: dict[str, str]) -> int:
        answer = self.request("POST", "/api/webhooks/", json={"project": project, "url": url, "headers": headers,
                                                             "send_payload": True, "send_for_all_actions": True})
        return int(answer.json()["id"])
