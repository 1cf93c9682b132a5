"""The one mapping of errors to HTTP: every error is ``{"error": {code, message, detail}}``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from countersign.domain.errors import (
    Conflict,
    CountersignError,
    Forbidden,
    InvalidInput,
    NotFound,
    OAuthFailed,
    ProviderUnavailable,
    RateLimited,
    Unauthenticated,
    Unavailable,
)

logger = logging.getLogger("countersign.api")

_STATUS: list[tuple[type[CountersignError], int]] = [
    (NotFound, 404),
    (Conflict, 409),
    (InvalidInput, 422),
    (Unauthenticated, 401),
    (Forbidden, 403),
    (RateLimited, 429),
    (OAuthFailed, 400),
    (ProviderUnavailable, 502),
    (Unavailable, 503),
]

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    429: "too_many_requests",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
}


def error_response(
    status: int,
    code: str,
    message: str,
    detail: Any = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """A JSON error in the one envelope."""
    body = {"error": {"code": code, "message": message, "detail": jsonable_encoder(detail)}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def internal_error_response() -> JSONResponse:
    """The 500 for an error nobody expected; what went wrong goes to the log, not the client."""
    return error_response(500, "internal_error", "an unexpected error happened")


def status_for(error: CountersignError) -> int:
    """The HTTP status for a domain error."""
    for kind, status in _STATUS:
        if isinstance(error, kind):
            return status
    return 500


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the envelope."""

    @app.exception_handler(CountersignError)
    async def _domain(_request: Request, exc: CountersignError) -> JSONResponse:
        status = status_for(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if status == 503:
            headers = {"Retry-After": "1"}
        if isinstance(exc, RateLimited):
            headers = {"Retry-After": str(exc.retry_after)}
        return error_response(status, exc.code, exc.message, exc.detail, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [_problem(error) for error in exc.errors()]
        first = problems[0] if problems else {"field": "", "message": "is invalid"}
        message = f"{first['field'] or 'request'}: {first['message']}"
        return error_response(422, "invalid_input", message, problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        unreadable = _unreadable_json(exc)
        if unreadable is not None:
            # A JSON body the parser gave up on: the same answer as any other body that is
            # not JSON (FastAPI's own is a 400 of another shape).
            message = f"is not valid JSON ({unreadable})"
            problem = {"field": "body", "message": message, "type": "json_invalid"}
            return error_response(422, "invalid_input", f"body: {message}", [problem])
        code = _HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if exc.status_code == 404 and message == "Not Found":
            message = "no such path"
        headers = exc.headers
        if exc.status_code == 405:
            # Every method of the path: Starlette names only the first route that matched it.
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return error_response(exc.status_code, code, message, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc)
        return internal_error_response()


def _unreadable_json(exc: StarletteHTTPException) -> str | None:
    """Why FastAPI could not parse a JSON body, when that is what this 400 is."""
    if exc.status_code != 400:
        return None
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return "not UTF-8"
    if isinstance(cause, RecursionError):
        return "nested too deeply"
    if isinstance(cause, ValueError):
        return "a value too large to read"
    return None


HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    """The methods some route of the app takes on the request's path (asked of the router
    itself, method by method, so that included routers count as well)."""
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]


def _problem(error: Any) -> dict[str, str]:
    if error.get("type") == "json_invalid":
        # FastAPI reports where the JSON broke as the location; say it in words instead.
        loc = error.get("loc", ())
        reason = (error.get("ctx") or {}).get("error", "decode error")
        where = f", at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        return {
            "field": "body",
            "message": f"is not valid JSON ({reason}{where})",
            "type": "json_invalid",
        }
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    message = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
    return {"field": ".".join(location), "message": message, "type": str(error.get("type", ""))}
