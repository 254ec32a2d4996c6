"""Request bodies read with a byte limit: nothing past the limit (plus multipart framing) is read."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from starlette.datastructures import FormData
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
