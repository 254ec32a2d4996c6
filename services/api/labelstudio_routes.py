"""Label Studio's ML-backend protocol under /labelstudio: paste <alpipe URL>/labelstudio as the model URL
in a Label Studio project (Settings > Model). The work is in alpipe.labelstudio.backend.

Authentication, when alpipe's is on: Label Studio's model settings send Basic auth, whose password
is alpipe's admin token (any user name); its webhook calls carry the bearer secret alpipe gives
them when it syncs (alpipe.labelstudio.sync.secure_webhooks). /labelstudio/health is open, like /health.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Request

from alpipe import access
from alpipe.errors import UserError
from alpipe.labelstudio import backend
from alpipe.labelstudio.backend import PredictRequest, SetupRequest, TrainRequest, WebhookEvent

from .deps import RedisDep, SettingsDep, StoreDep, bearer_or_basic_token, require_admin

log = logging.getLogger("alpipe.api.labelstudio")
router = APIRouter(prefix="/labelstudio", tags=["label studio"])
T = TypeVar("T")


def _logged(what: str, call: Callable[[], T]) -> T:
    """Run the call; a refusal is also logged, because Label Studio shows only the status line of an error
    answer and tells its user to read the model's log."""
    try:
        return call()
    except UserError as e:
        log.warning("Label Studio %s refused: %s", what, e)
        raise
_ADMIN = [Depends(require_admin)]
_ERRORS = {400: {"description": "the request cannot be used (the message says why)"},
           404: {"description": "the Label Studio project (or task) is not connected to alpipe"},
           409: {"description": "the alpipe project is connected elsewhere, or has other classes"},
           422: {"description": "a label config that is not single-image classification, or a bad payload"},
           502: {"description": "Label Studio refused alpipe's call or could not be reached"}}


@router.get("/health")
def health() -> dict[str, Any]:
    """What Label Studio checks (within about a second) before it connects."""
    return {"status": "UP", "model_class": "alpipe", "v2": True}


@router.post("/setup", dependencies=_ADMIN, responses=_ERRORS)
def setup(body: SetupRequest, r: RedisDep, store: StoreDep, settings: SettingsDep) -> dict[str, str]:
    """Connect a Label Studio project: the alpipe project of its classes is made (or reused) and its tasks'
    images are ingested in the background."""
    return _logged("setup", lambda: backend.setup(body, store=store, r=r, settings=settings))


@router.post("/predict", dependencies=_ADMIN, responses=_ERRORS)
def predict(body: PredictRequest, r: RedisDep, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    """alpipe's guess and score for each task, from the live ranking (no model runs in the request)."""
    return _logged("predict", lambda: backend.predict(body, store=store, r=r, settings=settings))


@router.post("/train", dependencies=_ADMIN, responses=_ERRORS)
def train(body: TrainRequest, r: RedisDep, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    """Retrain now (what older Label Studio versions call instead of a START_TRAINING webhook)."""
    return _logged("train", lambda: backend.train(body, store=store, r=r, settings=settings))


@router.post("/webhook", responses={**_ERRORS, 401: {"description": "not Label Studio's webhook secret"}})
def webhook(event: WebhookEvent, request: Request, r: RedisDep, store: StoreDep,
            settings: SettingsDep) -> dict[str, Any]:
    """Annotations created, updated or deleted become votes (the annotator is the Label Studio user);
    START_TRAINING retrains; other events are ignored."""
    if access.auth_enabled(settings) and event.action in backend.HANDLED_ACTIONS:
        token = bearer_or_basic_token(request)
        principal = access.authenticate(settings, token) if token else None
        link = backend.webhook_link(event, store=store, r=r)
        if not (principal is not None and principal.is_admin) and not (
                token and secrets.compare_digest(token.encode(), link.webhook_secret.encode())):
            raise HTTPException(401, "not Label Studio's webhook for this project: alpipe gives that webhook its "
                                     "secret when it syncs; check that alpipe can reach Label Studio with its token")
    return _logged(f"webhook {event.action}", lambda: backend.webhook(event, store=store, r=r, settings=settings))
