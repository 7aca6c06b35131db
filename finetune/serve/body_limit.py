"""A bound on request bodies, declared (Content-Length) or not (chunked): a 413 in the OpenAI error shape, with
nothing past the limit read."""

from __future__ import annotations

from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

MAX_BODY_BYTES = 4 * 1024 * 1024


class BodyLimit:
    """While the app reads a request body, raise a 413 HTTPException (the app's handler answers it as JSON): at once
    when Content-Length is over `limit` bytes, otherwise as soon as the bytes received are."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        received = 0

        async def limited() -> dict:
            nonlocal received
            if declared.isdigit() and int(declared) > self.limit:
                raise self.too_large()
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise self.too_large()
            return message

        await self.app(scope, limited, send)

    def too_large(self) -> HTTPException:
        return HTTPException(413, f"the request body is over this server's limit of {self.limit} bytes")
