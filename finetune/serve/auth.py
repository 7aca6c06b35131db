"""API key authentication: `Authorization: Bearer KEY` on every request but /health and the playground page (GET /),
which asks for the key and sends it with its API requests."""

from __future__ import annotations

import hmac
from typing import Any

from starlette.datastructures import Headers

from finetune.serve.errors import error_response

OPEN_PATHS = ("/health", "/")


class ApiKeyMiddleware:
    """401 for any request but OPEN_PATHS without `Authorization: Bearer KEY` (checked before the body is read)."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = Headers(scope=scope).get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                response = error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                          code="invalid_api_key", kind="authentication_error")
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
