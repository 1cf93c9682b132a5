"""``/auth/oauth/{provider}``: log in with an OAuth 2 / OpenID Connect provider.

``GET …/login`` sends the browser to the provider; the provider sends it back to
``GET …/callback``, which logs the user in like a password login with ``cookie: true`` (the
session and CSRF cookies) and redirects (303) to ``/`` or to the ``next`` path given to
``…/login``. The protocol work is in ``api/oauth.py``; the accounts in
``services/identities.py``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.responses import RedirectResponse

from countersign.api.cookies import set_login_cookies
from countersign.api.deps import RateLimiting, Services
from countersign.api.oauth import (
    NEXT_MAX_LENGTH,
    OAUTH_PREFIX,
    OAuthProviders,
    ProviderClient,
    safe_next_path,
)
from countersign.api.ratelimit import client_address
from countersign.api.schemas import ErrorBody
from countersign.config import Settings
from countersign.domain.errors import OAuthFailed, ProviderUnavailable
from countersign.services import identities

router = APIRouter(prefix=OAUTH_PREFIX, tags=["auth"])

NO_STORE = {"Cache-Control": "no-store"}
PROVIDER_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No provider of this name is configured"},
    422: {"model": ErrorBody, "description": "Invalid input"},
    502: {"model": ErrorBody, "description": "The provider cannot be reached"},
}
"""What both routes may answer besides their redirect. Neither takes credentials (no 401)."""


def get_oauth_providers(request: Request) -> OAuthProviders:
    """The sign-in providers built by ``create_app``."""
    providers: OAuthProviders = request.app.state.oauth_providers
    return providers


Providers = Annotated[OAuthProviders, Depends(get_oauth_providers)]


def redirect_uri(request: Request, provider: str, settings: Settings) -> str:
    """The callback URL the provider sends the browser back to (register it there)."""
    if settings.public_url is not None:
        return f"{settings.public_url}{OAUTH_PREFIX}/{provider}/callback"
    return str(request.url_for("oauth_callback", provider=provider))


@router.get(
    "/{provider}/login",
    status_code=status.HTTP_302_FOUND,
    response_class=RedirectResponse,
    responses={
        **PROVIDER_ERRORS,
        302: {"description": "To the provider's sign-in page"},
        422: {"model": ErrorBody, "description": "`next` is not a path on this server"},
    },
)
async def oauth_login(
    provider: str,
    request: Request,
    providers: Providers,
    services: Services,
    next_path: Annotated[
        str | None,
        Query(
            alias="next",
            max_length=NEXT_MAX_LENGTH,
            description="Where to go after logging in: a path on this server, e.g. `/`.",
        ),
    ] = None,
) -> RedirectResponse:
    """Start a login with this provider: a redirect to its sign-in page."""
    client: ProviderClient = providers.get(provider)
    target = safe_next_path(next_path)
    url = await client.begin(
        request,
        redirect_uri=redirect_uri(request, client.name, services.settings),
        next_path=target,
    )
    return RedirectResponse(url, status_code=status.HTTP_302_FOUND, headers=NO_STORE)


@router.get(
    "/{provider}/callback",
    name="oauth_callback",
    status_code=status.HTTP_303_SEE_OTHER,
    response_class=RedirectResponse,
    responses={
        **PROVIDER_ERRORS,
        303: {"description": "Logged in (cookies set); to `/` or the `next` path"},
        400: {"model": ErrorBody, "description": "The login failed; the message says why"},
        429: {"model": ErrorBody, "description": "Too many logins from this address"},
    },
)
async def oauth_callback(
    provider: str,
    request: Request,
    providers: Providers,
    services: Services,
    rate_limits: RateLimiting,
) -> RedirectResponse:
    """Where the provider sends the browser back: check everything, log in, redirect."""
    client = providers.get(provider)
    await rate_limits.provider_login_attempt(client=client_address(request))
    try:
        profile, next_path = await client.finish(request)
        login = await identities.log_in_with_provider(services, profile=profile)
    except (OAuthFailed, ProviderUnavailable) as error:
        identities.record_failed_provider_login(provider=client.name, reason=error.message)
        raise
    response = RedirectResponse(next_path, status_code=status.HTTP_303_SEE_OTHER, headers=NO_STORE)
    set_login_cookies(response, login.issued, settings=services.settings)
    return response
