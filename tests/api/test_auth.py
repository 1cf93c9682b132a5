"""Register, log in, log out: tokens, cookies with CSRF, enumeration, rate limits, audit lines.

Everything goes through the real app (lifespan, database) over HTTP, on both databases.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from countersign.app import create_app
from countersign.config import Settings
from countersign.domain.models import User, UserId
from countersign.security import dummy_password_hash
from countersign.services import ServiceDeps
from countersign.services import accounts as account_service
from countersign.services.accounts import create_user, issue_access_token
from tests.api.test_errors import MakeAccount, assert_error
from tests.conftest import make_settings
from tests.support.databases import TestDatabase

PASSWORD = "violet stapler orbit"
SESSION = "countersign_session"
CSRF = "countersign_csrf"


@asynccontextmanager
async def serve(
    database: TestDatabase, tmp_path: Path, *, client_host: str = "127.0.0.1", **overrides: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The real app with these settings, and a client that talks to it from ``client_host``."""
    settings = make_settings(database.url, workspace_root=tmp_path / "workspaces", **overrides)
    application = create_app(settings)
    async with (
        LifespanManager(application, startup_timeout=30, shutdown_timeout=30),
        client_for(application, client_host) as http,
    ):
        yield application, http


def client_for(app: FastAPI, host: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(host, 40_000))
    return httpx.AsyncClient(transport=transport, base_url="http://countersign.test")


_emails = iter(range(10**9))


def new_email() -> str:
    return f"person{next(_emails)}-{uuid.uuid4().hex[:8]}@example.test"


async def register(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD
) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/auth/register", json={"email": email, "password": password}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def login(client: httpx.AsyncClient, email: str, password: str = PASSWORD) -> str:
    response = await client.post("/api/v1/auth/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def set_cookies(response: httpx.Response) -> dict[str, Any]:
    """The cookies a response sets, by name, as parsed morsels."""
    cookies: dict[str, Any] = {}
    for header in response.headers.get_list("set-cookie"):
        jar: SimpleCookie = SimpleCookie()
        jar.load(header)
        cookies.update(jar)
    return cookies


@dataclasses.dataclass(frozen=True)
class CookieLogin:
    token: str
    csrf: str

    def cookie_header(self, *, csrf_cookie: str | None = None) -> str:
        value = self.csrf if csrf_cookie is None else csrf_cookie
        return f"{SESSION}={self.token}; {CSRF}={value}"

    def headers(self, *, csrf: str | None = None, csrf_cookie: str | None = None) -> dict[str, str]:
        headers = {"Cookie": self.cookie_header(csrf_cookie=csrf_cookie)}
        if csrf is not None:
            headers["X-CSRF-Token"] = csrf
        return headers


async def cookie_login(client: httpx.AsyncClient, email: str) -> CookieLogin:
    """Log in with ``cookie: true``; the client's own cookie jar is emptied afterwards."""
    response = await client.post(
        "/api/v1/auth/login", json={"email": email, "password": PASSWORD, "cookie": True}
    )
    assert response.status_code == 200, response.text
    cookies = set_cookies(response)
    client.cookies.clear()  # each request below says exactly which cookies it sends
    assert cookies[SESSION].value == response.json()["access_token"]
    return CookieLogin(token=cookies[SESSION].value, csrf=cookies[CSRF].value)


async def session_titles(client: httpx.AsyncClient, token: str) -> list[str]:
    response = await client.get("/api/v1/sessions", headers=bearer(token))
    assert response.status_code == 200, response.text
    return [item["title"] for item in response.json()["items"]]


# --- register -------------------------------------------------------------------------------


async def test_register_creates_a_user_with_a_normalised_unique_email(
    client: httpx.AsyncClient,
) -> None:
    """201 with exactly {id, email, created_at}; the email is stored trimmed and lower-case, and
    the same address in another case is taken (409)."""
    name = f"Alice-{uuid.uuid4().hex[:6]}"
    body = await register(client, f"  {name}@Example.TEST ")
    assert set(body) == {"id", "email", "created_at"}
    assert body["email"] == f"{name.lower()}@example.test"
    uuid.UUID(body["id"])
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None

    again = await client.post(
        "/api/v1/auth/register",
        json={"email": f"{name.upper()}@EXAMPLE.test", "password": "another fine password"},
    )
    assert_error(again, 409, "already_exists")
    # The account works with its password, under any case of the email.
    token = await login(client, f"{name.upper()}@example.TEST")
    me = await client.get("/api/v1/me", headers=bearer(token))
    assert me.json() == body


@pytest.mark.parametrize(
    ("password", "why"),
    [
        ("nine char", "at least 10"),
        ("x" * 1025, "1024"),
        ("1234567890", "common"),
        ("password123", "common"),
        ("PassWord123", "common"),
        ("qwertyuiop", "common"),
    ],
)
async def test_register_refuses_weak_passwords(
    client: httpx.AsyncClient, password: str, why: str
) -> None:
    """Too short, too long or one of the most common passwords: 422, and no account is made."""
    email = new_email()
    response = await client.post(
        "/api/v1/auth/register", json={"email": email, "password": password}
    )
    error = assert_error(response, 422, "invalid_input")
    assert why in error["message"] or why in str(error["detail"]), error
    # Nothing was written: the email is still free.
    await register(client, email)


async def test_register_refuses_the_email_as_password(client: httpx.AsyncClient) -> None:
    email = new_email()
    response = await client.post("/api/v1/auth/register", json={"email": email, "password": email})
    error = assert_error(response, 422, "invalid_input")
    assert "email" in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"email": "not-an-email", "password": PASSWORD},
        {"email": "a@b", "password": PASSWORD},
        {"email": "x" * 400 + "@example.test", "password": PASSWORD},
        {"email": "a@example.test"},
        {"password": PASSWORD},
        {"email": "a@example.test", "password": PASSWORD, "admin": True},
        {"email": "a@example.test", "password": "\ud800 lone surrogate"},
        {"email": 5, "password": PASSWORD},
    ],
)
async def test_register_refuses_bad_bodies(client: httpx.AsyncClient, body: Any) -> None:
    # json.dumps escapes the lone surrogate, as a client in another language might send it.
    response = await client.post(
        "/api/v1/auth/register",
        content=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    assert_error(response, 422, "invalid_input")


async def test_prod_registration_is_closed_unless_opened(
    database: TestDatabase, tmp_path: Path
) -> None:
    """In prod, registration answers 403 until COUNTERSIGN_OPEN_REGISTRATION is set; in dev it
    can be closed the same way."""
    prod = {"profile": "prod", "secret_key": "k" * 40}
    async with serve(database, tmp_path, **prod) as (_app, http):
        email = new_email()
        response = await http.post(
            "/api/v1/auth/register", json={"email": email, "password": PASSWORD}
        )
        error = assert_error(response, 403, "forbidden")
        assert "registration is closed" in error["message"]
    async with serve(database, tmp_path, **prod, open_registration=True) as (_app, http):
        await register(http, email)  # the refused attempt left nothing behind
    async with serve(database, tmp_path, open_registration=False) as (_app, http):
        response = await http.post(
            "/api/v1/auth/register", json={"email": new_email(), "password": PASSWORD}
        )
        assert_error(response, 403, "forbidden")


# --- login, tokens, logout -----------------------------------------------------------------


async def test_login_hands_out_a_bearer_token(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """200 {access_token, token_type: bearer, expires_at}; the token authenticates GET and POST
    (no CSRF token needed with Bearer); no cookie is set without ``cookie: true``."""
    email = new_email()
    user = await register(client, email)
    before = datetime.now(UTC)
    response = await client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_at"}
    assert body["token_type"] == "bearer"
    assert len(body["access_token"]) >= 40
    assert response.headers["cache-control"] == "no-store"
    assert "set-cookie" not in response.headers
    expires_at = datetime.fromisoformat(body["expires_at"])
    ttl = timedelta(seconds=settings.access_token_ttl_seconds)
    assert ttl == timedelta(days=7)
    assert before + ttl - timedelta(seconds=5) <= expires_at <= datetime.now(UTC) + ttl

    token = body["access_token"]
    me = await client.get("/api/v1/me", headers=bearer(token))
    assert me.status_code == 200
    assert me.json() == user
    created = await client.post(
        "/api/v1/sessions", json={"title": "by bearer"}, headers=bearer(token)
    )
    assert created.status_code == 201, created.text
    assert await session_titles(client, token) == ["by bearer"]

    # Each login is a token of its own.
    assert await login(client, email) != token


async def test_unknown_email_and_wrong_password_answer_alike(
    client: httpx.AsyncClient, services: ServiceDeps
) -> None:
    """No user enumeration: the same status and the same bytes for an unknown email, a wrong
    password, a malformed email and a user without a password (made by a provider)."""
    email = new_email()
    await register(client, email)
    async with services.uow_factory() as uow:
        no_password = User(id=UserId(uuid.uuid4()), email=new_email(), created_at=datetime.now(UTC))
        await uow.users.add(no_password, password_hash=None)
        await uow.commit()
    attempts = {
        "wrong password": {"email": email, "password": "not the password at all"},
        "unknown email": {"email": new_email(), "password": PASSWORD},
        "malformed email": {"email": "no-at-sign", "password": PASSWORD},
        "no password": {"email": no_password.email, "password": PASSWORD},
    }
    answers = {}
    for name, body in attempts.items():
        response = await client.post("/api/v1/auth/login", json=body)
        assert_error(response, 401, "unauthenticated")
        answers[name] = (
            response.status_code,
            response.content,
            response.headers["www-authenticate"],
        )
    assert len(set(answers.values())) == 1, answers


async def test_every_failed_login_verifies_an_argon2_hash(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timing guard, shown by behaviour: an unknown email is checked against the dummy hash,
    a wrong password against the user's own; each failure runs exactly one verification."""
    verified: list[str] = []
    real_verify = account_service.verify_password

    def spy(password_hash: str, password: str) -> bool:
        verified.append(password_hash)
        return real_verify(password_hash, password)

    monkeypatch.setattr(account_service, "verify_password", spy)
    email = new_email()
    await register(client, email)

    unknown = await client.post(
        "/api/v1/auth/login", json={"email": new_email(), "password": PASSWORD}
    )
    assert unknown.status_code == 401
    assert verified == [dummy_password_hash()]

    verified.clear()
    wrong = await client.post(
        "/api/v1/auth/login", json={"email": email, "password": "wrong wrong wrong"}
    )
    assert wrong.status_code == 401
    assert len(verified) == 1
    assert verified[0] != dummy_password_hash()
    assert verified[0].startswith("$argon2id$")


async def test_logout_revokes_the_bearer_token(client: httpx.AsyncClient) -> None:
    email = new_email()
    await register(client, email)
    token = await login(client, email)
    other = await login(client, email)
    response = await client.post("/api/v1/auth/logout", headers=bearer(token))
    assert response.status_code == 204, response.text
    assert response.content == b""
    cleared = set_cookies(response)
    assert set(cleared) == {SESSION, CSRF}
    assert all(morsel["max-age"] == "0" for morsel in cleared.values())

    after = await client.get("/api/v1/me", headers=bearer(token))
    error = assert_error(after, 401, "unauthenticated")
    assert "revoked" in error["message"]
    again = await client.post("/api/v1/auth/logout", headers=bearer(token))
    assert_error(again, 401, "unauthenticated")
    # Another login's token lives on.
    assert (await client.get("/api/v1/me", headers=bearer(other))).status_code == 200


async def test_logout_with_an_api_key_is_refused_and_keeps_the_key(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account = await make_account()
    response = await client.post("/api/v1/auth/logout", headers=account.headers)
    error = assert_error(response, 422, "invalid_input")
    assert "api-keys" in error["message"]
    assert (await client.get("/api/v1/me", headers=account.headers)).status_code == 200


async def test_logout_needs_credentials(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/auth/logout")
    assert_error(response, 401, "unauthenticated")
    response = await client.post("/api/v1/auth/logout", headers=bearer("not-a-token"))
    assert_error(response, 401, "unauthenticated")


async def test_an_expired_token_is_refused(
    client: httpx.AsyncClient, services: ServiceDeps, settings: Settings
) -> None:
    """A token issued one TTL and a second ago (the service's clock is moved back) is 401;
    one issued now works."""
    email = new_email()
    user = await register(client, email)
    ttl = timedelta(seconds=settings.access_token_ttl_seconds)

    @dataclasses.dataclass(frozen=True)
    class PastClock:
        at: datetime

        def now(self) -> datetime:
            return self.at

    issued_at = datetime.now(UTC) - ttl - timedelta(seconds=1)
    past = dataclasses.replace(services, clock=PastClock(issued_at))
    old = await issue_access_token(past, user_id=UserId(uuid.UUID(user["id"])))
    assert old.expires_at < datetime.now(UTC)
    response = await client.get("/api/v1/me", headers=bearer(old.token))
    error = assert_error(response, 401, "unauthenticated")
    assert "expired" in error["message"]

    fresh = await issue_access_token(services, user_id=UserId(uuid.UUID(user["id"])))
    assert (await client.get("/api/v1/me", headers=bearer(fresh.token))).status_code == 200


async def test_a_one_second_ttl_expires(database: TestDatabase, tmp_path: Path) -> None:
    """COUNTERSIGN_ACCESS_TOKEN_TTL_SECONDS is honoured: with 1 s, the token dies a second later."""
    async with serve(database, tmp_path, access_token_ttl_seconds=1) as (_app, http):
        email = new_email()
        await register(http, email)
        response = await http.post(
            "/api/v1/auth/login", json={"email": email, "password": PASSWORD}
        )
        body = response.json()
        expires_at = datetime.fromisoformat(body["expires_at"])
        assert expires_at - datetime.now(UTC) <= timedelta(seconds=1)
        await asyncio.sleep((expires_at - datetime.now(UTC)).total_seconds() + 0.05)
        after = await http.get("/api/v1/me", headers=bearer(body["access_token"]))
        assert_error(after, 401, "unauthenticated")


async def test_a_user_without_an_email_is_shown_with_null(
    client: httpx.AsyncClient, services: ServiceDeps
) -> None:
    """Accounts made from a provider without an email (several may exist) work and show null."""
    users = [
        User(id=UserId(uuid.uuid4()), email=None, created_at=datetime.now(UTC)) for _ in range(2)
    ]
    async with services.uow_factory() as uow:
        for user in users:
            await uow.users.add(user, password_hash=None)
        await uow.commit()
    issued = await issue_access_token(services, user_id=users[0].id)
    me = await client.get("/api/v1/me", headers=bearer(issued.token))
    assert me.status_code == 200, me.text
    assert me.json()["email"] is None
    assert me.json()["id"] == str(users[0].id)


# --- cookies and CSRF ------------------------------------------------------------------------


async def test_cookie_login_sets_a_session_cookie_and_a_csrf_cookie(
    client: httpx.AsyncClient,
) -> None:
    email = new_email()
    await register(client, email)
    response = await client.post(
        "/api/v1/auth/login", json={"email": email, "password": PASSWORD, "cookie": True}
    )
    assert response.status_code == 200, response.text
    cookies = set_cookies(response)
    session, csrf = cookies[SESSION], cookies[CSRF]
    assert session.value == response.json()["access_token"]
    assert session["httponly"] is True
    assert session["samesite"].lower() == "lax"
    assert session["path"] == "/"
    assert session["expires"]
    assert not session["secure"]  # dev serves plain http
    assert csrf.value
    assert csrf.value != session.value
    assert not csrf["httponly"]  # the page's scripts read it
    assert csrf["samesite"].lower() == "lax"


async def test_cookies_are_secure_in_prod(database: TestDatabase, tmp_path: Path) -> None:
    async with serve(database, tmp_path, profile="prod", secret_key="k" * 40) as (app, http):
        email = new_email()
        await create_user(app.state.services, email=email, password=PASSWORD)
        response = await http.post(
            "/api/v1/auth/login", json={"email": email, "password": PASSWORD, "cookie": True}
        )
        assert response.status_code == 200, response.text
        cookies = set_cookies(response)
        assert cookies[SESSION]["secure"] is True
        assert cookies[CSRF]["secure"] is True


async def test_cookie_reads_need_no_csrf_token(client: httpx.AsyncClient) -> None:
    email = new_email()
    user = await register(client, email)
    login_ = await cookie_login(client, email)
    response = await client.get("/api/v1/me", headers={"Cookie": f"{SESSION}={login_.token}"})
    assert response.status_code == 200, response.text
    assert response.json() == user


async def test_forged_cross_site_posts_are_refused_and_write_nothing(
    client: httpx.AsyncClient,
) -> None:
    """A cookie-authenticated POST without the CSRF header, with a wrong one, or with a header
    that matches a planted CSRF cookie but not the session: 403 csrf_failed, nothing written.
    With the right header it works."""
    email = new_email()
    await register(client, email)
    login_ = await cookie_login(client, email)
    forged = {
        "no header": login_.headers(),
        "wrong header": login_.headers(csrf="x" * len(login_.csrf)),
        "header of the cookie, planted": login_.headers(csrf="planted", csrf_cookie="planted"),
        "empty header and cookie": login_.headers(csrf="", csrf_cookie=""),
        "right header, no csrf cookie": {
            "Cookie": f"{SESSION}={login_.token}",
            "X-CSRF-Token": login_.csrf,
        },
    }
    for name, headers in forged.items():
        response = await client.post("/api/v1/sessions", json={"title": name}, headers=headers)
        error = assert_error(response, 403, "csrf_failed")
        assert "X-CSRF-Token" in error["message"], name
    assert await session_titles(client, login_.token) == []

    response = await client.post(
        "/api/v1/sessions", json={"title": "mine"}, headers=login_.headers(csrf=login_.csrf)
    )
    assert response.status_code == 201, response.text
    assert await session_titles(client, login_.token) == ["mine"]


async def test_csrf_is_checked_on_every_unsafe_method(client: httpx.AsyncClient) -> None:
    """PATCH and DELETE by cookie need the CSRF token too; with it they work."""
    email = new_email()
    await register(client, email)
    login_ = await cookie_login(client, email)
    created = await client.post(
        "/api/v1/sessions", json={"title": "t"}, headers=login_.headers(csrf=login_.csrf)
    )
    session_id = created.json()["id"]
    url = f"/api/v1/sessions/{session_id}"
    patched = await client.patch(url, json={"title": "forged"}, headers=login_.headers())
    assert_error(patched, 403, "csrf_failed")
    deleted = await client.delete(url, headers=login_.headers())
    assert_error(deleted, 403, "csrf_failed")
    assert await session_titles(client, login_.token) == ["t"]
    ok = await client.delete(url, headers=login_.headers(csrf=login_.csrf))
    assert ok.status_code == 204
    assert await session_titles(client, login_.token) == []


async def test_credentials_come_before_csrf(client: httpx.AsyncClient) -> None:
    """No credentials, an unknown session cookie, or a bad Authorization header next to a good
    cookie: 401 on unsafe methods, never 403, whatever the CSRF header says."""
    email = new_email()
    await register(client, email)
    login_ = await cookie_login(client, email)
    cases: dict[str, dict[str, str]] = {
        "nothing": {},
        "csrf header only": {"X-CSRF-Token": login_.csrf},
        "unknown session cookie": {"Cookie": f"{SESSION}=nonsense", "X-CSRF-Token": "nonsense"},
        "unknown session cookie, no csrf": {"Cookie": f"{SESSION}=nonsense"},
        "bad bearer beside a good cookie": {
            **login_.headers(csrf=login_.csrf),
            "Authorization": "Bearer nonsense",
        },
    }
    for name, headers in cases.items():
        response = await client.post("/api/v1/sessions", json={"title": name}, headers=headers)
        assert_error(response, 401, "unauthenticated")
    # A broken body behind a cookie without CSRF is refused for the CSRF token, before the body.
    response = await client.post(
        "/api/v1/sessions",
        content=b"{",
        headers={**login_.headers(), "Content-Type": "application/json"},
    )
    assert_error(response, 403, "csrf_failed")
    assert await session_titles(client, login_.token) == []


async def test_cookie_logout_needs_csrf_and_then_ends_the_session(
    client: httpx.AsyncClient,
) -> None:
    email = new_email()
    await register(client, email)
    login_ = await cookie_login(client, email)
    forged = await client.post("/api/v1/auth/logout", headers=login_.headers())
    assert_error(forged, 403, "csrf_failed")
    me = await client.get("/api/v1/me", headers=login_.headers())
    assert me.status_code == 200  # the forged logout did nothing

    response = await client.post("/api/v1/auth/logout", headers=login_.headers(csrf=login_.csrf))
    assert response.status_code == 204, response.text
    assert set(set_cookies(response)) == {SESSION, CSRF}
    after = await client.get("/api/v1/me", headers=login_.headers())
    assert_error(after, 401, "unauthenticated")


# --- rate limits -----------------------------------------------------------------------------


def retry_after(response: httpx.Response) -> int:
    assert_error(response, 429, "rate_limited")
    value = int(response.headers["retry-after"])
    assert 1 <= value <= 60
    assert response.json()["error"]["detail"] == {"retry_after": value}
    return value


async def test_logins_are_limited_per_client_address(
    database: TestDatabase, tmp_path: Path
) -> None:
    async with serve(
        database, tmp_path, login_rate_limit="3/minute", login_failure_rate_limit="100/minute"
    ) as (app, http):
        email = new_email()
        await create_user(app.state.services, email=email, password=PASSWORD)
        for _ in range(2):
            wrong = await http.post(
                "/api/v1/auth/login", json={"email": new_email(), "password": PASSWORD}
            )
            assert wrong.status_code == 401
        await login(http, email)  # the third attempt of this address, and a good one
        over = await http.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
        retry_after(over)
        # Another address is not affected.
        async with client_for(app, "10.1.2.3") as elsewhere:
            await login(elsewhere, email)


async def test_failed_logins_are_limited_per_email_from_any_address(
    database: TestDatabase, tmp_path: Path
) -> None:
    """Two wrong passwords for one email (from two addresses) lock that email for the window,
    even for the right password; other emails and successful logins are not counted."""
    async with serve(
        database, tmp_path, login_rate_limit="100/minute", login_failure_rate_limit="2/minute"
    ) as (app, http):
        services = app.state.services
        victim, other = new_email(), new_email()
        for email in (victim, other):
            await create_user(services, email=email, password=PASSWORD)
        for _ in range(3):
            await login(http, other)  # successes do not count
        for host in ("10.0.0.1", "10.0.0.2"):
            async with client_for(app, host) as attacker:
                response = await attacker.post(
                    "/api/v1/auth/login", json={"email": victim, "password": "guess guess guess"}
                )
                assert response.status_code == 401
        locked = await http.post(
            "/api/v1/auth/login", json={"email": victim.upper(), "password": PASSWORD}
        )
        retry_after(locked)
        await login(http, other)


async def test_registrations_are_limited(database: TestDatabase, tmp_path: Path) -> None:
    async with serve(database, tmp_path, register_rate_limit="2/minute") as (app, http):
        await register(http, new_email())
        await register(http, new_email())
        over = await http.post(
            "/api/v1/auth/register", json={"email": new_email(), "password": PASSWORD}
        )
        retry_after(over)
        # Per email too: the same address tried from two other clients.
        email = new_email()
        async with client_for(app, "10.0.0.7") as one, client_for(app, "10.0.0.8") as two:
            await register(one, email)
            taken = await two.post(
                "/api/v1/auth/register", json={"email": email, "password": PASSWORD}
            )
            assert_error(taken, 409, "already_exists")
            async with client_for(app, "10.0.0.9") as three:
                over = await three.post(
                    "/api/v1/auth/register", json={"email": email, "password": PASSWORD}
                )
                retry_after(over)


# --- audit -----------------------------------------------------------------------------------


def _audit(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "countersign.audit"]


def _text_of(record: logging.LogRecord) -> str:
    """Everything a log line carries: its message and every extra field."""
    return record.getMessage() + " " + repr(vars(record))


async def test_account_events_are_audited_without_secrets(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="countersign.audit")
    email = new_email()
    user = await register(client, email)
    user_id = user["id"]
    token = await login(client, email)
    wrong = await client.post(
        "/api/v1/auth/login", json={"email": email, "password": "a wrong password"}
    )
    assert wrong.status_code == 401
    stranger = new_email()
    unknown = await client.post("/api/v1/auth/login", json={"email": stranger, "password": "pw"})
    assert unknown.status_code == 401
    created = await client.post("/api/v1/api-keys", json={"name": "ci"}, headers=bearer(token))
    key = created.json()
    deleted = await client.delete(f"/api/v1/api-keys/{key['id']}", headers=bearer(token))
    assert deleted.status_code == 204
    logout = await client.post("/api/v1/auth/logout", headers=bearer(token))
    assert logout.status_code == 204

    records = _audit(caplog)
    events = [(record.event, record.user_id) for record in records]  # type: ignore[attr-defined]
    assert events == [
        ("register", user_id),
        ("login", user_id),
        ("login_failed", user_id),
        ("login_failed", None),
        ("api_key_created", user_id),
        ("api_key_deleted", user_id),
        ("logout", user_id),
    ]
    assert records[4].api_key_id == key["id"]  # type: ignore[attr-defined]
    secrets = [PASSWORD, "a wrong password", token, key["key"], key["key"].split("_", 2)[2]]
    for record in records:
        text = _text_of(record)
        for secret in secrets:
            assert secret not in text, (record.getMessage(), secret)
    for record in records:
        if record.event == "login_failed":  # type: ignore[attr-defined]
            assert email not in _text_of(record)
            assert stranger not in _text_of(record)


async def test_approval_decisions_are_audited(
    client: httpx.AsyncClient, make_account: MakeAccount, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.api.test_runs import events, new_session, send

    caplog.set_level(logging.INFO, logger="countersign.audit")
    account = await make_account()
    session_id = await new_session(client, account)
    sent = await send(client, account, session_id, '/tool write_file {"path": "a", "content": "b"}')
    run_id = sent["run"]["id"]
    approval_id = (await events(client, account, session_id, run_id))[-1].data["approval_id"]
    decided = await client.post(
        f"/api/v1/sessions/{session_id}/approvals/{approval_id}",
        json={"decision": "reject", "reason": "no"},
        headers=account.headers,
    )
    assert decided.status_code == 200, decided.text
    lines = [r for r in _audit(caplog) if r.event == "approval_decided"]  # type: ignore[attr-defined]
    assert len(lines) == 1
    line: Any = lines[0]
    assert line.user_id == str(account.user.id)
    assert line.approval_id == approval_id
    assert line.run_id == run_id
    assert line.decision == "rejected"
    assert account.key not in _text_of(line)
