"""Annotated dependencies for routes: the services bundle and the authenticated user.

No dependency here opens a transaction: commits happen inside services, before the response.
Routes that need a user use ``AuthenticatedRoute``, so that the caller is known before the
body is read: bad credentials answer 401 even when the body is broken too.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from countersign.domain.errors import InvalidInput, Unauthenticated
from countersign.domain.models import User
from countersign.services import ServiceDeps
from countersign.services.accounts import authenticate
from countersign.services.idempotency import KEY_MAX_LENGTH

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer cs_…`")


def get_services(request: Request) -> ServiceDeps:
    """The ServiceDeps built by the application's lifespan."""
    services: ServiceDeps = request.app.state.services
    return services


Services = Annotated[ServiceDeps, Depends(get_services)]


async def authenticate_request(request: Request) -> User:
    """The caller, from ``Authorization: Bearer``; Unauthenticated when missing or unknown.

    The user is kept on the request, so that the route and its dependency look it up once.
    """
    known: User | None = getattr(request.state, "user", None)
    if known is not None:
        return known
    credentials = await _bearer(request)
    if credentials is None:
        raise Unauthenticated("authentication required: send Authorization: Bearer <API key>")
    user = await authenticate(get_services(request), credential=credentials.credentials)
    request.state.user = user
    return user


async def get_current_user(
    request: Request,
    # Declared for the OpenAPI security scheme; authenticate_request reads the header itself.
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User:
    """The caller, from ``Authorization: Bearer``; 401 when missing or unknown."""
    return await authenticate_request(request)


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
        ),
    ] = None,
) -> str | None:
    """The request's Idempotency-Key header, if any."""
    if idempotency_key is not None and not 0 < len(idempotency_key.strip()) <= KEY_MAX_LENGTH:
        raise InvalidInput(f"Idempotency-Key must be 1 to {KEY_MAX_LENGTH} characters")
    return idempotency_key


IdempotencyKey = Annotated[str | None, Depends(get_idempotency_key)]
