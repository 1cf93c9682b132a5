"""``/auth``: register, log in (a bearer token, and cookies for the web page), log out.

Registering and logging in need no credentials; both are rate limited per client address and
per email. ``login_response`` turns an issued token into the login answer, so that other ways
of logging in (OAuth callbacks) answer the same way.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import JSONResponse

from countersign.api.cookies import clear_login_cookies, set_login_cookies
from countersign.api.deps import AuthenticatedRoute, CurrentCaller, RateLimiting, Services
from countersign.api.ratelimit import client_address
from countersign.api.routes import API_PREFIX
from countersign.api.schemas import (
    API_ERRORS,
    AccessTokenOut,
    ErrorBody,
    LoginCreate,
    SignInProviderOut,
    SignInProvidersOut,
    UserCreate,
    UserOut,
)
from countersign.config import Settings
from countersign.domain.errors import Unauthenticated
from countersign.services import accounts
from countersign.services.accounts import IssuedToken

router = APIRouter(
    prefix=f"{API_PREFIX}/auth",
    tags=["auth"],
    responses={413: {"model": ErrorBody, "description": "The request body is over the size limit"}},
)

RATE_LIMITED: dict[int | str, dict[str, Any]] = {
    429: {"model": ErrorBody, "description": "Too many attempts; see `Retry-After`"},
    422: {"model": ErrorBody, "description": "Invalid input"},
}


@router.get("/providers")
async def sign_in_providers(services: Services) -> SignInProvidersOut:
    """Public: the configured sign-in providers (one button each on a login page), and whether
    registration is open."""
    return SignInProvidersOut(
        items=[
            SignInProviderOut(
                name=name,
                kind=provider.kind.value,
                login_url=f"{API_PREFIX}/auth/oauth/{name}/login",
            )
            for name, provider in sorted(services.settings.oauth_providers.items())
        ],
        registration_open=services.settings.registration_open,
    )


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    responses={
        **RATE_LIMITED,
        403: {"model": ErrorBody, "description": "Registration is closed on this server"},
        409: {"model": ErrorBody, "description": "The email is taken"},
    },
)
async def register(
    body: UserCreate, request: Request, services: Services, rate_limits: RateLimiting
) -> UserOut:
    """Create an account. Open in the `dev` profile; in `prod` when `OPEN_REGISTRATION` is set."""
    await rate_limits.registration_attempt(client=client_address(request), email=body.email)
    user = await accounts.register_user(services, email=body.email, password=body.password)
    return UserOut.model_validate(user)


@router.post(
    "/login",
    response_model=AccessTokenOut,
    responses={
        **RATE_LIMITED,
        401: {"model": ErrorBody, "description": "The email or password is not correct"},
    },
)
async def login(
    body: LoginCreate, request: Request, services: Services, rate_limits: RateLimiting
) -> Response:
    """Exchange an email and password for an access token (`cookie: true` also sets cookies).

    An unknown email and a wrong password get the same answer.
    """
    await rate_limits.login_attempt(client=client_address(request), email=body.email)
    try:
        issued = await accounts.log_in(services, email=body.email, password=body.password)
    except Unauthenticated:
        await rate_limits.login_failed(email=body.email)
        raise
    return login_response(issued, settings=services.settings, cookie=body.cookie)


def login_response(issued: IssuedToken, *, settings: Settings, cookie: bool) -> JSONResponse:
    """The answer to a successful login: the token, and with ``cookie`` the login cookies."""
    body = AccessTokenOut(access_token=issued.token, expires_at=issued.expires_at)
    # The token is a credential: no cache (or proxy) may keep the answer.
    response = JSONResponse(body.model_dump(mode="json"), headers={"Cache-Control": "no-store"})
    if cookie:
        set_login_cookies(response, issued, settings=settings)
    return response


async def logout(caller: CurrentCaller, services: Services) -> Response:
    """Revoke the access token of this request (Bearer or cookie) and clear the login cookies."""
    await accounts.log_out(services, caller=caller)
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    clear_login_cookies(response, settings=services.settings)
    return response


router.add_api_route(
    "/logout",
    logout,
    methods=["POST"],
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={
        **API_ERRORS,
        403: {"model": ErrorBody, "description": "Cookie without its CSRF token"},
    },
    # Authenticated before anything else, like every route that needs a caller.
    route_class_override=AuthenticatedRoute,
)
