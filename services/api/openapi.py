"""The API's OpenAPI document, made to tell the truth about what the routes answer.

FastAPI derives most of it from the routes; this adds what the app's error handlers and access
control do, which no route declares:
- every error answer is `{"detail": "<what to fix>"}` (the schema `Error`), except request bodies
  and parameters that fail validation, which answer FastAPI's list (`HTTPValidationError`, with a
  `message` for people): a 422 may be either;
- 503 with Retry-After on every route that reads Redis or object storage (an outage);
- 404 on routes that name a project (or sample), 400 for a body that cannot be decoded;
- security only when authentication is on, and never on the public routes; then 401 on the others.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from alpipe.access import auth_enabled
from alpipe.config import Settings

from .deps import is_public

ERROR = {"title": "Error", "type": "object", "required": ["detail"],
         "properties": {"detail": {"type": "string", "description": "what went wrong and how to fix it"}}}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_VALIDATION_REF = {"$ref": "#/components/schemas/HTTPValidationError"}
# Routes that touch neither Redis nor object storage.
_NO_BACKEND = {"/metrics", "/me", "/labelstudio/health"}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _document_errors(path: str, operation: dict[str, Any], *, auth: bool) -> None:
    responses = operation.setdefault("responses", {})
    public = is_public(path)
    if not auth or public:
        operation.pop("security", None)
    elif "401" not in responses:
        responses["401"] = {"description": "missing or unknown token", "content": _json(_ERROR_REF)}
    if path not in _NO_BACKEND:
        responses.setdefault("503", {"description": "Redis or object storage is unavailable: retry after "
                                                    "Retry-After seconds"})
    if "{" in path:
        responses.setdefault("404", {"description": "no such project (or sample, or model version)"})
    if "requestBody" in operation:
        responses.setdefault("400", {"description": "a body that cannot be read (not the declared encoding)"})
    for code, response in responses.items():
        if code == "422":
            response["content"] = _json({"anyOf": [_VALIDATION_REF, _ERROR_REF]})
        elif code[0] in "45" and "content" not in response:
            response["content"] = _json(_ERROR_REF)


def install(app: FastAPI, settings: Settings) -> None:
    """Make app.openapi() return the corrected document (built once)."""
    auth = auth_enabled(settings)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {})
            components.setdefault("schemas", {})["Error"] = ERROR
            if not auth:
                components.pop("securitySchemes", None)
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    _document_errors(path, operation, auth=auth)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
