"""Request bodies read with a byte limit: nothing past the limit (plus multipart framing) is read."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from alpipe.projects import Invalid, TooLarge

FORM_OVERHEAD = 64 * 1024  # multipart framing and small text fields around the file


def check_declared_length(request: Request, limit: int, too_large: TooLarge) -> None:
    """Refuse before reading when Content-Length already says the body is too large."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large


async def capped_stream(request: Request, limit: int, too_large: TooLarge) -> AsyncIterator[bytes]:
    """The body's chunks, raising too_large as soon as more than limit bytes have arrived."""
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_large
        yield chunk


async def parse_capped_form(request: Request, *, max_bytes: int, too_large: TooLarge) -> FormData:
    """A multipart form of one file of at most max_bytes; the caller closes it."""
    limit = max_bytes + FORM_OVERHEAD
    check_declared_length(request, limit, too_large)
    try:
        return await MultiPartParser(request.headers, capped_stream(request, limit, too_large), max_files=1,
                                     max_fields=10, max_part_size=FORM_OVERHEAD).parse()
    except MultiPartException as e:
        raise Invalid(f"malformed multipart body: {e}") from None


@dataclass
class FormFile:
    """The file of a multipart form and the form's text fields (empty ones left out)."""

    data: bytes
    filename: str | None
    fields: dict[str, str]


async def read_form_file(request: Request, *, max_bytes: int, too_large: TooLarge, what: str) -> FormFile:
    """The multipart field `file` (at most max_bytes) and the other fields; `what` names the file in errors."""
    form = await parse_capped_form(request, max_bytes=max_bytes, too_large=too_large)
    try:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise Invalid(f"missing {what}: send it in the multipart form field 'file'")
        data = await file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise too_large
        fields: dict[str, str] = {}
        for key, value in form.multi_items():
            if isinstance(value, str) and value:
                fields.setdefault(key, value)  # the first, as form.get gives
        return FormFile(data=data, filename=file.filename, fields=fields)
    finally:
        await form.close()
