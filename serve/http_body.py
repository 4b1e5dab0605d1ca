"""Reading a request body at the ingress: size-capped before parsing, and time-capped, so a client
that sends slowly (or never finishes) cannot hold an ingress slot for as long as it likes."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request

from serve.http_errors import ApiError, bad_request, too_large
from serve.image_requests import MAX_UPLOAD_BYTES, Upload, require_multipart

MAX_JSON_BYTES = 1024 * 1024
MAX_FORM_BYTES = 2 * MAX_UPLOAD_BYTES + 256 * 1024  # image + mask + the small fields


def body_timeout(seconds: float) -> ApiError:
    return ApiError(408, f"The request body was not received within {seconds:.0f} s", None, "request_timeout")


async def read_body(request: Request, limit: int, what: str, timeout_s: float) -> bytes:
    """The request body, refusing (413) anything over ``limit`` without reading it all, and (408)
    a body that takes longer than ``timeout_s`` to arrive."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(f"The {what} is {int(declared)} bytes; the limit is {limit} bytes")

    async def read() -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise too_large(f"The {what} is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise body_timeout(timeout_s) from None


async def read_form(request: Request, timeout_s: float) -> dict[str, Any]:
    """A multipart form as {name: str | Upload}, the body size and time capped before parsing."""
    require_multipart(request.headers.get("content-type", ""))
    body = await read_body(request, MAX_FORM_BYTES, "upload", timeout_s)

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=32)
    except Exception:
        raise bad_request("The multipart/form-data body could not be parsed") from None
    try:
        values: dict[str, Any] = {}
        for name, value in form.multi_items():
            if name in values:
                raise bad_request(f"'{name}' was sent more than once", name)
            if isinstance(value, str):
                values[name] = value
            else:
                values[name] = Upload(value.filename or "", value.content_type or "", await value.read())
        return values
    finally:
        await form.close()
