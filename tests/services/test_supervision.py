"""Background work under faults: every loop survives a driver error, a dead loop turns readiness
red, a failed write loses no text, runs have a maximum number of attempts, and a database
error's text (with its values) never reaches a person.

Faults are real: a column renamed under the running app (an error no code path expects), a
lock held by another connection (SQLite's writer lock, a PostgreSQL table lock), an app
stopped in the middle of a turn. Model replies come from the fake OpenAI server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from countersign.domain.events import EventType, RunEvent, assistant_text
from countersign.domain.models import RunId
from countersign.services.executor import UNEXPECTED_FAILURE
from tests.api.test_runs import messages_of, new_session, run_of, send
from tests.services.test_runs import (
    WAIT,
    Harness,
    Peer,
    fake_model_settings,
    running_app,
    served_over_tcp,
    wait_for_end,
    wait_until,
)
from tests.support.databases import TestDatabase
from tests.support.fake_openai import FakeOpenAI, hang, text, tool_call

SECRET = "reply-secret-7Hq2Zp"
"""Text only the model's reply contains: no log line and no failure reason may show it."""


def _data(value: object) -> dict[str, Any]:
    """A JSON column as a dict (SQLite gives text, PostgreSQL a decoded value)."""
    loaded = json.loads(value) if isinstance(value, str) else value
    assert isinstance(loaded, dict)
    return loaded


@asynccontextmanager
async def renamed_column(peer: Peer, table: str, column: str) -> AsyncIterator[None]:
    """Rename a column under the running app (every statement naming it fails), then back."""
    hidden = f"{column}_hidden"
    await _execute(peer, f"ALTER TABLE {table} RENAME COLUMN {column} TO {hidden}")
    try:
        yield
    finally:
        await _execute(peer, f"ALTER TABLE {table} RENAME COLUMN {hidden} TO {column}")


async def _execute(peer: Peer, sql: str) -> None:
    if peer.database.backend == "postgres":
        await peer.pg.execute(sql)
        return
    # The app may be writing right now; SQLite can refuse at once (a schema change while
    # the app's connections read), so try again for a while.
    async with asyncio.timeout(WAIT):
        while True:
            try:
                peer.sqlite.execute(sql)
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error):
                    raise
            await asyncio.sleep(0.05)


async def finishes(harness: Harness, content: str) -> dict[str, object]:
    """Send a message on a new session and wait for its run to end."""
    session_id = await new_session(harness.client, harness.account)
    run_id = (await send(harness.client, harness.account, session_id, content))["run"]["id"]
    return await wait_for_end(harness, session_id, run_id)


def supervisor_errors(caplog: pytest.LogCaptureFixture, loop: str) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "countersign.supervisor"
        and loop in record.getMessage()
        and record.exc_info is not None
    ]


async def test_a_driver_error_in_the_claim_loop_is_logged_and_survived(
    database: TestDatabase, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The claim statement fails with an error no code expects; the loop logs it with its
    traceback, backs off, and claims again once the database is whole."""
    caplog.set_level(logging.WARNING)
    async with (
        running_app(database, tmp_path, executor_poll_seconds=0.1) as harness,
        Peer(database) as peer,
    ):
        async with renamed_column(peer, "runs", "lease_expires_at"):
            await wait_until(
                lambda: asyncio.sleep(0, supervisor_errors(caplog, "executor")),
                what="the claim loop's failure to be logged",
            )
        assert (await finishes(harness, "after the fault"))["status"] == "succeeded"

        async def ready() -> bool:
            return (await harness.client.get("/health/ready")).status_code == 200

        # Ready again once the loop has had a good round (its back-off is at most 5 s).
        await wait_until(ready, what="readiness after the fault", every=0.1)


async def test_a_driver_error_in_the_stream_sweep_is_logged_and_survived(
    database: TestDatabase, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The sweep that finds news for idle streams reads ``runs.last_seq``; break that column
    while a stream follows a run, and the sweep logs, survives and the stream still ends."""
    caplog.set_level(logging.WARNING)
    with FakeOpenAI() as server:
        server.script(text("one", " two", hold_after=1))
        async with (
            running_app(
                database, tmp_path, executor_poll_seconds=0.1, **fake_model_settings(server)
            ) as harness,
            Peer(database) as peer,
        ):
            session_id = await new_session(harness.client, harness.account)
            run_id = (await send(harness.client, harness.account, session_id, "hi"))["run"]["id"]
            assert await asyncio.to_thread(server.wait_until_holding, WAIT)
            async with (
                served_over_tcp(harness.app) as base_url,
                httpx.AsyncClient(base_url=base_url, headers=harness.account.headers) as tcp,
                tcp.stream("GET", f"/api/v1/sessions/{session_id}/runs/{run_id}/events") as resp,
            ):
                lines = resp.aiter_lines()
                async with asyncio.timeout(WAIT):
                    async for line in lines:
                        if line == "event: text.delta":
                            break
                # The stream has what there is and waits; the executor waits for the model:
                # only the sweep reads the database now.
                async with renamed_column(peer, "runs", "last_seq"):
                    await wait_until(
                        lambda: asyncio.sleep(0, supervisor_errors(caplog, "stream follower")),
                        what="the sweep's failure to be logged",
                    )
                server.go_on()
                async with asyncio.timeout(WAIT):
                    rest = [line async for line in lines]
            assert "event: run.finished" in rest
            run = await run_of(harness.client, harness.account, session_id, run_id)
            assert run["status"] == "succeeded"


async def test_a_loop_that_is_gone_turns_readiness_503_naming_it(
    database: TestDatabase, tmp_path: Path
) -> None:
    """Should a loop end for good, the server must not look ready."""
    async with running_app(database, tmp_path) as harness:
        assert (await harness.client.get("/health/ready")).status_code == 200
        loop = harness.app.state.supervisor.loop("executor")
        assert loop is not None
        assert loop.task is not None
        loop.task.cancel()
        async with asyncio.timeout(WAIT):
            await asyncio.gather(loop.task, return_exceptions=True)
        ready = await harness.client.get("/health/ready")
        assert ready.status_code == 503
        assert "executor" in ready.json()["error"]["message"]


@asynccontextmanager
async def database_locked(peer: Peer) -> AsyncIterator[None]:
    """Another connection holds what the app's writes need: SQLite's write lock, or
    PostgreSQL's lock on the events table (the app's statement timeout then ends its waits)."""
    if peer.database.backend == "postgres":
        transaction = peer.pg.transaction()
        await transaction.start()
        await peer.pg.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            await transaction.rollback()
    else:
        await _execute(peer, "BEGIN IMMEDIATE")
        try:
            yield
        finally:
            peer.sqlite.execute("ROLLBACK")


async def test_a_failed_write_loses_no_text_and_the_run_is_retried(
    database: TestDatabase, tmp_path: Path
) -> None:
    """Deltas whose commit fails are kept, never dropped: the turn stops, the run is tried
    again, and the stored reply is exactly what the stored deltas add up to."""
    chunks = ("Hello", " there,", " my", " friend", "!")
    with FakeOpenAI() as server:
        server.script(text(*chunks, hold_after=1), text(*chunks))
        settings = fake_model_settings(
            server,
            executor_poll_seconds=0.1,
            run_lease_seconds=1,
            sqlite_busy_timeout_ms=200,
            db_statement_timeout_ms=300,
        )
        async with (
            running_app(database, tmp_path, **settings) as harness,
            Peer(database) as peer,
        ):
            session_id = await new_session(harness.client, harness.account)
            run_id = (await send(harness.client, harness.account, session_id, "hi"))["run"]["id"]
            assert await asyncio.to_thread(server.wait_until_holding, WAIT)
            # The first delta is committed at once; then the rest cannot be written.
            await wait_until(
                lambda: peer.count(
                    "SELECT count(*) FROM events WHERE run_id = ? AND type = 'text.delta'", run_id
                ),
                what="the first delta to be committed",
            )
            async with database_locked(peer):
                server.go_on()
                await asyncio.sleep(1.5)  # the writes fail meanwhile; the lease runs out
            run = await wait_for_end(harness, session_id, run_id)
            assert run["status"] == "succeeded", run
            assert run["attempt"] >= 2
            log = await _log(peer, run_id)
            [_user, reply] = await messages_of(harness.client, harness.account, session_id)
            assert reply["content"] == "".join(chunks)
            assert assistant_text(log) == reply["content"]
            assert len(server.requests) == 2
            # The stored model history is the conversation once: the question, the answer.
            stored = await peer.fetch(
                "SELECT seq, data FROM model_messages WHERE session_id = ? ORDER BY seq",
                session_id,
            )
            kinds = [(seq, _data(data)["kind"]) for seq, data in stored]
            assert kinds == [(1, "request"), (2, "response")]
            assert _data(stored[1][1])["parts"][0]["content"] == "".join(chunks)


async def _log(peer: Peer, run_id: str) -> list[RunEvent]:
    """The run's stored events, as the domain reads them."""
    return [
        RunEvent(
            run_id=RunId(uuid.UUID(run_id)),
            seq=event.id,
            attempt=event.data["attempt"],
            type=EventType(event.event),
            data=event.data,
            created_at=None,  # type: ignore[arg-type]
        )
        for event in await peer.stored_events(run_id)
    ]


async def test_a_database_error_shows_no_values_in_logs_or_reasons(
    database: TestDatabase, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected driver error while the reply is stored: the run fails with a plain
    sentence, and neither that nor any log line carries the statement's values (at INFO, the
    default level; the drivers' own DEBUG lines are kept off by the logging set-up)."""
    caplog.set_level(logging.INFO)
    with FakeOpenAI() as server:
        server.script(text("my ", SECRET, hold_after=1))
        async with (
            running_app(database, tmp_path, **fake_model_settings(server)) as harness,
            Peer(database) as peer,
        ):
            session_id = await new_session(harness.client, harness.account)
            run_id = (await send(harness.client, harness.account, session_id, "hi"))["run"]["id"]
            assert await asyncio.to_thread(server.wait_until_holding, WAIT)
            async with renamed_column(peer, "messages", "content"):
                server.go_on()
                run = await wait_for_end(harness, session_id, run_id)
        assert run["status"] == "failed"
        assert run["error"] == UNEXPECTED_FAILURE
        logged = [record for record in caplog.records if record.exc_info is not None]
        assert any(record.name == "countersign.services.executor" for record in logged)
        for record in caplog.records:
            rendered = logging.Formatter().format(record)
            assert SECRET not in rendered, rendered


async def test_resuming_after_a_decision_is_not_a_retry(
    database: TestDatabase, tmp_path: Path
) -> None:
    """Only takeovers count against COUNTERSIGN_RUN_MAX_ATTEMPTS: with one attempt allowed,
    a run that waits for a person and is resumed by the decision still finishes."""
    async with running_app(database, tmp_path, run_max_attempts=1) as harness:
        session_id = await new_session(harness.client, harness.account)
        run_id = await approved_tool_call(
            harness, session_id, '/tool write_file {"path": "a.txt", "content": "x"}'
        )
        run = await wait_for_end(harness, session_id, run_id)
        assert run["status"] == "succeeded", run
        assert (tmp_path / "ws" / session_id / "a.txt").read_text() == "x"


async def approved_tool_call(harness: Harness, session_id: str, content: str) -> str:
    """Send a demo ``/tool`` message, approve the call it waits for; the run's id."""
    run_id: str = (await send(harness.client, harness.account, session_id, content))["run"]["id"]

    async def pending() -> dict[str, Any] | None:
        answer = await harness.client.get(
            f"/api/v1/sessions/{session_id}/pending-approvals", headers=harness.account.headers
        )
        items: list[dict[str, Any]] = answer.json()["items"]
        return items[0] if items else None

    waiting = await wait_until(pending, what="the approval", within=WAIT)
    decided = await harness.client.post(
        f"/api/v1/sessions/{session_id}/approvals/{waiting['id']}",
        json={"decision": "approve"},
        headers=harness.account.headers,
    )
    assert decided.status_code == 200, decided.text
    return run_id


async def test_stopping_the_server_while_a_tool_runs_does_not_hang(
    database: TestDatabase, tmp_path: Path
) -> None:
    """An approved command is running when the app stops: the stop ends within its bound
    (the tool's stop is recorded through the writer, which stops last), and the run is left
    for the next start to recover."""
    async with running_app(database, tmp_path) as harness:
        session_id = await new_session(harness.client, harness.account)
        run_id = await approved_tool_call(
            harness, session_id, '/tool shell {"command": "sleep 30"}'
        )
        async with Peer(database) as peer:
            await wait_until(
                lambda: peer.count(
                    "SELECT count(*) FROM events WHERE run_id = ? AND type = 'tool.call'", run_id
                ),
                what="the command to start",
            )
        started = time.monotonic()
    # Leaving the block stopped the app (LifespanManager allows 30 s).
    assert time.monotonic() - started < 25
    async with Peer(database) as peer:
        [(status,)] = await peer.fetch("SELECT status FROM runs WHERE id = ?", run_id)
    assert status == "running"  # recovered by the next start, which says the tool stopped


async def test_driver_errors_in_the_lease_keeper_and_the_writer_are_logged_and_survived(
    database: TestDatabase, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The lease keeper's statement and a batch of the event writer fail with errors no code
    expects: both are logged with their tracebacks, the loops go on, a later run finishes,
    and the run whose batch failed ends by itself (retried from its checkpoint)."""
    caplog.set_level(logging.WARNING)
    with FakeOpenAI() as server:
        server.script(text("one", " two", " three", hold_after=1), text("again"), text("later"))
        # Leases of 3 s, renewed every second: a loaded machine that delays one renewal
        # must not let the run be taken over (its retry would end the turn the lease keeper
        # is meant to be renewing when its statement fails).
        settings = fake_model_settings(
            server, run_lease_seconds=3, executor_poll_seconds=0.1, event_flush_seconds=0
        )
        async with (
            running_app(database, tmp_path, **settings) as harness,
            Peer(database) as peer,
        ):
            session_id = await new_session(harness.client, harness.account)
            run_id = (await send(harness.client, harness.account, session_id, "hi"))["run"]["id"]
            assert await asyncio.to_thread(server.wait_until_holding, WAIT)
            async with renamed_column(peer, "runs", "lease_expires_at"):
                await wait_until(
                    lambda: asyncio.sleep(0, supervisor_errors(caplog, "lease keeper")),
                    what="the lease keeper's failure to be logged",
                )
            async with renamed_column(peer, "events", "data"):
                server.go_on()
                await wait_until(
                    lambda: asyncio.sleep(
                        0,
                        [
                            record
                            for record in caplog.records
                            if record.name == "countersign.services.writer"
                            and record.exc_info is not None
                        ],
                    ),
                    what="the writer's failure to be logged",
                )
            first = await wait_for_end(harness, session_id, run_id)
            assert first["status"] in ("succeeded", "failed"), first
            if first["status"] == "failed":
                assert first["error"] == UNEXPECTED_FAILURE
            else:
                # No delta went missing: the stored reply is what the stored deltas make.
                [_user, reply] = await messages_of(harness.client, harness.account, session_id)
                assert assistant_text(await _log(peer, run_id)) == reply["content"]
            later = await new_session(harness.client, harness.account)
            later_run = (await send(harness.client, harness.account, later, "more"))["run"]["id"]
            assert (await wait_for_end(harness, later, later_run))["status"] == "succeeded"

            async def ready() -> bool:
                return (await harness.client.get("/health/ready")).status_code == 200

            await wait_until(ready, what="readiness after the faults", every=0.1)


async def test_a_call_cut_off_by_a_stop_asks_again_with_the_words_of_its_own_response(
    database: TestDatabase, tmp_path: Path
) -> None:
    """In one run the model says something and asks to write a file (approved), then says
    something else and starts a command the app's stop cuts off. The next start asks again
    for the command, and the response it rebuilt carries that response's own words, not the
    earlier one's: the model hears exactly what it said when the person answers."""
    with FakeOpenAI() as server:
        server.script(
            tool_call(
                "write_file",
                {"path": "a.txt", "content": "x"},
                call_id="c1",
                saying=["Earlier words. "],
            ),
            tool_call(
                "shell", {"command": "sleep 30"}, call_id="c2", saying=["Now the slow one. "]
            ),
            text("understood"),
        )
        settings = fake_model_settings(server)
        async with running_app(database, tmp_path, **settings) as harness:
            owner = harness.account
            session_id = await _mixed_session(harness)
            run_id = (await send(harness.client, owner, session_id, "go"))["run"]["id"]
            first = await _pending(harness, session_id)
            await _decide(harness, session_id, first["id"], "approve")
            await _tool_calls_journaled(database, run_id, 2)
        # The app stopped in the command: it is recorded as stopped and the run handed back.
        async with running_app(database, tmp_path, **settings) as restarted:
            harness = Harness(restarted.app, restarted.client, owner, restarted.settings)
            again = await _pending(harness, session_id)
            assert (again["tool"], again["arguments"]) == ("shell", {"command": "sleep 30"})
            await _decide(harness, session_id, again["id"], "reject")
            run = await wait_for_end(harness, session_id, run_id)
        assert run["status"] == "succeeded", run
        said = {
            call["id"]: message.get("content")
            for message in server.requests[-1].body["messages"]
            if message["role"] == "assistant"
            for call in message.get("tool_calls") or []
        }
        assert said == {"c1": "Earlier words. ", "c2": "Now the slow one. "}


async def _tool_calls_journaled(database: TestDatabase, run_id: str, count: int) -> None:
    """Wait until the run has journaled ``count`` tool calls (the last one is running)."""
    async with Peer(database) as peer:

        async def started() -> bool:
            calls = await peer.count(
                "SELECT count(*) FROM events WHERE run_id = ? AND type = 'tool.call'", run_id
            )
            return calls >= count

        await wait_until(started, what=f"{count} tool call(s) to start")


async def _mixed_session(harness: Harness) -> str:
    """A new session of an agent whose ``write_file`` asks and whose ``shell`` runs at once."""
    owner = harness.account
    made = await harness.client.post(
        "/api/v1/agents",
        json={
            "name": "mixed",
            "tools": [
                {"name": "write_file", "policy": "ask"},
                {"name": "shell", "policy": "auto"},
            ],
        },
        headers=owner.headers,
    )
    assert made.status_code == 201, made.text
    created = await harness.client.post(
        "/api/v1/sessions", json={"agent_id": made.json()["id"]}, headers=owner.headers
    )
    session_id: str = created.json()["id"]
    return session_id


async def _pending(harness: Harness, session_id: str) -> dict[str, Any]:
    """The session's one pending approval, once there is one."""
    [found] = await _all_pending(harness, session_id, 1)
    return found


async def _all_pending(harness: Harness, session_id: str, count: int) -> list[dict[str, Any]]:
    """The session's pending approvals, once there are ``count`` of them."""

    async def pending() -> list[dict[str, Any]] | None:
        answer = await harness.client.get(
            f"/api/v1/sessions/{session_id}/pending-approvals", headers=harness.account.headers
        )
        items: list[dict[str, Any]] = answer.json()["items"]
        return items if len(items) >= count else None

    found: list[dict[str, Any]] = await wait_until(
        pending, what=f"{count} pending approval(s)", within=WAIT
    )
    return found


@pytest.mark.parametrize("reused_id", [False, True], ids=["new-ids", "reused-id"])
async def test_a_reply_cut_off_by_a_stop_loses_none_of_its_calls(
    database: TestDatabase, tmp_path: Path, reused_id: bool
) -> None:
    """One reply asks for a command (runs at once) and a file write (asks). The app stops
    while the command runs, before the write could ask. The next start asks about both: the
    command with its outcome unknown, the write as never started. The write approved runs;
    the model then hears its whole reply, both calls, and both answers. (``reused-id``: an
    earlier reply of the run had a call with the same id, as some providers number calls.)"""
    earlier = [tool_call("shell", {"command": "echo first"}, call_id="c1")] if reused_id else []
    with FakeOpenAI() as server:
        server.script(
            *earlier,
            tool_call(
                "shell",
                {"command": "sleep 30"},
                call_id="c1",
                saying=["Two things. "],
                also=[tool_call("write_file", {"path": "b.txt", "content": "y"}, call_id="c2")],
            ),
            text("understood"),
        )
        settings = fake_model_settings(server)
        async with running_app(database, tmp_path, **settings) as harness:
            owner = harness.account
            session_id = await _mixed_session(harness)
            run_id = (await send(harness.client, owner, session_id, "go"))["run"]["id"]
            await _tool_calls_journaled(database, run_id, 1 + len(earlier))
        async with running_app(database, tmp_path, **settings) as restarted:
            harness = Harness(restarted.app, restarted.client, owner, restarted.settings)
            asked = {
                approval["tool"]: approval
                for approval in await _all_pending(harness, session_id, 2)
            }
            assert set(asked) == {"shell", "write_file"}, asked
            assert asked["shell"]["asked_because"].startswith("outcome unknown")
            assert asked["write_file"]["asked_because"].startswith("not started")
            assert asked["write_file"]["arguments"] == {"path": "b.txt", "content": "y"}
            await _decide(harness, session_id, asked["shell"]["id"], "reject")
            await _decide(harness, session_id, asked["write_file"]["id"], "approve")
            run = await wait_for_end(harness, session_id, run_id)
        assert run["status"] == "succeeded", run
        assert (tmp_path / "ws" / session_id / "b.txt").read_text() == "y"
        messages = server.requests[-1].body["messages"]
        reply = [message for message in messages if message["role"] == "assistant"][-1]
        assert reply.get("content") == "Two things. "
        assert [call["id"] for call in reply["tool_calls"]] == ["c1", "c2"]
        answered = [message["tool_call_id"] for message in messages if message["role"] == "tool"]
        assert answered == ["c1"] * len(earlier) + ["c1", "c2"]


async def test_the_question_asked_again_wins_whatever_the_clocks_say(
    database: TestDatabase, tmp_path: Path
) -> None:
    """An approved command is cut off by a stop; the next start asks again and the person
    rejects. The old approval's id is made to sort after the new one (as when the process
    that asked first had a clock ahead of the one that asked again): the rejection still
    counts, and the command does not run a second time."""
    command = "sh -c 'echo ran >> count.txt; if [ ! -e again ]; then sleep 30; fi'"
    message = "/tool shell " + json.dumps({"command": command})
    async with running_app(database, tmp_path) as harness:
        owner = harness.account
        session_id = await new_session(harness.client, owner)
        run_id = await approved_tool_call(harness, session_id, message)
        workspace = tmp_path / "ws" / session_id
        await wait_until(
            lambda: asyncio.sleep(0, (workspace / "count.txt").exists()), what="the command"
        )
        async with Peer(database) as peer:
            [(old_id,)] = await peer.fetch("SELECT id FROM approvals WHERE run_id = ?", run_id)
    async with running_app(database, tmp_path) as restarted:
        harness = Harness(restarted.app, restarted.client, owner, restarted.settings)
        again = await _pending(harness, session_id)
        assert again["tool"] == "shell"
        async with Peer(database) as peer:
            await _move_approval(peer, str(uuid.UUID(str(old_id))), _LATE_ID)
        (workspace / "again").touch()
        await _decide(harness, session_id, again["id"], "reject")
        run = await wait_for_end(harness, session_id, run_id)
    assert run["status"] == "succeeded", run
    assert (workspace / "count.txt").read_text() == "ran\n"


_LATE_ID = "ffffffff-ffff-7fff-bfff-ffffffffffff"
"""A UUIDv7 from far in the future: it sorts after every id made today."""


async def _move_approval(peer: Peer, old: str, new: str) -> None:
    """Give an approval another id, in its row and in its approval.required event."""
    if peer.database.backend == "postgres":
        await peer.pg.execute("UPDATE approvals SET id = $1 WHERE id = $2", new, old)
        await peer.pg.execute(
            "UPDATE events SET data = replace(data::text, $1, $2)::jsonb "
            "WHERE type = 'approval.required'",
            old,
            new,
        )
        return
    peer.sqlite.execute(
        "UPDATE approvals SET id = ? WHERE id = ?", (uuid.UUID(new).hex, uuid.UUID(old).hex)
    )
    peer.sqlite.execute(
        "UPDATE events SET data = replace(data, ?, ?) WHERE type = 'approval.required'",
        (old, new),
    )
    peer.sqlite.commit()


async def _decide(harness: Harness, session_id: str, approval_id: str, decision: str) -> None:
    decided = await harness.client.post(
        f"/api/v1/sessions/{session_id}/approvals/{approval_id}",
        json={"decision": decision},
        headers=harness.account.headers,
    )
    assert decided.status_code == 200, decided.text


async def test_a_run_every_stop_cuts_off_still_ends(database: TestDatabase, tmp_path: Path) -> None:
    """With COUNTERSIGN_RUN_MAX_ATTEMPTS=1 and a model that never answers: the first stop
    hands the run back for free, the second counts as its one retry, and the next start fails
    it with a sentence instead of asking the model a third time (a process stopped in every
    model call, e.g. by a liveness probe, cannot keep a run going forever)."""
    with FakeOpenAI() as server:
        server.script(hang("one"), hang("two"), text("never asked"))
        settings = fake_model_settings(server, run_max_attempts=1, shutdown_grace_seconds=0)

        async def asked(n: int) -> bool:
            return len(server.requests) >= n

        async with running_app(database, tmp_path, **settings) as harness:
            owner = harness.account
            session_id = await new_session(harness.client, owner)
            run_id = (await send(harness.client, owner, session_id, "hello"))["run"]["id"]
            await wait_until(lambda: asked(1), what="the first model call")
        async with running_app(database, tmp_path, **settings):
            await wait_until(lambda: asked(2), what="the model asked again")
        async with running_app(database, tmp_path, **settings) as restarted:
            harness = Harness(restarted.app, restarted.client, owner, restarted.settings)
            run = await wait_for_end(harness, session_id, run_id)
        assert run["status"] == "failed", run
        assert str(run["error"]).startswith("the run was tried once and never finished"), run
        assert len(server.requests) == 2
