"""Logging in with OAuth 2 / OpenID Connect providers, end to end, on both databases.

The provider is ``tests/support/fake_idp.py``: a real HTTP server on 127.0.0.1 that signs real
RS256 ID tokens. A test plays the browser: it asks our app for ``…/login``, follows the
redirect to the fake provider with a separate real HTTP client, and brings the code and state
back to our ``…/callback`` with the OAuth session cookie it was given. Rows are counted in the
real database.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, table, text
from sqlalchemy.ext.asyncio import create_async_engine

from countersign.config import normalise_database_url
from countersign.services.accounts import create_user
from tests.api.test_auth import (
    PASSWORD,
    client_for,
    new_email,
    register,
    retry_after,
    serve,
    set_cookies,
)
from tests.api.test_errors import assert_error
from tests.support.databases import TestDatabase
from tests.support.fake_idp import FakeIdP, FakeUser, s256
from tests.support.postgres import free_port

OAUTH = "/api/v1/auth/oauth"
OAUTH_COOKIE = "countersign_oauth"
SESSION = "countersign_session"
CSRF = "countersign_csrf"
APP_URL = "http://countersign.test"
TABLES = ("users", "identities", "access_tokens")


# --- the pieces a test is made of ----------------------------------------------------------


@pytest.fixture
def idp() -> Iterator[FakeIdP]:
    """A fake provider on a port of its own, stopped (bounded) after the test."""
    with FakeIdP() as server:
        yield server


def providers(idp: FakeIdP) -> dict[str, Any]:
    """One provider of each kind, all pointing at the fake."""
    return {
        "corp": idp.provider("oidc"),
        "google": idp.provider("google"),
        "github": idp.provider("github"),
        "kakao": idp.provider("kakao"),
    }


@asynccontextmanager
async def serve_oauth(
    database: TestDatabase, tmp_path: Path, idp: FakeIdP, **overrides: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The real app with the fake's providers, and a browser-like client (keeps cookies)."""
    overrides.setdefault("oauth_providers", providers(idp))
    async with serve(database, tmp_path, **overrides) as (app, browser):
        yield app, browser


@pytest.fixture
async def browser(
    database: TestDatabase, tmp_path: Path, idp: FakeIdP
) -> AsyncIterator[httpx.AsyncClient]:
    async with serve_oauth(database, tmp_path, idp) as (_app, http):
        yield http


@dataclass(frozen=True)
class Started:
    """Our answer to ``…/login``."""

    response: httpx.Response
    authorize_url: str
    oauth_cookie: str

    @property
    def params(self) -> dict[str, str]:
        """The authorization request's parameters, as the provider receives them."""
        return {
            key: values[0] for key, values in parse_qs(urlsplit(self.authorize_url).query).items()
        }


async def start(browser: httpx.AsyncClient, provider: str, **params: str) -> Started:
    response = await browser.get(f"{OAUTH}/{provider}/login", params=params)
    assert response.status_code == 302, response.text
    assert response.headers["cache-control"] == "no-store"
    cookie = set_cookies(response)[OAUTH_COOKIE].value
    return Started(response, response.headers["location"], cookie)


async def consent(authorize_url: str) -> str:
    """The browser at the provider: it consents at once and is sent to our callback."""
    async with httpx.AsyncClient(timeout=10) as at_provider:
        response = await at_provider.get(authorize_url)
    assert response.status_code == 302, response.text
    callback: str = response.headers["location"]
    assert callback.startswith(f"{APP_URL}{OAUTH}/"), callback
    return callback


async def log_in(browser: httpx.AsyncClient, provider: str, **params: str) -> httpx.Response:
    """A whole login; the callback's answer."""
    started = await start(browser, provider, **params)
    return await browser.get(await consent(started.authorize_url))


def logged_in(response: httpx.Response, *, location: str = "/") -> str:
    """Assert a successful callback (303, login cookies, OAuth state cleared); the token."""
    assert response.status_code == 303, response.text
    assert response.headers["location"] == location
    assert response.headers["cache-control"] == "no-store"
    cookies = set_cookies(response)
    assert cookies[SESSION]["httponly"] is True
    assert cookies[SESSION]["samesite"].lower() == "lax"
    assert cookies[CSRF].value
    assert cookies[OAUTH_COOKIE]["expires"].startswith("Thu, 01 Jan 1970")  # state is spent
    token: str = cookies[SESSION].value
    return token


async def me(browser: httpx.AsyncClient) -> dict[str, Any]:
    response = await browser.get("/api/v1/me")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def with_query(url: str, **changes: str | None) -> str:
    """``url`` with query parameters replaced (or removed, for None)."""
    parts = urlsplit(url)
    query = {key: values[0] for key, values in parse_qs(parts.query).items()}
    for key, value in changes.items():
        if value is None:
            query.pop(key, None)
        else:
            query[key] = value
    return urlunsplit(parts._replace(query=urlencode(query)))


async def row_counts(database: TestDatabase) -> dict[str, int]:
    """Rows in users, identities and access_tokens, read from the database itself."""
    engine = create_async_engine(normalise_database_url(database.url))
    try:
        async with engine.connect() as connection:
            return {
                name: int(
                    (
                        await connection.execute(select(func.count()).select_from(table(name)))
                    ).scalar_one()
                )
                for name in TABLES
            }
    finally:
        await engine.dispose()


async def query(database: TestDatabase, sql: str, **params: Any) -> list[dict[str, Any]]:
    engine = create_async_engine(normalise_database_url(database.url))
    try:
        async with engine.connect() as connection:
            result = await connection.execute(text(sql), params)
            return [dict(row._mapping) for row in result]
    finally:
        await engine.dispose()


async def identity(database: TestDatabase, provider: str, subject: str) -> dict[str, Any]:
    """The identities row of this provider + subject, with its user's email."""
    rows = await query(
        database,
        "SELECT i.user_id, i.email, u.email AS user_email, u.password_hash "
        "FROM identities i JOIN users u ON u.id = i.user_id "
        "WHERE i.provider = :provider AND i.subject = :subject",
        provider=provider,
        subject=subject,
    )
    assert len(rows) == 1, rows
    row = rows[0]
    row["user_id"] = str(uuid.UUID(str(row["user_id"])))
    return row


def grew(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in TABLES}


# --- happy paths ---------------------------------------------------------------------------


async def test_oidc_login_creates_a_user_and_its_identity_and_logs_in(
    browser: httpx.AsyncClient, idp: FakeIdP, database: TestDatabase
) -> None:
    """A first login makes one user (with the verified email), one identity and one token; the
    cookie logs the browser in (reads, and writes with the CSRF token); a second login finds
    the same user and adds only a token."""
    email = new_email()
    idp.user = FakeUser(email=email.upper())
    before = await row_counts(database)

    started = await start(browser, "corp")
    oauth_cookie = set_cookies(started.response)[OAUTH_COOKIE]
    assert oauth_cookie["httponly"] is True
    assert oauth_cookie["samesite"].lower() == "lax"
    assert oauth_cookie["path"] == OAUTH
    assert oauth_cookie["max-age"] == "900"
    assert not oauth_cookie["secure"]  # dev serves plain http
    asked = started.params
    assert asked["redirect_uri"] == f"{APP_URL}{OAUTH}/corp/callback"
    assert asked["scope"].split() == ["openid", "email", "profile"]
    assert asked["code_challenge_method"] == "S256"
    assert asked["state"]
    assert asked["nonce"]
    assert asked["code_challenge"]

    token = logged_in(await browser.get(await consent(started.authorize_url)))
    user = await me(browser)
    assert user["email"] == email.lower()
    assert grew(before, await row_counts(database)) == {
        "users": 1,
        "identities": 1,
        "access_tokens": 1,
    }
    row = await identity(database, "corp", idp.user.subject)
    assert row["user_id"] == user["id"]
    assert row["password_hash"] is None
    assert row["email"] == email.lower()

    # The token request carried the PKCE verifier of the challenge, and the client's secret
    # in an Authorization header (client_secret_basic).
    exchange = idp.token_requests[-1]
    assert s256(exchange.form["code_verifier"]) == asked["code_challenge"]
    assert exchange.basic_auth
    assert "client_secret" not in exchange.form

    # The login cookie is a real login: reads by cookie, writes with the CSRF token.
    csrf = browser.cookies[CSRF]
    created = await browser.post(
        "/api/v1/sessions", json={"title": "by oauth"}, headers={"X-CSRF-Token": csrf}
    )
    assert created.status_code == 201, created.text
    by_bearer = await client_for_token(browser, token)
    assert by_bearer["id"] == user["id"]

    browser.cookies.clear()
    logged_in(await log_in(browser, "corp"))
    assert (await me(browser))["id"] == user["id"]
    assert grew(before, await row_counts(database)) == {
        "users": 1,
        "identities": 1,
        "access_tokens": 2,
    }


async def client_for_token(browser: httpx.AsyncClient, token: str) -> dict[str, Any]:
    # With an Authorization header, it is the only credential looked at (not the cookie).
    response = await browser.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_a_verified_email_links_to_the_existing_operator_made_user(
    database: TestDatabase, tmp_path: Path, idp: FakeIdP
) -> None:
    """The provider's verified email, in another case, is the email of an account an operator
    made (so the address is vouched for): the identity is linked to that user, no user is
    made, and the password keeps working."""
    email = new_email()
    async with serve_oauth(database, tmp_path, idp) as (app, browser):
        made = await create_user(
            app.state.services, email=email, password=PASSWORD, email_verified=True
        )
        idp.user = FakeUser(email=f"  {email.upper()} ", email_verified=True)
        before = await row_counts(database)

        logged_in(await log_in(browser, "corp"))
        assert (await me(browser))["id"] == str(made.id)
        assert grew(before, await row_counts(database)) == {
            "users": 0,
            "identities": 1,
            "access_tokens": 1,
        }
        assert (await identity(database, "corp", idp.user.subject))["user_id"] == str(made.id)
        password_login = await browser.post(
            "/api/v1/auth/login", json={"email": email, "password": PASSWORD}
        )
        assert password_login.status_code == 200, password_login.text


async def test_a_self_registered_email_is_never_linked(
    browser: httpx.AsyncClient, idp: FakeIdP, database: TestDatabase
) -> None:
    """Registration checks no email: someone may register another person's address and wait
    for them to sign in with a provider. That login is refused (400), nothing is written, and
    the registered account is not reachable through the provider."""
    email = new_email()
    await register(browser, email)
    idp.user = FakeUser(email=email, email_verified=True)
    before = await row_counts(database)

    response = await log_in(browser, "corp")

    error = assert_error(response, 400, "oauth_failed")
    assert "never verified" in error["message"]
    assert SESSION not in set_cookies(response)
    assert await row_counts(database) == before
    assert_error(await browser.get("/api/v1/me"), 401, "unauthenticated")


async def test_an_account_linked_to_another_subject_of_the_provider_is_not_linked_again(
    database: TestDatabase, tmp_path: Path, idp: FakeIdP
) -> None:
    """The address moved to another account at the provider: the second subject does not get
    into the first one's account."""
    email = new_email()
    async with serve_oauth(database, tmp_path, idp) as (_app, browser):
        idp.user = FakeUser(email=email, email_verified=True)
        logged_in(await log_in(browser, "corp"))
        first = await me(browser)
        browser.cookies.clear()
        idp.user = FakeUser(email=email, email_verified=True)  # a new subject
        before = await row_counts(database)

        response = await log_in(browser, "corp")

        error = assert_error(response, 400, "oauth_failed")
        assert "another corp account" in error["message"]
        assert await row_counts(database) == before
        assert first["email"] == email


async def test_an_unverified_email_does_not_link(
    browser: httpx.AsyncClient, idp: FakeIdP, database: TestDatabase
) -> None:
    """An unverified email equal to an account's makes a new user without an email; the
    identity keeps the address the provider gave."""
    email = new_email()
    registered = await register(browser, email)
    idp.user = FakeUser(email=email, email_verified=False)
    before = await row_counts(database)

    logged_in(await log_in(browser, "corp"))
    user = await me(browser)
    assert user["id"] != registered["id"]
    assert user["email"] is None
    assert grew(before, await row_counts(database)) == {
        "users": 1,
        "identities": 1,
        "access_tokens": 1,
    }
    row = await identity(database, "corp", idp.user.subject)
    assert (row["email"], row["user_email"]) == (email, None)


async def test_google_preset(browser: httpx.AsyncClient, idp: FakeIdP) -> None:
    """kind google is OpenID Connect with Google's issuer (the fake plays Google here)."""
    idp.issuer = "https://accounts.google.com"
    email = new_email()
    idp.user = FakeUser(email=email)
    started = await start(browser, "google")
    assert started.params["scope"].split() == ["openid", "email", "profile"]
    assert started.params["code_challenge_method"] == "S256"
    assert started.params["nonce"]
    logged_in(await browser.get(await consent(started.authorize_url)))
    assert (await me(browser))["email"] == email


async def test_github_preset_takes_the_verified_primary_email(
    browser: httpx.AsyncClient, idp: FakeIdP, database: TestDatabase
) -> None:
    """Of GitHub's emails only the verified primary one counts; the account is keyed by the
    numeric user id; the client authenticates in the body (client_secret_post)."""
    primary = new_email()
    idp.user = FakeUser(
        github_emails=[
            {"email": new_email(), "primary": False, "verified": True},
            {"email": primary, "primary": True, "verified": True},
            {"email": new_email(), "primary": False, "verified": False},
        ]
    )
    started = await start(browser, "github")
    assert started.params["scope"].split() == ["read:user", "user:email"]
    assert started.params["code_challenge_method"] == "S256"
    assert "nonce" not in started.params  # plain OAuth 2, no ID token
    logged_in(await browser.get(await consent(started.authorize_url)))
    user = await me(browser)
    assert user["email"] == primary
    row = await identity(database, "github", str(idp.user.number))
    assert row["user_id"] == user["id"]
    exchange = idp.token_requests[-1]
    assert not exchange.basic_auth
    assert exchange.form["client_secret"] == idp.client_secret
    assert s256(exchange.form["code_verifier"]) == started.params["code_challenge"]


async def test_kakao_without_an_email_is_keyed_by_its_identity(
    browser: httpx.AsyncClient, idp: FakeIdP, database: TestDatabase
) -> None:
    """Kakao may give no email: the user has none, is found again by provider + subject, and
    two such users stay two users."""
    idp.user = FakeUser(email=None)
    before = await row_counts(database)
    started = await start(browser, "kakao")
    assert "scope" not in started.params  # the consent items of the Kakao app decide
    logged_in(await browser.get(await consent(started.authorize_url)))
    first = await me(browser)
    assert first["email"] is None
    row = await identity(database, "kakao", str(idp.user.number))
    assert (row["user_id"], row["email"]) == (first["id"], None)

    browser.cookies.clear()
    logged_in(await log_in(browser, "kakao"))
    assert (await me(browser))["id"] == first["id"]

    idp.user = FakeUser(email=None)
    browser.cookies.clear()
    logged_in(await log_in(browser, "kakao"))
    second = await me(browser)
    assert second["id"] != first["id"]
    assert second["email"] is None
    assert grew(before, await row_counts(database)) == {
        "users": 2,
        "identities": 2,
        "access_tokens": 3,
    }


async def test_kakao_with_an_email(
    browser: httpx.AsyncClient, idp: FakeIdP, database: TestDatabase
) -> None:
    """A valid, verified Kakao email is the user's; an unverified one is not."""
    email = new_email()
    idp.user = FakeUser(email=email)
    logged_in(await log_in(browser, "kakao"))
    assert (await me(browser))["email"] == email

    unverified = new_email()
    idp.user = FakeUser(email=unverified, email_verified=False)
    browser.cookies.clear()
    logged_in(await log_in(browser, "kakao"))
    assert (await me(browser))["email"] is None
    row = await identity(database, "kakao", str(idp.user.number))
    assert row["email"] == unverified


async def test_a_safe_next_path_is_where_the_login_ends(browser: httpx.AsyncClient) -> None:
    response = await log_in(browser, "corp", next="/sessions?tab=all")
    logged_in(response, location="/sessions?tab=all")


async def test_the_redirect_uri_comes_from_the_public_url(
    database: TestDatabase, tmp_path: Path, idp: FakeIdP
) -> None:
    """Behind a proxy the request's own URL is not the public one: COUNTERSIGN_PUBLIC_URL."""
    async with serve_oauth(database, tmp_path, idp, public_url="https://chat.example.com/") as (
        _app,
        browser,
    ):
        started = await start(browser, "corp")
    assert started.params["redirect_uri"] == f"https://chat.example.com{OAUTH}/corp/callback"


async def test_two_first_logins_at_once_make_one_user(
    database: TestDatabase, tmp_path: Path, idp: FakeIdP
) -> None:
    """The same new identity arriving twice at the same moment: one user, one identity."""
    idp.user = FakeUser(email=new_email())
    before = await row_counts(database)
    async with serve_oauth(database, tmp_path, idp) as (app, first), client_for(app) as second:
        callbacks = [
            await consent((await start(first, "corp")).authorize_url),
            await consent((await start(second, "corp")).authorize_url),
        ]
        answers = await asyncio.gather(first.get(callbacks[0]), second.get(callbacks[1]))
        for answer in answers:
            logged_in(answer)
        assert (await me(first))["id"] == (await me(second))["id"]
    assert grew(before, await row_counts(database)) == {
        "users": 1,
        "identities": 1,
        "access_tokens": 2,
    }


# --- failures: 400, and nothing written ---------------------------------------------------


def _no_state(url: str) -> str:
    return with_query(url, state=None)


def _wrong_state(url: str) -> str:
    return with_query(url, state="x" * 30)


def _no_code(url: str) -> str:
    return with_query(url, code=None)


def _unverified_github(idp: FakeIdP) -> None:
    idp.user = FakeUser(
        github_emails=[
            {"email": new_email(), "primary": True, "verified": False},
            {"email": new_email(), "primary": False, "verified": True},
        ]
    )


def _set(**knobs: Any) -> Callable[[FakeIdP], None]:
    def prepare(idp: FakeIdP) -> None:
        for name, value in knobs.items():
            setattr(idp, name, value)

    return prepare


@dataclass(frozen=True)
class Failure:
    """A login that must fail with 400 ``oauth_failed`` and leave no row behind."""

    id: str
    says: str
    """Part of the message."""
    provider: str = "corp"
    prepare: Callable[[FakeIdP], None] = field(default=lambda idp: None)
    callback: Callable[[str], str] = field(default=lambda url: url)
    other_browser: bool = False
    """Bring the callback back without this browser's OAuth session cookie."""


FAILURES = [
    Failure("missing-state", "state is missing", callback=_no_state),
    Failure("wrong-state", "state is missing", callback=_wrong_state),
    Failure("state-from-another-browser", "another browser", other_browser=True),
    Failure("no-code", "sent no authorization code", callback=_no_code),
    Failure("tampered-id-token", "not signed by", prepare=_set(id_token_fault="wrong_key")),
    Failure("expired-id-token", "has expired", prepare=_set(id_token_fault="expired")),
    Failure("wrong-nonce", "'nonce' claim", prepare=_set(id_token_fault="wrong_nonce")),
    Failure("wrong-audience", "'aud' claim", prepare=_set(id_token_fault="wrong_audience")),
    Failure("wrong-issuer", "'iss' claim", prepare=_set(id_token_fault="wrong_issuer")),
    Failure("google-needs-googles-issuer", "'iss' claim", provider="google"),
    Failure(
        "access-denied",
        "did not sign you in (access_denied)",
        prepare=_set(authorize_error="access_denied"),
    ),
    Failure(
        "token-endpoint-error",
        "refused the authorization code (invalid_request)",
        prepare=_set(token_error="invalid_request"),
    ),
    Failure("userinfo-fails", "userinfo", prepare=_set(api_status=500)),
    Failure(
        "github-token-error",
        "refused the authorization code (bad_verification_code)",
        provider="github",
        prepare=_set(token_error="bad_verification_code"),
    ),
    Failure(
        "github-api-fails", "answered HTTP 502", provider="github", prepare=_set(api_status=502)
    ),
    Failure(
        "github-no-verified-primary-email",
        "no verified primary email",
        provider="github",
        prepare=_unverified_github,
    ),
    Failure("kakao-api-fails", "answered HTTP 401", provider="kakao", prepare=_set(api_status=401)),
]


@pytest.mark.parametrize("case", FAILURES, ids=[case.id for case in FAILURES])
async def test_a_failed_login_answers_400_and_writes_nothing(
    case: Failure, browser: httpx.AsyncClient, idp: FakeIdP, database: TestDatabase
) -> None:
    idp.user = FakeUser(email=new_email())
    case.prepare(idp)
    before = await row_counts(database)
    started = await start(browser, case.provider)
    callback = case.callback(await consent(started.authorize_url))
    if case.other_browser:
        browser.cookies.clear()
    response = await browser.get(callback)

    error = assert_error(response, 400, "oauth_failed")
    assert case.says in error["message"], error
    assert SESSION not in set_cookies(response)
    for secret in [idp.client_secret, *idp.issued, started.params["state"]]:
        assert secret not in response.text
    assert await row_counts(database) == before
    assert_error(await browser.get("/api/v1/me"), 401, "unauthenticated")


async def test_a_replayed_callback_is_refused(
    database: TestDatabase, tmp_path: Path, idp: FakeIdP
) -> None:
    """The same code and state again, with the OAuth cookie copied from before the login: the
    provider refuses the spent code (invalid_grant). With the browser's own cookie the state
    is gone already. Nothing is written either time."""
    async with serve_oauth(database, tmp_path, idp) as (app, browser):
        started = await start(browser, "corp")
        callback = await consent(started.authorize_url)
        logged_in(await browser.get(callback))
        after_login = await row_counts(database)

        async with client_for(app) as attacker:
            replay = await attacker.get(
                callback, headers={"Cookie": f"{OAUTH_COOKIE}={started.oauth_cookie}"}
            )
        error = assert_error(replay, 400, "oauth_failed")
        assert "invalid_grant" in error["message"]

        again = await browser.get(callback)
        assert "state is missing" in assert_error(again, 400, "oauth_failed")["message"]
        assert await row_counts(database) == after_login


async def test_pkce_the_provider_refuses_a_wrong_verifier(
    browser: httpx.AsyncClient, idp: FakeIdP, database: TestDatabase
) -> None:
    """Our login sends an S256 challenge, so a stolen code is useless without the verifier
    that only this browser's OAuth session holds: the provider refuses a wrong or missing one.
    """
    before = await row_counts(database)
    started = await start(browser, "corp")
    challenge = started.params["code_challenge"]
    assert started.params["code_challenge_method"] == "S256"
    assert len(challenge) == 43  # base64url of a SHA-256 digest, unpadded
    for verifier in ("wrong-verifier-" + "x" * 40, None):
        callback = await consent(started.authorize_url)
        code = parse_qs(urlsplit(callback).query)["code"][0]
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": started.params["redirect_uri"],
        }
        if verifier is not None:
            form["code_verifier"] = verifier
        async with httpx.AsyncClient(timeout=10) as thief:
            stolen = await thief.post(
                f"{idp.base_url}/token", data=form, auth=(idp.client_id, idp.client_secret)
            )
        assert stolen.status_code == 400, stolen.text
        assert stolen.json()["error"] == "invalid_grant"
        assert "PKCE" in stolen.json()["error_description"]
    assert await row_counts(database) == before


# --- refusals before the provider is involved -----------------------------------------------


@pytest.mark.parametrize(
    "path", [f"{OAUTH}/nope/login", f"{OAUTH}/nope/callback?code=c&state=s", f"{OAUTH}/nope/x"]
)
async def test_an_unknown_provider_is_404(browser: httpx.AsyncClient, path: str) -> None:
    assert_error(await browser.get(path), 404, "not_found")


async def test_without_providers_every_provider_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get(f"{OAUTH}/google/login")
    error = assert_error(response, 404, "not_found")
    assert "google" in error["message"]
    assert OAUTH_COOKIE not in set_cookies(response)


@pytest.mark.parametrize(
    "next_path",
    [
        "https://evil.example/",
        "//evil.example/x",
        "/\\evil.example",
        "\\\\evil.example",
        "evil.example",
        "javascript:alert(1)",
        "http:evil.example",
        "/ok\r\nSet-Cookie: x=y",
    ],
)
async def test_an_open_redirect_next_is_refused(
    browser: httpx.AsyncClient, idp: FakeIdP, next_path: str
) -> None:
    response = await browser.get(f"{OAUTH}/corp/login", params={"next": next_path})
    error = assert_error(response, 422, "invalid_input")
    assert "next" in error["message"]
    assert "location" not in response.headers
    assert idp.authorize_requests == []


async def test_an_unreachable_provider_is_502(
    database: TestDatabase, tmp_path: Path, idp: FakeIdP
) -> None:
    """A provider that does not answer (discovery at /login, the token endpoint at the
    callback) is 502 provider_unavailable with a sentence, never a 500; nothing is written."""
    dead = f"http://127.0.0.1:{free_port()}"
    configured = {
        "lost": idp.provider("oidc", discovery_url=f"{dead}/.well-known/openid-configuration"),
        "halfway": idp.provider("github", token_url=f"{dead}/login/oauth/access_token"),
    }
    before = await row_counts(database)
    async with serve_oauth(database, tmp_path, idp, oauth_providers=configured) as (_a, browser):
        response = await browser.get(f"{OAUTH}/lost/login")
        error = assert_error(response, 502, "provider_unavailable")
        assert "could not reach" in error["message"]

        started = await start(browser, "halfway")
        response = await browser.get(await consent(started.authorize_url))
        error = assert_error(response, 502, "provider_unavailable")
        assert "token endpoint" in error["message"]
    assert await row_counts(database) == before


# --- the OAuth session ------------------------------------------------------------------------


@pytest.mark.parametrize(("secret_key", "survives"), [(None, False), ("k" * 40, True)])
async def test_a_login_under_way_and_a_restart(
    database: TestDatabase, tmp_path: Path, idp: FakeIdP, secret_key: str | None, survives: bool
) -> None:
    """Without COUNTERSIGN_SECRET_KEY the OAuth session's key is random per process: a login
    that started before a restart must start again. With the key it carries on."""
    async with serve_oauth(database, tmp_path, idp, secret_key=secret_key) as (_app, before):
        started = await start(before, "corp")
        callback = await consent(started.authorize_url)
    async with serve_oauth(database, tmp_path, idp, secret_key=secret_key) as (_app, after):
        response = await after.get(
            callback, headers={"Cookie": f"{OAUTH_COOKIE}={started.oauth_cookie}"}
        )
    if survives:
        logged_in(response)
    else:
        assert "state is missing" in assert_error(response, 400, "oauth_failed")["message"]


async def test_the_oauth_cookie_is_secure_in_prod_and_stays_on_its_routes(
    database: TestDatabase, tmp_path: Path, idp: FakeIdP
) -> None:
    async with serve_oauth(database, tmp_path, idp, profile="prod", secret_key="k" * 40) as (
        _app,
        browser,
    ):
        started = await start(browser, "corp")
        cookie = set_cookies(started.response)[OAUTH_COOKIE]
        assert cookie["secure"] is True
        assert cookie["httponly"] is True
        assert cookie["path"] == OAUTH
        # Other routes neither read nor set it.
        other = await browser.get(
            "/health/live", headers={"Cookie": f"{OAUTH_COOKIE}={started.oauth_cookie}"}
        )
        assert "set-cookie" not in other.headers


# --- audit ------------------------------------------------------------------------------------


async def test_oauth_logins_are_audited_without_secrets(
    browser: httpx.AsyncClient, idp: FakeIdP, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    idp.user = FakeUser(email=new_email())
    token = logged_in(await log_in(browser, "corp"))
    user_id = (await me(browser))["id"]
    browser.cookies.clear()
    logged_in(await log_in(browser, "corp"))
    started = await start(browser, "corp")
    failed = await browser.get(_wrong_state(await consent(started.authorize_url)))
    assert failed.status_code == 400

    audit = [record for record in caplog.records if record.name == "countersign.audit"]
    lines = [
        (r.event, r.user_id, getattr(r, "provider", None), getattr(r, "account", None))  # type: ignore[attr-defined]
        for r in audit
    ]
    assert lines == [
        ("oauth_login", user_id, "corp", "created"),
        ("oauth_login", user_id, "corp", "existing"),
        ("oauth_login_failed", None, "corp", None),
    ]
    verifiers = [request.form["code_verifier"] for request in idp.token_requests]
    secrets = [idp.client_secret, token, *idp.issued, *verifiers, started.params["state"]]
    # "httpx" is the test's own clients (the browser); the server's requests use httpx2.
    for record in [record for record in caplog.records if record.name != "httpx"]:
        text_of_record = record.getMessage() + " " + repr(vars(record))
        for secret in secrets:
            assert secret not in text_of_record, (record.name, record.getMessage())


async def test_provider_logins_share_the_login_limit_per_client_address(
    database: TestDatabase, tmp_path: Path, idp: FakeIdP
) -> None:
    """Callbacks count against the client's login budget: over it, 429 with Retry-After, and
    the provider's code is not even redeemed (no row written)."""
    async with serve_oauth(database, tmp_path, idp, login_rate_limit="2/minute") as (_, browser):
        for _ in range(2):
            idp.user = FakeUser(email=new_email())
            logged_in(await log_in(browser, "corp"))
        idp.user = FakeUser(email=new_email())
        before = await row_counts(database)
        tokens_asked = len(idp.token_requests)

        response = await log_in(browser, "corp")

        retry_after(response)
        assert SESSION not in set_cookies(response)
        assert await row_counts(database) == before
        assert len(idp.token_requests) == tokens_asked


@pytest.mark.parametrize("broken", [{"error": "down"}, ["not", "a", "key", "set"], {"keys": []}])
async def test_a_broken_key_set_fails_the_login_cleanly_and_is_fetched_again(
    browser: httpx.AsyncClient, idp: FakeIdP, database: TestDatabase, broken: Any
) -> None:
    """A provider whose JWKS is not a usable key set: 400 and nothing written, never a 500;
    once the provider serves its keys again, the next login works (no stale cache)."""
    idp.jwks_override = broken
    idp.user = FakeUser(email=new_email())
    before = await row_counts(database)

    response = await log_in(browser, "corp")

    assert_error(response, 400, "oauth_failed")
    assert await row_counts(database) == before
    idp.jwks_override = None
    logged_in(await log_in(browser, "corp"))


async def test_in_prod_a_discovery_document_with_plain_http_endpoints_is_refused(
    database: TestDatabase, tmp_path: Path, idp: FakeIdP
) -> None:
    """The configured URLs are checked at start; what discovery names is checked here: a
    token endpoint on plain http elsewhere would carry the client secret and the code in the
    clear. In dev the same document is accepted (local providers)."""
    idp.discovery_overrides = {"token_endpoint": "http://idp.example.test/token"}
    async with serve_oauth(database, tmp_path, idp, profile="prod", secret_key="k" * 40) as (
        _app,
        browser,
    ):
        response = await browser.get(f"{OAUTH}/corp/login")
        error = assert_error(response, 502, "provider_unavailable")
        assert "token_endpoint" in error["message"]
        assert "https" in error["message"]
        assert idp.authorize_requests == []
    async with serve_oauth(database, tmp_path, idp) as (_app, browser):
        assert (await browser.get(f"{OAUTH}/corp/login")).status_code == 302
