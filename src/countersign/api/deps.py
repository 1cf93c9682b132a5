"""Annotated dependencies for routes: the services bundle and the authenticated user.

No dependency here opens a transaction: commits happen inside services, before the response.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request
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


async def get_current_user(
    services: Services,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User:
    """The caller, from ``Authorization: Bearer``; 401 when missing or unknown."""
    if credentials is None:
        raise Unauthenticated("authentication required: send Authorization: Bearer <API key>")
    return await authenticate(services, credential=credentials.credentials)


CurrentUser = Annotated[User, Depends(get_current_user)]


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
