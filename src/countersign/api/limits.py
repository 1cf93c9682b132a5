"""The request body limit, answered with 413 in the one error envelope.

Starlette's own limit (``FastAPI(max_body_size=...)``) sits outside the application's
middleware and replaces any answer to an over-long Content-Length with a plain-text 413 that
carries no request id. This middleware goes inside the request-id and metrics middleware, so
the 413 is an ordinary response: enveloped, counted, logged, with ``X-Request-ID``.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from countersign.api.errors import error_response


class BodyTooLarge(HTTPException):
    """The request body is over the limit; the error handlers turn it into a 413 envelope."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body is larger than {max_bytes} bytes")


class BodyLimitMiddleware:
    """Refuses bodies over ``max_bytes``: at once by Content-Length, else while they arrive."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            error = BodyTooLarge(self.max_bytes)
            response = error_response(413, "request_too_large", str(error.detail))
            await response(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, receive_within_limit, send)


def _content_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    if value is None or not value.isdigit():
        return None
    return int(value)
