"""Runs end to end through the real app: providers, invariants 3, 4 and 9, retries and 409s.

Every test builds the real application (lifespan, executor, migrated database) with settings of
its own; OpenAI-compatible models are served by ``tests.support.fake_openai`` on 127.0.0.1.
What the app committed is checked from a separate connection (``Peer``), never through the
app's own pool.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from httpx_sse import aconnect_sse

from countersign.app import create_app
from countersign.config import Settings
from countersign.domain.models import Lease, MessageId, Run, RunId, RunStatus, SessionId
from countersign.services import ServiceDeps
from countersign.services.accounts import create_api_key, create_user
from tests.api.test_runs import (
    Sse,
    events,
    messages_of,
    new_session,
    parse_sse,
    run_of,
    send,
    wait_for_status,
)
from tests.conftest import Account, make_settings
from tests.support.databases import TestDatabase
from tests.support.fake_openai import FakeOpenAI, Reply, error, hang, text, tool_call
from tests.support.postgres import free_port

WAIT = 20.0
"""The bound on any one wait in this file; no test should come near it."""
API_KEY = "countersign-test-key-Zx9Qw8Er7Ty6Ui5Op4"
"""The key the app is given; no failure reason may show it. Not shaped like OpenAI's ``sk-...``
(a local OpenAI-compatible server's key can be anything), so hiding it takes more than a regex."""
FAKE_MODEL = "openai:fake"


# --- the harness ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Harness:
    """A running app, an HTTP client for it and an account on it."""

    app: FastAPI
    client: httpx.AsyncClient
    account: Account
    settings: Settings


@asynccontextmanager
async def running_app(
    database: TestDatabase, tmp_path: Path, **overrides: Any
) -> AsyncIterator[Harness]:
    """The real app on ``database`` with these settings, a client and a fresh account."""
    settings = make_settings(database.url, workspace_root=tmp_path / "ws", **overrides)
    application = create_app(settings)
    async with LifespanManager(application, startup_timeout=30, shutdown_timeout=30):
        services: ServiceDeps = application.state.services
        email = f"runs-{uuid.uuid4().hex[:12]}@example.test"
        user = await create_user(services, email=email, password="correct horse battery")
        _key, secret = await create_api_key(services, email=email, name="test")
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://countersign.test"
        ) as http:
            yield Harness(application, http, Account(user=user, key=secret), settings)


def fake_model_settings(server: FakeOpenAI, **overrides: Any) -> dict[str, Any]:
    """Settings overrides for an app whose default agent talks to the fake server."""
    values: dict[str, Any] = {
        "default_model": FAKE_MODEL,
        "openai_base_url": server.base_url,
        "openai_api_key": API_KEY,
        "model_timeout_seconds": 10,
    }
    values.update(overrides)
    return values


@asynccontextmanager
async def served_over_tcp(app: FastAPI) -> AsyncIterator[str]:
    """Serve an app (whose lifespan already runs) with uvicorn on 127.0.0.1; yield its URL.

    httpx's ASGITransport hands over a response only once it is complete, so watching a stream
    as it arrives needs a real server and a real socket.
    """
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, lifespan="off", log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(WAIT):
            while not server.started:
                if task.done():
                    task.result()
                    raise AssertionError("uvicorn stopped before it started")
                await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(WAIT):
            await task


class Peer:
    """A connection of the test's own to the app's database: what is committed, from outside.

    SQLite: a plain ``sqlite3`` connection in autocommit mode with ``busy_timeout=0``, so that
    any lock the app holds shows at once. PostgreSQL: an ``asyncpg`` connection.
    """

    def __init__(self, database: TestDatabase) -> None:
        self.database = database
        self._pg: asyncpg.Connection | None = None
        self._sqlite: sqlite3.Connection | None = None

    async def __aenter__(self) -> Peer:
        if self.database.backend == "postgres":
            self._pg = await asyncpg.connect(self.database.url, timeout=10)
        else:
            self._sqlite = sqlite3.connect(self.database.name, timeout=0, isolation_level=None)
            self._sqlite.execute("PRAGMA busy_timeout=0")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._pg is not None:
            await self._pg.close()
        if self._sqlite is not None:
            self._sqlite.close()

    @property
    def sqlite(self) -> sqlite3.Connection:
        assert self._sqlite is not None, "not a SQLite peer"
        return self._sqlite

    @property
    def pg(self) -> asyncpg.Connection:
        assert self._pg is not None, "not a PostgreSQL peer"
        return self._pg

    def _id(self, value: str) -> Any:
        """A UUID as the database stores it (native on PostgreSQL, 32 hex digits on SQLite)."""
        parsed = uuid.UUID(value)
        return parsed if self._pg is not None else parsed.hex

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of a query written with ``?`` placeholders; ids given as UUID strings."""
        params = [self._id(arg) if _is_uuid(arg) else arg for arg in args]
        if self._pg is not None:
            numbered = iter(range(1, len(params) + 1))
            pg_sql = re.sub(r"\?", lambda _match: f"${next(numbered)}", sql)
            return [tuple(row) for row in await self._pg.fetch(pg_sql, *params)]
        return list(self.sqlite.execute(sql, params).fetchall())

    async def stored_events(self, run_id: str) -> list[Sse]:
        """The run's committed events, shaped as SSE gives them (payload: data + ids)."""
        rows = await self.fetch(
            "SELECT seq, type, attempt, data, created_at FROM events WHERE run_id = ? ORDER BY seq",
            run_id,
        )
        stored: list[Sse] = []
        for seq, type_, attempt, data, created_at in rows:
            payload = json.loads(data) if isinstance(data, str) else dict(data)
            at = (
                created_at
                if isinstance(created_at, datetime)
                else datetime.fromisoformat(created_at)
            )
            at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
            payload.update({"run_id": run_id, "seq": seq, "attempt": attempt, "at": at.isoformat()})
            stored.append(Sse(seq, type_, payload))
        return stored

    async def count(self, sql: str, *args: Any) -> int:
        [(value,)] = await self.fetch(sql, *args)
        return int(value)


def _is_uuid(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


async def wait_until(
    check: Callable[[], Any], *, what: str, within: float = WAIT, every: float = 0.02
) -> Any:
    """Poll an async ``check`` until it returns something truthy; fail after ``within`` s."""
    try:
        async with asyncio.timeout(within):
            while True:
                result = await check()
                if result:
                    return result
                await asyncio.sleep(every)
    except TimeoutError:
        raise AssertionError(f"timed out after {within} s waiting for {what}") from None


async def wait_for_end(harness: Harness, session_id: str, run_id: str) -> dict[str, Any]:
    """The run once it has ended (any final status)."""

    async def ended() -> dict[str, Any] | None:
        run = await run_of(harness.client, harness.account, session_id, run_id)
        return run if run["status"] in ("succeeded", "failed", "cancelled") else None

    result: dict[str, Any] = await wait_until(ended, what=f"run {run_id} to end")
    return result


async def post_message(
    harness: Harness, session_id: str, content: str, **headers: str
) -> httpx.Response:
    async with asyncio.timeout(WAIT):
        return await harness.client.post(
            f"/api/v1/sessions/{session_id}/messages",
            json={"content": content},
            headers={**harness.account.headers, **headers},
        )


def deltas_of(log: list[Sse]) -> list[str]:
    return [event.data["text"] for event in log if event.event == "text.delta"]


# --- 1. providers through the fake OpenAI server --------------------------------------------


async def test_a_streamed_text_reply_arrives_as_deltas_and_is_stored(
    database: TestDatabase, tmp_path: Path
) -> None:
    with FakeOpenAI() as server:
        server.script(text("Hello", " from", " the fake."))
        async with running_app(database, tmp_path, **fake_model_settings(server)) as harness:
            client, account = harness.client, harness.account
            session_id = await new_session(client, account)
            run_id = (await send(client, account, session_id, "hi there"))["run"]["id"]
            log = await events(client, account, session_id, run_id)

            assert [e.event for e in log] == [
                "run.started",
                "text.delta",
                "text.delta",
                "text.delta",
                "message.completed",
                "run.finished",
            ]
            assert deltas_of(log) == ["Hello", " from", " the fake."]
            stored = await messages_of(client, account, session_id)
            assert [(m["role"], m["content"]) for m in stored] == [
                ("user", "hi there"),
                ("assistant", "Hello from the fake."),
            ]
            assert (await run_of(client, account, session_id, run_id))["status"] == "succeeded"

    [request] = server.requests
    assert request.body["stream"] is True
    assert request.body["model"] == "fake"
    assert request.authorization == f"Bearer {API_KEY}"
    assert request.messages[-1] == {"role": "user", "content": "hi there"}


async def test_a_streamed_call_of_an_auto_tool_runs_and_the_second_answer_is_stored(
    database: TestDatabase, tmp_path: Path
) -> None:
    with FakeOpenAI() as server:
        server.script(
            tool_call("list_files", {"path": "."}, call_id="call_list_1", fragment_size=3),
            text("There are ", "two files."),
        )
        async with running_app(database, tmp_path, **fake_model_settings(server)) as harness:
            client, account = harness.client, harness.account
            session_id = await new_session(client, account)
            workspace = harness.settings.workspace_root.resolve() / session_id
            (workspace / "docs").mkdir(parents=True)
            (workspace / "a.txt").write_text("a")
            run_id = (await send(client, account, session_id, "what is here?"))["run"]["id"]
            log = await events(client, account, session_id, run_id)

            names = [e.event for e in log]
            assert "approval.required" not in names  # list_files is an `auto` tool
            assert names[-2:] == ["message.completed", "run.finished"]
            call = next(e for e in log if e.event == "tool.call").data
            result = next(e for e in log if e.event == "tool.result").data
            assert call["tool"] == "list_files"
            assert call["arguments"] == {"path": "."}
            assert result["tool"] == "list_files"
            assert result["output"] == "a.txt\ndocs/"
            assert names.index("tool.call") < names.index("tool.result")
            assert names.index("tool.result") < names.index("text.delta")
            assert "".join(deltas_of(log)) == "There are two files."
            stored = await messages_of(client, account, session_id)
            assert stored[-1]["role"] == "assistant"
            assert stored[-1]["content"] == "There are two files."

    first, second = server.requests
    assert "list_files" in {tool["function"]["name"] for tool in first.tools}
    tool_message = next(m for m in second.messages if m["role"] == "tool")
    assert tool_message["tool_call_id"] == "call_list_1"
    assert "a.txt" in tool_message["content"]
    assert "docs/" in tool_message["content"]


@dataclass(frozen=True)
class ProviderFailure:
    reply: Reply
    """What the fake answers."""
    words: tuple[str, ...]
    """Words the run's failure reason must contain."""


PROVIDER_FAILURES = {
    "401": ProviderFailure(error(401), ("401", "API key")),
    "429": ProviderFailure(error(429), ("429", "rate limit")),
    # A provider that echoes the key back in its error message must not get it shown.
    "500": ProviderFailure(
        error(500, f"The server had an error with key {API_KEY}; try again."), ("500", "failed")
    ),
    "timeout": ProviderFailure(hang(), ("did not answer", "0.5 s")),
}


async def assert_fails_clearly(
    harness: Harness, session_id: str, *, words: tuple[str, ...], what: str
) -> str:
    """Send a message; its run must fail fast with a one-sentence reason holding ``words``."""
    client, account = harness.client, harness.account
    started = time.monotonic()
    run_id = (await send(client, account, session_id, f"hello ({what})"))["run"]["id"]
    log = await events(client, account, session_id, run_id)
    took = time.monotonic() - started
    assert [e.event for e in log] == ["run.started", "run.failed"], (what, log)
    reason = log[-1].data["reason"]
    assert isinstance(reason, str)
    for word in words:
        assert word.lower() in reason.lower(), (what, reason)
    assert API_KEY not in reason, (what, reason)
    assert "Traceback" not in reason
    assert "\n" not in reason
    assert len(reason) < 300
    run = await run_of(client, account, session_id, run_id)
    assert run["status"] == "failed"
    assert run["error"] == reason
    assert run["finished_at"] is not None
    assert took < 8, f"{what}: the run should fail fast, not after a long default timeout"
    return reason


async def test_provider_failures_fail_the_run_with_a_clear_reason_and_the_server_goes_on(
    database: TestDatabase, tmp_path: Path
) -> None:
    """401, 429, 500 and a timeout each fail their run in one sentence; each time the session
    is free again, and a next message with a good answer succeeds."""
    with FakeOpenAI() as server:
        server.script(*(failure.reply for failure in PROVIDER_FAILURES.values()))
        server.script(text("Back", " again."))
        overrides = fake_model_settings(server, model_timeout_seconds=0.5)
        async with running_app(database, tmp_path, **overrides) as harness:
            client, account = harness.client, harness.account
            session_id = await new_session(client, account)
            for what, failure in PROVIDER_FAILURES.items():
                await assert_fails_clearly(harness, session_id, words=failure.words, what=what)
            # No half reply is stored: the session holds only the user's messages.
            stored = await messages_of(client, account, session_id)
            assert [m["role"] for m in stored] == ["user"] * len(PROVIDER_FAILURES)

            # The server goes on: the session takes a next message, and it succeeds.
            next_run = (await send(client, account, session_id, "again"))["run"]["id"]
            next_log = await events(client, account, session_id, next_run)
            assert next_log[-1].event == "run.finished"
            assert "".join(deltas_of(next_log)) == "Back again."
            stored = await messages_of(client, account, session_id)
            assert stored[-1]["role"] == "assistant"
            assert stored[-1]["content"] == "Back again."

    # One request per message: a failed model call is not retried behind the scenes.
    assert len(server.requests) == len(PROVIDER_FAILURES) + 1
    assert all(request.authorization == f"Bearer {API_KEY}" for request in server.requests)


async def test_an_unreachable_provider_fails_the_run_saying_so(
    database: TestDatabase, tmp_path: Path
) -> None:
    """Connection refused: the run fails naming where it could not connect; the server serves on."""
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    overrides = {
        "default_model": FAKE_MODEL,
        "openai_base_url": base_url,
        "openai_api_key": API_KEY,
        "model_timeout_seconds": 5,
    }
    async with running_app(database, tmp_path, **overrides) as harness:
        session_id = await new_session(harness.client, harness.account)
        words = ("cannot reach", base_url.removesuffix("/v1"))
        await assert_fails_clearly(harness, session_id, words=words, what="refused")
        # The session is not stuck, and the server still answers.
        await assert_fails_clearly(harness, session_id, words=words, what="refused again")
        ready = await harness.client.get("/health/ready")
        assert ready.status_code == 200, ready.text


# --- 2. invariant 3 --------------------------------------------------------------------------


def _metric(body: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", body, re.MULTILINE)
    assert match is not None, f"{name} missing from /metrics"
    return float(match.group(1))


async def test_invariant_3_no_transaction_is_open_while_the_model_thinks(
    database: TestDatabase, tmp_path: Path
) -> None:
    """While the model hangs mid-reply, the app holds no transaction, lock or pooled connection."""
    with FakeOpenAI() as server:
        server.script(hang("Thinking", " hard"))
        # A long lease and poll keep the executor's own short housekeeping transactions out of
        # the samples below; they are not what this test is about.
        overrides = fake_model_settings(
            server, model_timeout_seconds=15, run_lease_seconds=60, executor_poll_seconds=60
        )
        async with (
            running_app(database, tmp_path, **overrides) as harness,
            Peer(database) as peer,
        ):
            client, account = harness.client, harness.account
            session_id = await new_session(client, account)
            run_id = (await send(client, account, session_id, "think"))["run"]["id"]

            async def hanging() -> bool:
                stored = await peer.stored_events(run_id)
                return "".join(e.data["text"] for e in stored if e.event == "text.delta") == (
                    "Thinking hard"
                )

            await wait_until(hanging, what="the partial reply to be stored")
            await asyncio.sleep(0.2)  # well past the flush interval: the model is now waiting

            for _sample in range(5):
                run = await run_of(client, account, session_id, run_id)
                assert run["status"] == "running"
                if database.backend == "postgres":
                    rows = await peer.fetch(
                        "SELECT pid, state, application_name, query FROM pg_stat_activity "
                        "WHERE datname = ? AND pid <> pg_backend_pid()",
                        database.name,
                    )
                    app_backends = [row for row in rows if row[2] == "countersign"]
                    assert app_backends, "the app's pooled connections should be visible"
                    busy = [row for row in rows if row[1] != "idle"]
                    assert busy == [], f"backends busy or in a transaction: {busy}"
                else:
                    # busy_timeout is 0: if the app held a write lock, this would fail at once.
                    peer.sqlite.execute("BEGIN IMMEDIATE")
                    changed = peer.sqlite.execute(
                        "UPDATE sessions SET title = ? WHERE id = ?",
                        ("written by a peer", uuid.UUID(session_id).hex),
                    ).rowcount
                    peer.sqlite.execute("COMMIT")
                    assert changed == 1
                metrics = (await client.get("/metrics")).text
                checked_out = _metric(metrics, "countersign_db_pool_checked_out")
                assert checked_out == 0, f"{checked_out:g} connection(s) held while the model waits"
                assert _metric(metrics, "countersign_db_pool_size") >= 1
                assert _metric(metrics, "countersign_db_pool_checked_in") >= 1
                await asyncio.sleep(0.1)

            # Let the model go: stopping the fake ends its answer (the stream just closes).
            released = time.monotonic()
            await asyncio.to_thread(server.stop)
            run = await wait_for_end(harness, session_id, run_id)
            assert time.monotonic() - released < 10, "the model timeout, not the release, ended it"
            log = await events(client, account, session_id, run_id)
            assert log == await peer.stored_events(run_id)
            assert "".join(deltas_of(log)) == "Thinking hard"
            if run["status"] == "succeeded":
                stored = await messages_of(client, account, session_id)
                assert stored[-1]["content"] == "Thinking hard"
            else:
                assert run["status"] == "failed"
                assert "broke off" in run["error"] or "unusable" in run["error"], run["error"]
            if database.backend == "sqlite":
                title = await client.get(f"/api/v1/sessions/{session_id}", headers=account.headers)
                assert title.json()["title"] == "written by a peer"


# --- 3. invariant 4 --------------------------------------------------------------------------


async def follow_checking(
    http: httpx.AsyncClient,
    peer: Peer,
    method: str,
    url: str,
    *,
    received: list[Sse],
    headers: dict[str, str],
    json_body: Any = None,
) -> None:
    """Read an SSE stream; as each event arrives, check that it is already committed."""
    async with aconnect_sse(http, method, url, headers=headers, json=json_body) as source:
        assert source.response.status_code == 200
        async for sse in source.aiter_sse():
            event = Sse(int(sse.id), sse.event, json.loads(sse.data))
            stored = {e.id: e for e in await peer.stored_events(event.data["run_id"])}
            assert stored.get(event.id) == event, f"event {event.id} was seen before it was stored"
            received.append(event)


async def test_invariant_4_events_are_in_the_database_before_the_client_sees_them(
    database: TestDatabase, tmp_path: Path
) -> None:
    """Each SSE event, the moment a client gets it, is in the events table with the same seq,
    type and data; the whole stream equals the stored log exactly."""
    words = [f"word{number} " for number in range(50)]
    with FakeOpenAI() as server:
        server.script(text(*words), hang("Still ", "thinking"))
        overrides = fake_model_settings(server, model_timeout_seconds=15)
        async with (
            running_app(database, tmp_path, **overrides) as harness,
            served_over_tcp(harness.app) as base_url,
            httpx.AsyncClient(base_url=base_url, timeout=WAIT) as http,
            Peer(database) as peer,
        ):
            account = harness.account
            session_id = await new_session(harness.client, account)
            url = f"/api/v1/sessions/{session_id}/messages"

            # A 50-word reply, streamed in answer to the POST itself.
            first: list[Sse] = []
            async with asyncio.timeout(WAIT):
                await follow_checking(
                    http,
                    peer,
                    "POST",
                    url,
                    received=first,
                    headers=account.headers,
                    json_body={"content": "fifty words please"},
                )
            run_id = first[0].data["run_id"]
            assert first == await peer.stored_events(run_id)
            assert [e.id for e in first] == list(range(1, len(first) + 1))
            assert deltas_of(first) == words
            assert first[-1].event == "run.finished"
            stored = await messages_of(harness.client, account, session_id)
            assert stored[-1]["content"] == "".join(words)

            # A reply that stops halfway: the events so far reach the client while the run
            # is still going, and the rest after the model lets go.
            second: list[Sse] = []
            follower = asyncio.create_task(
                follow_checking(
                    http,
                    peer,
                    "POST",
                    url,
                    received=second,
                    headers=account.headers,
                    json_body={"content": "take your time"},
                )
            )
            try:

                async def mid_reply() -> bool:
                    if follower.done():
                        follower.result()
                        raise AssertionError(f"the stream ended early: {second}")
                    return "".join(deltas_of(second)) == "Still thinking"

                await wait_until(mid_reply, what="the partial reply to stream")
                second_run = second[0].data["run_id"]
                run = await run_of(harness.client, account, session_id, second_run)
                assert run["status"] == "running", "these events were seen while the run ran"
                assert not follower.done()
                await asyncio.to_thread(server.stop)
                async with asyncio.timeout(WAIT):
                    await follower
            finally:
                follower.cancel()
            assert second == await peer.stored_events(second_run)
            assert [e.id for e in second] == list(range(1, len(second) + 1))
            assert second[-1].event in ("run.finished", "run.failed")


async def test_a_stream_ends_when_its_session_is_deleted(
    database: TestDatabase, tmp_path: Path
) -> None:
    """A run deleted with its session wakes its followers (the process's sweep finds it gone):
    they read, find nothing, and their streams end instead of idling forever."""
    async with running_app(database, tmp_path) as harness, served_over_tcp(harness.app) as url:
        client, account = harness.client, harness.account
        session_id = await new_session(client, account)
        command = '/tool shell {"command": "sleep 5"}'
        run_id = (await send(client, account, session_id, command))["run"]["id"]
        first = await events(client, account, session_id, run_id)
        assert first[-1].event == "approval.required", first
        decided = await client.post(
            f"/api/v1/sessions/{session_id}/approvals/{first[-1].data['approval_id']}",
            json={"decision": "approve"},
            headers=account.headers,
        )
        assert decided.status_code == 200
        seen: list[str] = []
        async with httpx.AsyncClient(base_url=url, timeout=WAIT) as http:
            headers = {**account.headers, "Last-Event-ID": str(first[-1].id)}
            stream_url = f"/api/v1/sessions/{session_id}/runs/{run_id}/events"
            async with aconnect_sse(http, "GET", stream_url, headers=headers) as source:
                async with asyncio.timeout(WAIT):
                    async for sse in source.aiter_sse():
                        seen.append(sse.event)
                        if sse.event == "tool.call":  # the command is running: delete now
                            deleted = await client.delete(
                                f"/api/v1/sessions/{session_id}", headers=account.headers
                            )
                            assert deleted.status_code == 204
        assert "tool.call" in seen
        assert "run.finished" not in seen


# --- 4. invariant 9 --------------------------------------------------------------------------


async def test_invariant_9_an_expired_approval_frees_the_session(
    database: TestDatabase, tmp_path: Path
) -> None:
    overrides = {"approval_ttl_seconds": 1, "executor_poll_seconds": 0.2}
    async with (
        running_app(database, tmp_path, **overrides) as harness,
        Peer(database) as peer,
    ):
        client, account = harness.client, harness.account
        session_id = await new_session(client, account)
        command = '/tool write_file {"path": "late.txt", "content": "too late"}'
        run_id = (await send(client, account, session_id, command))["run"]["id"]
        first = await events(client, account, session_id, run_id)
        required = next(e for e in first if e.event == "approval.required").data
        approval_id = required["approval_id"]
        pending_url = f"/api/v1/sessions/{session_id}/pending-approvals"

        async def expired() -> bool:
            pending = await client.get(pending_url, headers=account.headers)
            assert pending.status_code == 200
            items: list[Any] = pending.json()["items"]
            return items == []

        started = time.monotonic()
        await wait_until(expired, what="the approval to expire", within=10)
        assert time.monotonic() - started < 5, "expiry should follow the 1 s TTL closely"
        # Past its time the approval is no longer offered; the executor's next poll records it.

        async def recorded() -> list[tuple[Any, ...]] | None:
            rows = await peer.fetch(
                "SELECT status, reason, decided_by FROM approvals WHERE id = ?", approval_id
            )
            return rows if rows[0][0] != "pending" else None

        [(status, reason, decided_by)] = await wait_until(
            recorded, what="the expiry to be recorded", within=5
        )
        assert (status, reason, decided_by) == ("expired", "expired", None)

        await wait_for_status(client, account, session_id, run_id, "succeeded")
        log = await events(client, account, session_id, run_id)
        names = [e.event for e in log]
        resolved = next(e for e in log if e.event == "approval.resolved").data
        assert resolved["approval_id"] == approval_id
        assert resolved["status"] == "expired"
        assert "tool.call" not in names
        assert "tool.result" not in names
        assert names.index("approval.required") < names.index("approval.resolved")
        assert names[-2:] == ["message.completed", "run.finished"]
        reply = (await messages_of(client, account, session_id))[-1]
        assert reply["role"] == "assistant"
        assert "expired" in reply["content"]
        assert "".join(deltas_of(log)) == reply["content"]
        workspace = harness.settings.workspace_root.resolve() / session_id
        assert not (workspace / "late.txt").exists()

        decided = await client.post(
            f"/api/v1/sessions/{session_id}/approvals/{approval_id}",
            json={"decision": "approve"},
            headers=account.headers,
        )
        assert decided.status_code == 409, decided.text
        assert decided.json()["error"]["code"] == "already_decided"
        assert not (workspace / "late.txt").exists()

        next_run = (await send(client, account, session_id, "still here?"))["run"]["id"]
        next_log = await events(client, account, session_id, next_run)
        assert "".join(deltas_of(next_log)) == "You said: still here?"


# --- 5. Idempotency-Key on messages -----------------------------------------------------------


async def test_a_retried_message_with_the_same_key_starts_no_second_run(
    database: TestDatabase, tmp_path: Path
) -> None:
    async with running_app(database, tmp_path) as harness, Peer(database) as peer:
        client, account = harness.client, harness.account
        session_id = await new_session(client, account)
        key = str(uuid.uuid4())

        first = await post_message(harness, session_id, "only once", **{"Idempotency-Key": key})
        assert first.status_code == 202, first.text
        again = await post_message(harness, session_id, "only once", **{"Idempotency-Key": key})
        assert again.status_code == 202, again.text
        assert again.json()["message"]["id"] == first.json()["message"]["id"]
        assert again.json()["run"]["id"] == first.json()["run"]["id"]
        assert again.json() == first.json()
        run_id = first.json()["run"]["id"]

        other = await post_message(
            harness, session_id, "something else", **{"Idempotency-Key": key}
        )
        assert other.status_code == 422, other.text
        assert other.json()["error"]["code"] == "idempotency_key_reused"

        async with asyncio.timeout(WAIT):
            streamed = await client.post(
                f"/api/v1/sessions/{session_id}/messages",
                json={"content": "only once"},
                headers={**account.headers, "Idempotency-Key": key, "Accept": "text/event-stream"},
            )
        assert streamed.status_code == 200, streamed.text
        assert streamed.headers["content-type"].startswith("text/event-stream")
        log = parse_sse(streamed.text)
        assert {e.data["run_id"] for e in log} == {run_id}
        assert log[-1].event == "run.finished"
        assert "".join(deltas_of(log)) == "You said: only once"

        await wait_for_status(client, account, session_id, run_id, "succeeded")
        stored = await messages_of(client, account, session_id)
        assert [(m["role"], m["content"]) for m in stored] == [
            ("user", "only once"),
            ("assistant", "You said: only once"),
        ]
        assert await peer.count("SELECT count(*) FROM runs WHERE session_id = ?", session_id) == 1


# --- 6. one active run per session -------------------------------------------------------------


async def test_a_message_while_a_run_is_running_is_409_naming_the_run(
    database: TestDatabase, tmp_path: Path
) -> None:
    with FakeOpenAI() as server:
        server.script(hang("Working"), text("Fresh", " start."))
        overrides = fake_model_settings(server, model_timeout_seconds=15)
        async with running_app(database, tmp_path, **overrides) as harness:
            client, account = harness.client, harness.account
            session_id = await new_session(client, account)
            run_id = (await send(client, account, session_id, "take long"))["run"]["id"]

            async def asked() -> bool:
                return len(server.requests) == 1

            # Running, and the model has been asked (and took the hanging reply), so the next
            # run gets the next reply of the script.
            await wait_until(asked, what="the model to be asked")
            await wait_for_status(client, account, session_id, run_id, "running")

            refused = await post_message(harness, session_id, "are you there?")
            assert refused.status_code == 409, refused.text
            body = refused.json()["error"]
            assert body["code"] == "run_active"
            assert body["detail"]["run_id"] == run_id
            assert body["detail"]["status"] == "running"
            assert body["detail"]["approval_id"] is None
            assert run_id in body["message"]

            # Cancelling frees the session at once, though the old turn still waits on the model.
            cancelled = await client.post(
                f"/api/v1/sessions/{session_id}/runs/{run_id}/cancel", headers=account.headers
            )
            assert cancelled.status_code == 200, cancelled.text
            next_run = (await send(client, account, session_id, "again"))["run"]["id"]
            next_log = await events(client, account, session_id, next_run)
            assert "".join(deltas_of(next_log)) == "Fresh start."
            assert (await run_of(client, account, session_id, run_id))["status"] == "cancelled"
            stored = await messages_of(client, account, session_id)
            assert [(m["role"], m["content"]) for m in stored] == [
                ("user", "take long"),
                ("user", "again"),
                ("assistant", "Fresh start."),
            ]


async def test_two_concurrent_messages_to_a_fresh_session_start_one_run(
    database: TestDatabase, tmp_path: Path
) -> None:
    with FakeOpenAI() as server:
        server.script(hang("Busy"))
        overrides = fake_model_settings(server, model_timeout_seconds=15)
        async with running_app(database, tmp_path, **overrides) as harness, Peer(database) as peer:
            session_id = await new_session(harness.client, harness.account)
            async with asyncio.timeout(WAIT):
                answers = await asyncio.gather(
                    post_message(harness, session_id, "first"),
                    post_message(harness, session_id, "second"),
                )
            assert sorted(answer.status_code for answer in answers) == [202, 409], [
                answer.text for answer in answers
            ]
            won = next(answer for answer in answers if answer.status_code == 202).json()
            lost = next(answer for answer in answers if answer.status_code == 409).json()
            assert lost["error"]["code"] == "run_active"
            assert lost["error"]["detail"]["run_id"] == won["run"]["id"]
            assert (
                await peer.count("SELECT count(*) FROM runs WHERE session_id = ?", session_id) == 1
            )
            user_messages = await peer.count(
                "SELECT count(*) FROM messages WHERE session_id = ? AND role = 'user'", session_id
            )
            assert user_messages == 1


@pytest.mark.backends("postgres")
async def test_a_message_sent_while_the_previous_turn_ends_is_started(
    database: TestDatabase, tmp_path: Path
) -> None:
    """A message arrives while the session's turn is committing its end (the run finished,
    the reply stored). The start waits for that commit on the one-active-run index (it inserts
    its run first); its one statement's snapshot predates the reply, so the message number it
    picked is taken. It is started anyway (202, the next number), not refused with a bare 409."""
    with FakeOpenAI() as server:
        server.script(hang("Working"), text("Next."))
        overrides = fake_model_settings(server, model_timeout_seconds=15)
        async with running_app(database, tmp_path, **overrides) as harness, Peer(database) as peer:
            client, account = harness.client, harness.account
            session_id = await new_session(client, account)
            run_id = (await send(client, account, session_id, "first"))["run"]["id"]
            await wait_for_status(client, account, session_id, run_id, "running")
            ending = peer.pg.transaction()
            await ending.start()
            # The turn's end, as its own write makes it: the run finished, the reply stored.
            await peer.pg.execute(
                "UPDATE runs SET status = 'succeeded', owner = NULL, lease_expires_at = NULL, "
                "finished_at = now() WHERE id = $1",
                uuid.UUID(run_id),
            )
            await peer.pg.execute(
                "INSERT INTO messages (id, session_id, seq, role, content, run_id, created_at) "
                "VALUES ($1, $2, 2, 'assistant', 'Done.', $3, now())",
                uuid.uuid4(),
                uuid.UUID(session_id),
                uuid.UUID(run_id),
            )
            sending = asyncio.create_task(post_message(harness, session_id, "second"))

            async def waiting_on_the_end() -> bool:
                # Inside a transaction the activity view is a snapshot: take a fresh one.
                await peer.pg.execute("SELECT pg_stat_clear_snapshot()")
                waits = await peer.pg.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database() AND query LIKE 'WITH new_run%'"
                )
                return bool(waits)

            await wait_until(waiting_on_the_end, what="the start to wait for the turn's end")
            await ending.commit()
            answer = await sending
            assert answer.status_code == 202, answer.text
            assert answer.json()["message"]["seq"] == 3
            await wait_for_status(
                client, account, session_id, answer.json()["run"]["id"], "succeeded"
            )
            stored = await messages_of(client, account, session_id)
            assert [(m["seq"], m["role"], m["content"]) for m in stored] == [
                (1, "user", "first"),
                (2, "assistant", "Done."),
                (3, "user", "second"),
                (4, "assistant", "Next."),
            ]


async def test_a_start_whose_answer_was_lost_is_carried_out_at_once_or_not_at_all(
    database: TestDatabase, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A start's one statement can commit and its answer still be lost (the request cancelled,
    the connection cut), even after the executor first looked for it (the statement was still
    waiting for a lock on the server). The run it stored, already claimed by this process, is
    read back and carried out as attempt 1: not left until its lease (60 s here) runs out and
    then counted as a retry. A start that was never stored leaves nothing, and its slot comes
    back once the lease it would have had is nearly over."""
    caplog.set_level(logging.INFO, logger="countersign.services.executor")
    async with (
        running_app(database, tmp_path, run_lease_seconds=60) as harness,
        Peer(database) as peer,
    ):
        services: ServiceDeps = harness.app.state.services
        executor = services.executor
        assert executor is not None
        session_id = await new_session(harness.client, harness.account)
        free = executor.options.concurrency
        now = services.clock.now()

        def started_run(lease: Lease) -> Run:
            return Run(
                id=RunId(services.new_id()),
                session_id=SessionId(uuid.UUID(session_id)),
                status=RunStatus.RUNNING,
                attempt=lease.attempt,
                error=None,
                created_at=now,
                finished_at=None,
            )

        lease = executor.reserve(now=now)
        assert lease is not None
        run = started_run(lease)
        until = executor.lease_until(now)
        # The executor looks first; the statement commits a moment later.
        executor.adopt(run, lease=lease, until=until)
        await asyncio.sleep(0.5)
        async with services.uow_factory(one_statement=True) as uow:
            assert await uow.runs.start(
                run,
                owner=harness.account.user.id,
                prompt="hello",
                message_id=MessageId(services.new_id()),
                lease_owner=lease.owner,
                lease_until=until,
            )
            await uow.commit()
        await wait_for_status(harness.client, harness.account, session_id, str(run.id), "succeeded")
        retried = await peer.count(
            "SELECT count(*) FROM runs WHERE id = ? AND attempt = 1 AND retries = 0", str(run.id)
        )
        assert retried == 1
        reply = await messages_of(harness.client, harness.account, session_id)
        assert [(m["role"], m["content"]) for m in reply] == [
            ("user", "hello"),
            ("assistant", "You said: hello"),
        ]

        # Never stored: nothing is carried out, nothing is written, the slot comes back.
        ghost_lease = executor.reserve(now=now)
        assert ghost_lease is not None
        ghost = started_run(ghost_lease)
        executor.adopt(ghost, lease=ghost_lease, until=services.clock.now() + timedelta(seconds=2))

        async def slots_back() -> bool:
            return executor._free_slots() == free

        await wait_until(slots_back, what="the ghost's slot to come back")
        assert await peer.count("SELECT count(*) FROM runs WHERE id = ?", str(ghost.id)) == 0
        assert any(
            str(ghost.id) in record.getMessage() and "not carried out" in record.getMessage()
            for record in caplog.records
        )
        # The session goes on as usual.
        await send(harness.client, harness.account, session_id, "again")


async def test_runs_started_while_the_claim_loop_polls_are_handed_over_in_process(
    database: TestDatabase, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The claim loop, polling all the time, holds only a batch of the free slots while it
    claims: a request starting a run meanwhile still claims it in its own statement and hands
    it over in memory. (It used to hold every free slot: a run started in that window was
    stored queued and waited for the claim loop's next pass.)"""
    caplog.set_level(logging.DEBUG, logger="countersign.services.executor")
    async with running_app(database, tmp_path, executor_poll_seconds=0.005) as harness:
        client, account = harness.client, harness.account
        run_ids = []
        for _ in range(20):  # one after another, the claim loop polling all the while
            session_id = await new_session(client, account)
            started = await send(client, account, session_id, "hello")
            run_ids.append(started["run"]["id"])
            await wait_for_status(client, account, session_id, started["run"]["id"], "succeeded")
    how = [
        record.getMessage()
        for record in caplog.records
        if record.name == "countersign.services.executor"
        and any(run_id in record.getMessage() for run_id in run_ids)
    ]
    handed = [f"run {run_id} attempt 1 handed over in-process" for run_id in run_ids]
    assert sorted(how) == sorted(handed)
