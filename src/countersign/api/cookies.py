"""The web page's login cookies, and the CSRF check that cookie-authenticated requests pass.

A cookie login sets two cookies for the life of its access token:

- ``countersign_session``: the access token; ``HttpOnly``, ``SameSite=Lax``, ``Secure`` in
  ``prod``. Scripts cannot read it.
- ``countersign_csrf``: the login's CSRF token (an HMAC of the access token); readable by the
  page's scripts, which send it back as the ``X-CSRF-Token`` header on POST, PUT, PATCH and
  DELETE.

A cookie-authenticated unsafe request passes only when the header equals the cookie *and* is
the token that belongs to the session's access token (double submit, bound to the session, so
a cookie planted from a sibling domain does not help). Bearer requests need no CSRF token: a
browser never adds an ``Authorization`` header to a cross-site request by itself.
"""

from __future__ import annotations

import hmac

from fastapi import Request, Response

from countersign.config import Profile, Settings
from countersign.domain.errors import CsrfFailed
from countersign.security import csrf_matches, csrf_token
from countersign.services.accounts import IssuedToken

SESSION_COOKIE = "countersign_session"
CSRF_COOKIE = "countersign_csrf"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def set_login_cookies(response: Response, issued: IssuedToken, *, settings: Settings) -> None:
    """Put a login's session and CSRF cookies on the response."""
    secure = settings.profile is Profile.PROD
    response.set_cookie(
        SESSION_COOKIE,
        issued.token,
        expires=issued.expires_at,
        path="/",
        secure=secure,
        httponly=True,
        samesite="lax",
    )
    response.set_cookie(
        CSRF_COOKIE,
        csrf_token(issued.token),
        expires=issued.expires_at,
        path="/",
        secure=secure,
        httponly=False,
        samesite="lax",
    )


def clear_login_cookies(response: Response, *, settings: Settings) -> None:
    """Tell the browser to forget the login cookies."""
    secure = settings.profile is Profile.PROD
    response.delete_cookie(SESSION_COOKIE, path="/", secure=secure, httponly=True, samesite="lax")
    response.delete_cookie(CSRF_COOKIE, path="/", secure=secure, httponly=False, samesite="lax")


def check_csrf(request: Request, *, access_token: str) -> None:
    """CsrfFailed unless X-CSRF-Token equals the CSRF cookie and belongs to the access token."""
    header = request.headers.get(CSRF_HEADER, "").encode()
    cookie = request.cookies.get(CSRF_COOKIE, "").encode()
    # Both comparisons always run: the answer's timing says nothing about which one failed.
    same = hmac.compare_digest(header, cookie)
    bound = csrf_matches(header.decode(), access_token)
    if not header or not (same and bound):
        raise CsrfFailed(
            f"a request authenticated by cookie must send the {CSRF_HEADER} header with the "
            f"value of the {CSRF_COOKIE} cookie"
        )
