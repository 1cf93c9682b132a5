"""Audit: account events and approval decisions leave an audit line naming the acting user,
and no log line of any logger, at any level, carries a secret.

One flow of a user's life (register, log in, fail to log in, log in by cookie, make API keys,
approve and reject tool calls, delete a key, log out twice, then knock with the dead
credentials) runs twice:

- in-process, with every logger opened to DEBUG (SQLAlchemy's statements, parameters and rows
  included) and every record kept, formatted as the server formats it (JSON and text) and as
  its raw attributes;
- against a real ``countersign serve`` process logging JSON at DEBUG, whose whole output
  (uvicorn's lines included) is read back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_correlation_id import CorrelationIdFilter
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from countersign.config import normalise_database_url
from countersign.db.tables import UserRow
from countersign.security import api_key_prefix
from tests.api.test_auth import CSRF, SESSION, serve, set_cookies
from tests.api.test_runs import WAIT
from tests.support.databases import TestDatabase
from tests.support.server import ServerProcesses, server_env

API = "/api/v1"
AUDIT = "countersign.audit"
REQUEST_ID = "X-Request-ID"

# --- the flow --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """An audit line the flow must have produced."""

    event: str
    user_id: str | None
    request_id: str
    """The X-Request-ID of the response to the request that caused it."""
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class Flow:
    """What the flow did: the audit lines it expects and every secret it used."""

    expected: list[Expected] = field(default_factory=list)
    secrets: dict[str, str] = field(default_factory=dict)
    """Secret values by a name that says what they are (for the failure message)."""

    def secret(self, name: str, value: str) -> str:
        assert len(value) >= 8, (name, value)  # long enough that a chance match is impossible
        self.secrets[name] = value
        return value

    def expect(
        self, response: httpx.Response, event: str, user_id: str | None, **fields: str
    ) -> None:
        self.expected.append(Expected(event, user_id, response.headers[REQUEST_ID], fields))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def checked(response: httpx.Response, status: int) -> httpx.Response:
    assert response.status_code == status, (response.request.url, response.text)
    return response


async def wait_for_approval(
    client: httpx.AsyncClient, headers: dict[str, str], session_id: str
) -> dict[str, Any]:
    """The session's pending approval, once there is one (bounded)."""
    async with asyncio.timeout(WAIT):
        while True:
            pending = checked(
                await client.get(f"{API}/sessions/{session_id}/pending-approvals", headers=headers),
                200,
            )
            items: list[dict[str, Any]] = pending.json()["items"]
            if items:
                return items[0]
            await asyncio.sleep(0.05)


async def wait_for_run(
    client: httpx.AsyncClient, headers: dict[str, str], session_id: str, run_id: str, status: str
) -> None:
    async with asyncio.timeout(WAIT):
        while True:
            run = checked(
                await client.get(f"{API}/sessions/{session_id}/runs/{run_id}", headers=headers),
                200,
            )
            if run.json()["status"] == status:
                return
            await asyncio.sleep(0.05)


async def ask_for_a_file(
    client: httpx.AsyncClient, headers: dict[str, str], session_id: str, name: str
) -> tuple[str, dict[str, Any]]:
    """Send a write_file tool call (policy `ask`); its run id and pending approval."""
    content = f'/tool write_file {{"path": "{name}", "content": "x"}}'
    sent = checked(
        await client.post(
            f"{API}/sessions/{session_id}/messages", json={"content": content}, headers=headers
        ),
        202,
    )
    approval = await wait_for_approval(client, headers, session_id)
    run_id: str = sent.json()["run"]["id"]
    assert approval["run_id"] == run_id
    await wait_for_run(client, headers, session_id, run_id, "awaiting_approval")
    return run_id, approval


async def account_flow(client: httpx.AsyncClient) -> Flow:
    """A user's life through the API, noting each audit line it must cause and each secret."""
    flow = Flow()
    email = f"audited-{uuid.uuid4().hex[:10]}@example.test"
    password = flow.secret("password", "orchid lantern tundra 7")
    wrong_password = flow.secret("wrong password", "marble falcon river 3")
    stranger_password = flow.secret("unknown email's password", "copper meadow quartz 5")

    registered = checked(
        await client.post(f"{API}/auth/register", json={"email": email, "password": password}),
        201,
    )
    user_id = registered.json()["id"]
    flow.expect(registered, "register", user_id)

    login = checked(
        await client.post(f"{API}/auth/login", json={"email": email, "password": password}), 200
    )
    token = flow.secret("access token", login.json()["access_token"])
    token_auth = flow.secret("token Authorization header", f"Bearer {token}")
    flow.expect(login, "login", user_id)

    wrong = checked(
        await client.post(f"{API}/auth/login", json={"email": email, "password": wrong_password}),
        401,
    )
    flow.expect(wrong, "login_failed", user_id)
    unknown = checked(
        await client.post(
            f"{API}/auth/login",
            json={
                "email": f"nobody-{uuid.uuid4().hex[:8]}@example.test",
                "password": stranger_password,
            },
        ),
        401,
    )
    flow.expect(unknown, "login_failed", None)

    by_cookie = checked(
        await client.post(
            f"{API}/auth/login", json={"email": email, "password": password, "cookie": True}
        ),
        200,
    )
    flow.expect(by_cookie, "login", user_id)
    cookies = set_cookies(by_cookie)
    client.cookies.clear()  # each request says which cookies it sends
    session_cookie = flow.secret("session cookie", cookies[SESSION].value)
    csrf = flow.secret("CSRF token", cookies[CSRF].value)
    assert session_cookie == by_cookie.json()["access_token"]
    cookie_header = flow.secret("Cookie header", f"{SESSION}={session_cookie}; {CSRF}={csrf}")
    cookie_auth = {"Cookie": cookie_header, "X-CSRF-Token": csrf}

    made_by_cookie = checked(
        await client.post(f"{API}/api-keys", json={"name": "by cookie"}, headers=cookie_auth), 201
    )
    first_key = made_by_cookie.json()
    flow.expect(
        made_by_cookie,
        "api_key_created",
        user_id,
        api_key_id=first_key["id"],
        prefix=first_key["prefix"],
    )
    made_by_token = checked(
        await client.post(f"{API}/api-keys", json={"name": "by token"}, headers=bearer(token)), 201
    )
    second_key = made_by_token.json()
    flow.expect(
        made_by_token,
        "api_key_created",
        user_id,
        api_key_id=second_key["id"],
        prefix=second_key["prefix"],
    )
    for name, key in (("first", first_key), ("second", second_key)):
        full = flow.secret(f"{name} API key", key["key"])
        visible = f"cs_{key['prefix']}_"
        assert api_key_prefix(full) == key["prefix"]
        assert full.startswith(visible)
        flow.secret(f"{name} API key's secret part", full.removeprefix(visible))
        flow.secret(f"{name} API key Authorization header", f"Bearer {full}")
    key_auth = bearer(second_key["key"])

    session = checked(await client.post(f"{API}/sessions", json={}, headers=key_auth), 201)
    session_id = session.json()["id"]
    run_id, approval = await ask_for_a_file(client, key_auth, session_id, "approved.txt")
    approved = checked(
        await client.post(
            f"{API}/sessions/{session_id}/approvals/{approval['id']}",
            json={"decision": "approve"},
            headers=key_auth,
        ),
        200,
    )
    flow.expect(
        approved,
        "approval_decided",
        user_id,
        approval_id=approval["id"],
        run_id=run_id,
        decision="approved",
    )
    await wait_for_run(client, key_auth, session_id, run_id, "succeeded")
    run_id, approval = await ask_for_a_file(client, key_auth, session_id, "rejected.txt")
    rejected = checked(
        await client.post(
            f"{API}/sessions/{session_id}/approvals/{approval['id']}",
            json={"decision": "reject", "reason": "not this one"},
            headers=cookie_auth,
        ),
        200,
    )
    flow.expect(
        rejected,
        "approval_decided",
        user_id,
        approval_id=approval["id"],
        run_id=run_id,
        decision="rejected",
    )
    await wait_for_run(client, key_auth, session_id, run_id, "succeeded")

    deleted = checked(
        await client.delete(f"{API}/api-keys/{first_key['id']}", headers=key_auth), 204
    )
    flow.expect(deleted, "api_key_deleted", user_id, api_key_id=first_key["id"])
    out_by_cookie = checked(await client.post(f"{API}/auth/logout", headers=cookie_auth), 204)
    flow.expect(out_by_cookie, "logout", user_id)
    out_by_token = checked(await client.post(f"{API}/auth/logout", headers=bearer(token)), 204)
    flow.expect(out_by_token, "logout", user_id)
    assert token_auth == f"Bearer {token}"

    # The dead credentials knock again: refused, and refused quietly.
    for headers in (bearer(token), bearer(first_key["key"]), cookie_auth):
        checked(await client.get(f"{API}/me", headers=headers), 401)
    tampered = second_key["key"][:-1] + ("A" if second_key["key"][-1] != "A" else "B")
    flow.secret("tampered API key", tampered)
    checked(await client.get(f"{API}/me", headers=bearer(tampered)), 401)
    return flow


# --- reading the logs ------------------------------------------------------------------------


class KeepEverything(logging.Handler):
    """Keeps each record, and its text as the server would write it (JSON and plain text)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.addFilter(CorrelationIdFilter(default_value="-"))
        # The formats of countersign.app.configure_logging.
        self.json = JsonFormatter(
            "%(levelname)s %(name)s %(message)s %(correlation_id)s",
            timestamp="time",
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
        )
        self.text = logging.Formatter(
            "%(asctime)s %(levelname)-7s [%(correlation_id)s] %(name)s: %(message)s"
        )
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.json.format(record))
        self.lines.append(self.text.format(record))
        # Everything the record holds, arguments and extra fields included.
        self.lines.append(repr(vars(record)))


@pytest.fixture
def all_logs() -> Iterator[KeepEverything]:
    """Every log record of every logger, at DEBUG, while the test runs."""
    handler = KeepEverything()
    root = logging.getLogger()
    saved_root_level = root.level
    saved_disable = logging.root.manager.disable
    saved: dict[logging.Logger, tuple[int, bool]] = {}
    # Loggers already made may carry levels (sqlalchemy, uvicorn, ...) or be disabled: open
    # them all; the ones that do not propagate get the handler themselves.
    for logger in list(logging.root.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            saved[logger] = (logger.level, logger.disabled)
            logger.setLevel(logging.NOTSET)
            logger.disabled = False
            if not logger.propagate:
                logger.addHandler(handler)
    logging.disable(logging.NOTSET)
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_root_level)
        logging.disable(saved_disable)
        for logger, (level, disabled) in saved.items():
            logger.setLevel(level)
            logger.disabled = disabled
            logger.removeHandler(handler)


def assert_no_secret(text: str, flow: Flow, where: str) -> None:
    for name, value in flow.secrets.items():
        for line in text.splitlines():
            if value in line:
                # The line up to the secret, so that the failure does not print it.
                shown = line[: line.index(value)][-300:]
                raise AssertionError(f"the {name} is in {where}: ...{shown}<the {name}>")


def assert_audited(lines: list[dict[str, Any]], flow: Flow) -> None:
    """The audit lines are exactly the expected ones, in order, each with its fields."""
    got = [(line["event"], line["user_id"], line["request_id"]) for line in lines]
    want = [(item.event, item.user_id, item.request_id) for item in flow.expected]
    assert got == want
    for line, item in zip(lines, flow.expected, strict=True):
        assert item.request_id not in {"", "-"}
        for name, value in item.fields.items():
            assert line[name] == value, (item.event, name, line)


async def test_audit_lines_name_the_actor_and_no_log_line_carries_a_secret(
    database: TestDatabase, tmp_path: Path, all_logs: KeepEverything
) -> None:
    """In-process, every logger at DEBUG: the audit lines are there, secrets are nowhere."""
    # The app starts after the capture, so the engine sees its loggers open from the start.
    async with serve(database, tmp_path) as (_app, client):
        flow = await account_flow(client)
    records = all_logs.records
    audit = [
        {**vars(record), "request_id": record.correlation_id}  # type: ignore[attr-defined]
        for record in records
        if record.name == AUDIT
    ]
    assert_audited(audit, flow)
    # The capture did see the chatty loggers: SQL with its parameters, and the access log.
    names = {record.name for record in records}
    assert any(name.startswith("sqlalchemy.engine") for name in names), names
    assert "countersign.access" in names, names
    for line in all_logs.lines:
        assert_no_secret(line, flow, "a log line")


@pytest.mark.slow
async def test_a_real_servers_json_log_at_debug_has_the_audit_lines_and_no_secret(
    database: TestDatabase, tmp_path: Path
) -> None:
    """``countersign serve`` with JSON logs at DEBUG: everything it writes, uvicorn's lines
    included, is read back; the audit lines parse with their fields; no secret is there."""
    workspaces = tmp_path / "workspaces"
    env = server_env(
        database.url, log_level="DEBUG", log_format="json", workspace_root=str(workspaces)
    )
    with ServerProcesses(tmp_path) as servers:
        server = servers.start("audit", env=env)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=WAIT) as client:
            flow = await account_flow(client)
        stopped = server.stop()
        assert not stopped.killed
        output = server.stderr()
    lines: list[dict[str, Any]] = []
    for text in output.splitlines():
        if text.startswith("{"):
            lines.append(json.loads(text))
    assert lines, output[-2000:]
    assert {"uvicorn.error", "countersign.access"} <= {line["logger"] for line in lines}
    assert_audited([line for line in lines if line["logger"] == AUDIT], flow)
    assert_no_secret(output, flow, "the server's output")


@pytest.mark.slow
async def test_a_real_servers_debug_log_has_no_password_hash(
    database: TestDatabase, tmp_path: Path
) -> None:
    """A password's argon2 hash is as good as the password to an offline guesser: no log line
    may carry it, not even at DEBUG (the database drivers log statements with parameters)."""
    env = server_env(
        database.url, log_level="DEBUG", log_format="json", workspace_root=str(tmp_path / "ws")
    )
    email = f"hashed-{uuid.uuid4().hex[:10]}@example.test"
    with ServerProcesses(tmp_path) as servers:
        server = servers.start("hash", env=env)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=WAIT) as client:
            body = {"email": email, "password": "orchid lantern tundra 7"}
            checked(await client.post(f"{API}/auth/register", json=body), 201)
            checked(await client.post(f"{API}/auth/login", json=body), 200)
        assert not server.stop().killed
        output = server.stderr()
    engine = create_async_engine(normalise_database_url(database.url))
    try:
        async with engine.connect() as connection:
            found = await connection.execute(
                select(UserRow.password_hash).where(UserRow.email == email)
            )
            password_hash = found.scalar_one()
    finally:
        await engine.dispose()
    assert password_hash is not None
    assert password_hash.startswith("$argon2")
    assert password_hash not in output, "the password hash is in the server's log"
