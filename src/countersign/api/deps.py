"""Annotated dependencies for routes: the services bundle and the authenticated caller.

No dependency here opens a transaction: commits happen inside services, before the response.
Routes that need a user use ``AuthenticatedRoute``, so that the caller is known before the
body is read: bad credentials answer 401 even when the body is broken too.

A caller authenticates with ``Authorization: Bearer <access token or API key>`` or, from the
web page, with the session cookie. An ``Authorization`` header, when sent, is the only
credential looked at. Credentials are checked first (401), then, for a cookie on an unsafe
method, the CSRF token (403 ``csrf_failed``); see ``api/cookies.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from countersign.api.cookies import SAFE_METHODS, SESSION_COOKIE, check_csrf
from countersign.api.ratelimit import RateLimits, get_rate_limits
from countersign.domain.errors import InvalidInput, Unauthenticated
from countersign.domain.models import User
from countersign.services import ServiceDeps
from countersign.services.accounts import Caller, authenticate
from countersign.services.idempotency import KEY_MAX_LENGTH

_bearer = HTTPBearer(
    auto_error=False,
    description="An access token from `POST /auth/login`, or an API key (`cs_…`).",
)
_session_cookie = APIKeyCookie(
    name=SESSION_COOKIE,
    auto_error=False,
    description="The web page's login cookie; unsafe methods also need `X-CSRF-Token`.",
)
AUTHENTICATION_REQUIRED = (
    "authentication required: send Authorization: Bearer <access token or API key>"
)


def get_services(request: Request) -> ServiceDeps:
    """The ServiceDeps built by the application's lifespan."""
    services: ServiceDeps = request.app.state.services
    return services


Services = Annotated[ServiceDeps, Depends(get_services)]
RateLimiting = Annotated[RateLimits, Depends(get_rate_limits)]


async def authenticate_request(request: Request) -> Caller:
    """The caller, from the bearer credential or the session cookie (CSRF-checked).

    Unauthenticated when the credential is missing or not valid; CsrfFailed when a cookie
    comes on an unsafe method without its CSRF token. The caller is kept on the request, so
    that the route and its dependencies look it up once.
    """
    known: Caller | None = getattr(request.state, "caller", None)
    if known is not None:
        return known
    credential = request_credential(request)
    caller = await authenticate(get_services(request), credential=credential)
    if request.headers.get("Authorization") is None and request.method not in SAFE_METHODS:
        check_csrf(request, access_token=credential)
    request.state.caller = caller
    return caller


def request_credential(request: Request) -> str:
    """The request's bearer credential, else its login cookie; Unauthenticated if neither."""
    authorization = request.headers.get("Authorization")
    if authorization is not None:
        scheme, _, credential = authorization.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise Unauthenticated(AUTHENTICATION_REQUIRED)
        return credential
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise Unauthenticated(AUTHENTICATION_REQUIRED)
    return token


async def get_current_caller(
    request: Request,
    # Declared for the OpenAPI security schemes; authenticate_request reads the request itself.
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    _cookie: Annotated[str | None, Depends(_session_cookie)],
) -> Caller:
    """The caller and the credential they used; 401 when missing or not valid."""
    return await authenticate_request(request)


CurrentCaller = Annotated[Caller, Depends(get_current_caller)]


async def get_current_user(caller: CurrentCaller) -> User:
    """The calling user; 401 when the credentials are missing or not valid."""
    return caller.user


CurrentUser = Annotated[User, Depends(get_current_user)]


class AuthenticatedRoute(APIRoute):
    """A route whose caller is authenticated before its body is read (401 comes before 422)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """FastAPI's handler, behind an authentication check."""
        handle = super().get_route_handler()

        async def handle_authenticated(request: Request) -> Response:
            await authenticate_request(request)
            return await handle(request)

        return handle_authenticated


def get_idempotency_key(
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Retry-safe key: a repeat returns the first response.",
            # Checked below, with the envelope's own sentence; here for the OpenAPI.
            json_schema_extra={"minLength": 1, "maxLength": KEY_MAX_LENGTH, "pattern": r"\S"},
        ),
    ] = None,
) -> str | None:
    """The request's Idempotency-Key header, if any."""
    if idempotency_key is not None and not (
        0 < len(idempotency_key) <= KEY_MAX_LENGTH and idempotency_key.strip()
    ):
        raise InvalidInput(f"Idempotency-Key must be 1 to {KEY_MAX_LENGTH} characters")
    return idempotency_key


IdempotencyKey = Annotated[str | None, Depends(get_idempotency_key)]
