"""Authorization matrix: every route of the OpenAPI schema, walked with bad credentials and with
another user's ids.

The routes come from ``app.openapi()``, so a new route is covered the day it is added, and the
tables below make its author decide consciously: a route that takes a body needs an entry in
``BODIES``; a new path parameter needs an entry in ``RESOURCE_PARAMS`` (or
``NON_RESOURCE_PARAMS``); a route that is public needs an entry in ``PUBLIC_OPERATIONS``.

1. Every ``/api/v1`` operation except the public ones answers 401 in the error envelope to a
   caller without credentials or with wrong ones, and writes nothing.
2. User A makes real resources (an API key, an agent, a session, a run that waits on a pending
   approval). User B calls every operation whose path (or body) names a resource with A's ids,
   by API key, by access token and by cookie with its CSRF token: every answer is 404 with
   exactly the body of the same call with random ids in their place, streaming routes
   included, and no row of any table changes.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import inspect, select
from sqlalchemy.ext.asyncio import create_async_engine

from countersign.config import normalise_database_url
from countersign.db.tables import Base
from tests.api.test_auth import CSRF, SESSION, set_cookies
from tests.api.test_errors import MakeAccount, assert_error, unknown_api_key
from tests.api.test_runs import WAIT, events, wait_for_status
from tests.conftest import Account
from tests.support.databases import TestDatabase

API = "/api/v1"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
ACCOUNT_PASSWORD = "correct horse battery"
"""The password ``make_account`` (tests/conftest.py) gives its users."""

PUBLIC_OPERATIONS: dict[tuple[str, str], bool] = {
    # (method, path template): True when the route must exist today, False while optional.
    ("POST", f"{API}/auth/register"): True,
    ("POST", f"{API}/auth/login"): True,
    # A login page asks which sign-in buttons to show before anyone has signed in.
    ("GET", f"{API}/auth/providers"): True,
    # OAuth/OIDC: a browser arrives with no credentials.
    ("GET", f"{API}/auth/oauth/{{provider}}/login"): True,
    ("GET", f"{API}/auth/oauth/{{provider}}/callback"): True,
}
"""The only /api/v1 operations that take no credentials."""

OUTSIDE_API = {"/health/live", "/health/ready", "/metrics"}
"""The only documented paths outside /api/v1: probes and metrics, public by design."""

RESOURCE_PARAMS = {
    "session_id": "a session",
    "run_id": "a run of that session",
    "approval_id": "a pending approval of that session",
    "agent_id": "an agent",
    "key_id": "an API key",
}
"""Path (and body) parameters that name a resource someone owns; user A makes one of each."""

NON_RESOURCE_PARAMS = {"provider": "google"}
"""Path parameters that name no resource, and the value used for them."""

IDEMPOTENCY_KEY = "shared-idempotency-key"
"""Sent by A on its creates and by B on every call: keys belong to their user, so B's calls
must not replay A's stored answers."""

BODIES: dict[tuple[str, str], dict[str, Any]] = {
    # A valid body for every operation that takes one. "{name}" is replaced by an id.
    ("POST", f"{API}/api-keys"): {"name": "matrix key"},
    ("POST", f"{API}/agents"): {"name": "matrix agent"},
    ("PATCH", f"{API}/agents/{{agent_id}}"): {
        "name": "taken over",
        "instructions": "obey user B",
        "tools": [{"name": "shell", "policy": "auto"}],
    },
    ("POST", f"{API}/sessions"): {"title": "on A's agent", "agent_id": "{agent_id}"},
    ("PATCH", f"{API}/sessions/{{session_id}}"): {"title": "taken over", "status": "archived"},
    ("POST", f"{API}/sessions/{{session_id}}/messages"): {"content": "hello from B"},
    ("POST", f"{API}/sessions/{{session_id}}/approvals/{{approval_id}}"): {
        "decision": "approve",
        "reason": "B says yes",
        "arguments": {"path": "b.txt", "content": "written by B"},
    },
}


@dataclass(frozen=True)
class Operation:
    """One (method, path template) of the OpenAPI schema."""

    method: str
    template: str
    path_params: tuple[str, ...]
    has_body: bool
    streams: bool
    """It can answer with ``text/event-stream``."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.method, self.template)

    @property
    def body_params(self) -> tuple[str, ...]:
        """The resource ids its body names."""
        template = BODIES.get(self.key)
        return () if template is None else tuple(sorted(_placeholders(template)))

    @property
    def resource_params(self) -> tuple[str, ...]:
        """Every resource id the operation names, in its path or in its body."""
        named = [name for name in self.path_params if name in RESOURCE_PARAMS]
        return tuple(dict.fromkeys([*named, *self.body_params]))

    def path(self, ids: Mapping[str, str]) -> str:
        path = self.template
        for name in self.path_params:
            path = path.replace(f"{{{name}}}", ids.get(name) or NON_RESOURCE_PARAMS[name])
        return path

    def body(self, ids: Mapping[str, str]) -> Any:
        template = BODIES.get(self.key)
        return None if template is None else _fill(template, ids)

    def __str__(self) -> str:
        return f"{self.method} {self.template}"


def _placeholders(value: Any) -> set[str]:
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return {value[1:-1]}
    if isinstance(value, dict):
        return set().union(*(_placeholders(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(_placeholders(item) for item in value))
    return set()


def _fill(value: Any, ids: Mapping[str, str]) -> Any:
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return ids[value[1:-1]]
    if isinstance(value, dict):
        return {name: _fill(item, ids) for name, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, ids) for item in value]
    return value


def operations(app: FastAPI) -> list[Operation]:
    """Every operation of the app's OpenAPI schema, checked against the tables above."""
    found: list[Operation] = []
    problems: list[str] = []
    for template, item in app.openapi()["paths"].items():
        if not template.startswith(f"{API}/"):
            if template not in OUTSIDE_API:
                problems.append(f"{template}: outside {API} and not in OUTSIDE_API")
            continue
        for method in HTTP_METHODS:
            spec = item.get(method)
            if spec is None:
                continue
            params = tuple(p["name"] for p in spec.get("parameters", []) if p["in"] == "path")
            for param in spec.get("parameters", []):
                if param["in"] != "path":
                    continue
                name, fmt = param["name"], param.get("schema", {}).get("format")
                if fmt == "uuid" and name not in RESOURCE_PARAMS:
                    problems.append(f"{method} {template}: {name} names a resource unknown here")
                if fmt != "uuid" and name not in NON_RESOURCE_PARAMS:
                    problems.append(f"{method} {template}: path parameter {name} is unknown here")
            streams = any(
                "text/event-stream" in (answer.get("content") or {})
                for answer in spec.get("responses", {}).values()
            )
            found.append(
                Operation(
                    method=method.upper(),
                    template=template,
                    path_params=params,
                    has_body="requestBody" in spec,
                    streams=streams,
                )
            )
    by_key = {operation.key: operation for operation in found}
    for operation in found:
        needs_body = operation.has_body and operation.key not in PUBLIC_OPERATIONS
        if needs_body and operation.key not in BODIES:
            problems.append(f"{operation}: takes a body but has no entry in BODIES")
    for key in BODIES:
        if key not in by_key or not by_key[key].has_body:
            problems.append(f"{key}: BODIES names an operation without a body, or none at all")
    for key, required in PUBLIC_OPERATIONS.items():
        if required and key not in by_key:
            problems.append(f"{key}: a required public operation is missing")
    assert not problems, "\n".join(problems)
    return found


def protected(app: FastAPI) -> list[Operation]:
    """The /api/v1 operations that need a caller."""
    return [op for op in operations(app) if op.key not in PUBLIC_OPERATIONS]


def test_the_tables_match_the_schema(app: FastAPI) -> None:
    """The schema is walked: required public routes exist, the id-naming routes are there."""
    found = operations(app)
    keys = {operation.key for operation in found}
    assert {key for key, required in PUBLIC_OPERATIONS.items() if required} <= keys
    with_ids = [op for op in protected(app) if op.resource_params]
    # Today's routes; more may come, none may go unnoticed.
    assert len(with_ids) >= 15, [str(op) for op in with_ids]
    assert {name for op in with_ids for name in op.resource_params} == set(RESOURCE_PARAMS)
    assert {str(op) for op in found if op.streams} >= {
        f"GET {API}/sessions/{{session_id}}/runs/{{run_id}}/events",
        f"POST {API}/sessions/{{session_id}}/messages",
    }


# --- the database, every row ---------------------------------------------------------------

Snapshot = dict[str, list[dict[str, Any]]]


async def snapshot(database: TestDatabase) -> Snapshot:
    """Every row of every table, ordered by primary key, read through its own connection."""
    engine = create_async_engine(normalise_database_url(database.url))
    try:
        async with engine.connect() as connection:
            names = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
            # The snapshot must see every table the migrations made.
            assert set(names) - {"alembic_version"} == set(Base.metadata.tables), names
            rows: Snapshot = {}
            for table in Base.metadata.sorted_tables:
                query = select(table).order_by(*table.primary_key.columns)
                result = await connection.execute(query)
                rows[table.name] = [dict(row._mapping) for row in result]
            await connection.rollback()
    finally:
        await engine.dispose()
    return rows


def without_own_authentication(rows: Snapshot, user_id: uuid.UUID) -> Snapshot:
    """The snapshot less what authenticating as ``user_id`` legitimately writes.

    The only exclusions: ``last_used_at`` of that user's own API keys and access tokens, which
    a successful authentication writes (at most once a minute per credential; see
    docs/accounts.md). Every other column of every row, that user's included, is compared.
    """
    cleaned = dict(rows)
    for table in ("api_keys", "access_tokens"):
        cleaned[table] = [
            {**row, "last_used_at": None} if row["user_id"] == user_id else row
            for row in rows[table]
        ]
    return cleaned


def assert_same_rows(before: Snapshot, after: Snapshot) -> None:
    for table in before:
        assert before[table] == after[table], f"table {table} changed"
    assert before == after


# --- 1. no caller, no access ---------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """A way to call with credentials that are missing or not valid."""

    name: str
    headers: dict[str, str]


async def bad_credentials(client: httpx.AsyncClient, account: Account) -> list[Attempt]:
    """No credentials, and wrong ones of each kind (some made from a real user's)."""
    login = await client.post(
        f"{API}/auth/login", json={"email": account.user.email, "password": ACCOUNT_PASSWORD}
    )
    assert login.status_code == 200, login.text
    revoked = login.json()["access_token"]
    logout = await client.post(f"{API}/auth/logout", headers=bearer(revoked))
    assert logout.status_code == 204, logout.text
    tampered = account.key[:-1] + ("A" if account.key[-1] != "A" else "B")
    assert tampered != account.key
    forged_csrf = secrets.token_urlsafe(32)
    return [
        Attempt("no credentials", {}),
        Attempt("unknown access token", bearer(secrets.token_urlsafe(32))),
        Attempt("unknown API key", bearer(unknown_api_key())),
        Attempt("real key, wrong secret", bearer(tampered)),
        Attempt("logged-out access token", bearer(revoked)),
        Attempt(
            "unknown session cookie",
            {
                "Cookie": f"{SESSION}={secrets.token_urlsafe(32)}; {CSRF}={forged_csrf}",
                "X-CSRF-Token": forged_csrf,
            },
        ),
    ]


def random_ids() -> dict[str, str]:
    return {name: str(uuid.uuid4()) for name in RESOURCE_PARAMS}


def accept_variants(operation: Operation) -> list[dict[str, str]]:
    """Extra headers to send: none, and for streaming routes also Accept: text/event-stream."""
    return [{}, {"Accept": "text/event-stream"}] if operation.streams else [{}]


async def call(
    client: httpx.AsyncClient,
    operation: Operation,
    ids: Mapping[str, str],
    headers: Mapping[str, str],
) -> httpx.Response:
    """Call the operation with these ids, its table body and headers, bounded in time."""
    body = operation.body(ids)
    async with asyncio.timeout(WAIT):  # a stream that leaked would end at approval.required
        return await client.request(
            operation.method, operation.path(ids), headers=dict(headers), json=body
        )


async def test_every_route_refuses_callers_without_valid_credentials(
    app: FastAPI, client: httpx.AsyncClient, make_account: MakeAccount, database: TestDatabase
) -> None:
    """401 in the envelope, the same body on every route for each kind of bad credential
    (the wrong ones all alike), and not one row written by the refused calls."""
    account = await make_account()
    attempts = await bad_credentials(client, account)
    ops = protected(app)
    before = await snapshot(database)
    bodies: dict[str, set[bytes]] = {attempt.name: set() for attempt in attempts}
    calls = 0
    for operation in ops:
        for extra in accept_variants(operation):
            for attempt in attempts:
                response = await call(client, operation, random_ids(), {**attempt.headers, **extra})
                where = f"{operation} {extra} with {attempt.name}"
                assert response.status_code == 401, (where, response.text)
                assert_error(response, 401, "unauthenticated")
                assert response.headers["www-authenticate"] == "Bearer", where
                assert "set-cookie" not in response.headers, where
                bodies[attempt.name].add(response.content)
                calls += 1
    assert calls >= len(ops) * len(attempts)
    # Each kind of credential gets one answer whatever the route (nothing about the route or
    # its ids is told), and credentials that do not exist are not told apart.
    for name, seen in bodies.items():
        assert len(seen) == 1, (name, seen)
    wrong = {
        body
        for name in (
            "unknown access token",
            "unknown API key",
            "real key, wrong secret",
            "unknown session cookie",
        )
        for body in bodies[name]
    }
    assert len(wrong) == 1, wrong
    assert_same_rows(before, await snapshot(database))


# --- 2. another user's ids -------------------------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """One way user B authenticates."""

    name: str
    bearer: str | None = None
    cookie: tuple[str, str] | None = None
    """(session cookie, CSRF token)."""

    def headers(self, method: str) -> dict[str, str]:
        if self.bearer is not None:
            return bearer(self.bearer)
        assert self.cookie is not None
        token, csrf = self.cookie
        headers = {"Cookie": f"{SESSION}={token}; {CSRF}={csrf}"}
        if method in UNSAFE_METHODS:
            headers["X-CSRF-Token"] = csrf
        return headers


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def credentials_of(client: httpx.AsyncClient, account: Account) -> list[Credential]:
    """The account's API key, an access token and a cookie login with its CSRF token."""
    email = account.user.email
    token = await client.post(
        f"{API}/auth/login", json={"email": email, "password": ACCOUNT_PASSWORD}
    )
    assert token.status_code == 200, token.text
    cookie = await client.post(
        f"{API}/auth/login", json={"email": email, "password": ACCOUNT_PASSWORD, "cookie": True}
    )
    assert cookie.status_code == 200, cookie.text
    cookies = set_cookies(cookie)
    client.cookies.clear()  # every request says which cookies it sends
    return [
        Credential("API key", bearer=account.key),
        Credential("access token", bearer=token.json()["access_token"]),
        Credential("cookie", cookie=(cookies[SESSION].value, cookies[CSRF].value)),
    ]


async def owned_resources(
    client: httpx.AsyncClient, account: Account, *, idempotency_key: str
) -> dict[str, str]:
    """Real resources of the account, made through the API: an API key, an agent, a session
    with a run that waits on a pending approval. Returns their ids by parameter name."""
    headers = {**account.headers, "Idempotency-Key": idempotency_key}
    key = await client.post(f"{API}/api-keys", json={"name": "owned"}, headers=headers)
    assert key.status_code == 201, key.text
    agent = await client.post(f"{API}/agents", json={"name": "owned agent"}, headers=headers)
    assert agent.status_code == 201, agent.text
    # The default agent: its write_file policy is `ask`, so the run stops for an approval.
    session = await client.post(f"{API}/sessions", json={}, headers=headers)
    assert session.status_code == 201, session.text
    session_id = session.json()["id"]
    sent = await client.post(
        f"{API}/sessions/{session_id}/messages",
        json={"content": '/tool write_file {"path": "a.txt", "content": "x"}'},
        headers=headers,
    )
    assert sent.status_code == 202, sent.text
    run_id = sent.json()["run"]["id"]
    log = await events(client, account, session_id, run_id)
    assert log[-1].event == "approval.required", log
    # The executor is done with the run: nothing moves until someone decides.
    await wait_for_status(client, account, session_id, run_id, "awaiting_approval")
    pending = await client.get(
        f"{API}/sessions/{session_id}/pending-approvals", headers=account.headers
    )
    assert pending.status_code == 200, pending.text
    [approval] = pending.json()["items"]
    assert approval["id"] == log[-1].data["approval_id"]
    return {
        "key_id": key.json()["id"],
        "agent_id": agent.json()["id"],
        "session_id": session_id,
        "run_id": run_id,
        "approval_id": approval["id"],
    }


def id_choices(
    operation: Operation, alice: Mapping[str, str], bob: Mapping[str, str]
) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """(ids to call with, the same with A's ids made random) for each mix of A's and B's own
    ids that names at least one of A's: e.g. A's session with A's run, and B's session with
    A's run."""
    names = operation.resource_params
    owners = [("alice", "bob") if name in bob else ("alice",) for name in names]
    for choice in itertools.product(*owners):
        if "alice" not in choice:
            continue
        theirs = {
            n: (alice if who == "alice" else bob)[n] for n, who in zip(names, choice, strict=True)
        }
        random = {
            n: str(uuid.uuid4()) if who == "alice" else bob[n]
            for n, who in zip(names, choice, strict=True)
        }
        yield theirs, random


async def test_another_users_ids_answer_exactly_like_missing_ones_and_change_nothing(
    app: FastAPI, client: httpx.AsyncClient, make_account: MakeAccount, database: TestDatabase
) -> None:
    """B, with each of its credentials, calls every operation that names A's resources: 404,
    byte for byte the answer for random ids, and every table as it was."""
    alice, bob = await make_account(), await make_account()
    alice_ids = await owned_resources(client, alice, idempotency_key=IDEMPOTENCY_KEY)
    # B has resources of its own too, so that "B's session with A's run" is tried as well
    # (made with another Idempotency-Key: B's reuse of its own key would rightly be a 422).
    bob_ids = await owned_resources(client, bob, idempotency_key="bob's own key")
    assert set(alice_ids) == set(RESOURCE_PARAMS)
    credentials = await credentials_of(client, bob)
    ops = [op for op in protected(app) if op.resource_params]

    before = await snapshot(database)
    tried: list[str] = []
    for credential in credentials:
        for operation in ops:
            for extra in accept_variants(operation):
                headers = {
                    **credential.headers(operation.method),
                    "Idempotency-Key": IDEMPOTENCY_KEY,
                    **extra,
                }
                for theirs, random in id_choices(operation, alice_ids, bob_ids):
                    where = f"{operation} {extra} by {credential.name} with {theirs}"
                    answer = await call(client, operation, theirs, headers)
                    missing = await call(client, operation, random, headers)
                    assert answer.status_code == 404, (where, answer.text)
                    assert_error(answer, 404, "not_found")
                    assert_error(missing, 404, "not_found")
                    # Whole bodies, byte for byte: no 404 here carries a request-specific
                    # value (no ids, no request id), so they must be identical.
                    assert answer.content == missing.content, (where, answer.text, missing.text)
                    assert answer.headers["content-type"] == missing.headers["content-type"]
                    tried.append(where)
    after = await snapshot(database)
    bob_id = bob.user.id
    assert_same_rows(
        without_own_authentication(before, bob_id), without_own_authentication(after, bob_id)
    )
    assert len(tried) >= 3 * 15, tried

    # The ids were real: A still reaches every one of them, untouched.
    session_id, run_id = alice_ids["session_id"], alice_ids["run_id"]
    for path in (
        f"{API}/agents/{alice_ids['agent_id']}",
        f"{API}/sessions/{session_id}",
        f"{API}/sessions/{session_id}/runs/{run_id}",
    ):
        response = await client.get(path, headers=alice.headers)
        assert response.status_code == 200, (path, response.text)
    run = await client.get(f"{API}/sessions/{session_id}/runs/{run_id}", headers=alice.headers)
    assert run.json()["status"] == "awaiting_approval"
    pending = await client.get(
        f"{API}/sessions/{session_id}/pending-approvals", headers=alice.headers
    )
    assert [item["id"] for item in pending.json()["items"]] == [alice_ids["approval_id"]]
    keys = await client.get(f"{API}/api-keys", headers=alice.headers)
    assert alice_ids["key_id"] in {item["id"] for item in keys.json()["items"]}


async def test_a_message_to_another_users_session_without_a_key_writes_nothing(
    client: httpx.AsyncClient, make_account: MakeAccount, database: TestDatabase
) -> None:
    """A message without an Idempotency-Key starts its run in one statement (on PostgreSQL,
    writes that happen only if the session is the caller's): to A's session, from B, it
    answers 404 exactly like a missing session, as JSON and as a stream, and writes nothing."""
    alice, bob = await make_account(), await make_account()
    session = await client.post(f"{API}/sessions", json={}, headers=alice.headers)
    assert session.status_code == 201, session.text
    theirs = f"{API}/sessions/{session.json()['id']}/messages"
    missing = f"{API}/sessions/{uuid.uuid4()}/messages"
    before = await snapshot(database)
    for accept in ({}, {"Accept": "text/event-stream"}):
        headers = {**bob.headers, **accept}
        answer = await client.post(theirs, json={"content": "hello from B"}, headers=headers)
        absent = await client.post(missing, json={"content": "hello from B"}, headers=headers)
        assert answer.status_code == 404, answer.text
        assert_error(answer, 404, "not_found")
        assert answer.content == absent.content
    after = await snapshot(database)
    assert_same_rows(
        without_own_authentication(before, bob.user.id),
        without_own_authentication(after, bob.user.id),
    )
    # The session is still A's to use.
    mine = await client.post(theirs, json={"content": "hello"}, headers=alice.headers)
    assert mine.status_code == 202, mine.text
