"""Invariant 10: NUL and lone surrogates from a model or a tool are stored and streamed the same
on SQLite and PostgreSQL.

PostgreSQL refuses NUL in ``text`` and ``jsonb``; no driver can encode a lone surrogate as
UTF-8; SQLite stores NUL. So each of them is stored as U+FFFD on both databases, and every
test below expects exactly the same values on both. Through the real app: models are the
offline ``demo`` model or ``tests.support.fake_openai`` on 127.0.0.1; what was committed is read
back from a connection of the test's own (``Peer``).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from countersign.domain.models import ApprovalStatus
from tests.api.test_runs import Sse, events, messages_of, new_session, parse_sse, run_of
from tests.services.test_runs import (
    WAIT,
    Harness,
    Peer,
    deltas_of,
    fake_model_settings,
    running_app,
    wait_for_end,
)
from tests.support.databases import TestDatabase
from tests.support.fake_openai import FakeOpenAI, error, text

R = "\ufffd"
"""What NUL and a lone surrogate are stored as."""


# --- helpers -----------------------------------------------------------------------------------


def assert_storable(value: Any) -> None:
    """No string anywhere in ``value`` (dict keys included) holds NUL or a lone surrogate."""
    if isinstance(value, str):
        assert "\x00" not in value, value
        value.encode("utf-8")  # raises on a lone surrogate
    elif isinstance(value, dict):
        for key, item in value.items():
            assert_storable(key)
            assert_storable(item)
    elif isinstance(value, list):
        for item in value:
            assert_storable(item)


async def stream_message(harness: Harness, session_id: str, content: str) -> list[Sse]:
    """Send a message with ``Accept: text/event-stream``: the run's live stream as it went."""
    async with asyncio.timeout(WAIT):
        response = await harness.client.post(
            f"/api/v1/sessions/{session_id}/messages",
            json={"content": content},
            headers={**harness.account.headers, "Accept": "text/event-stream"},
        )
    assert response.status_code == 200, response.text
    live = parse_sse(response.text)
    assert live, "the stream sent no event"
    return live


async def approve_only_approval(harness: Harness, session_id: str, live: list[Sse]) -> None:
    """Approve the approval the live stream ended at (its stored arguments unchanged)."""
    assert live[-1].event == "approval.required", live
    approval_id = live[-1].data["approval_id"]
    decided = await harness.client.post(
        f"/api/v1/sessions/{session_id}/approvals/{approval_id}",
        json={"decision": "approve"},
        headers=harness.account.headers,
    )
    assert decided.status_code == 200, decided.text
    assert decided.json()["status"] == ApprovalStatus.APPROVED.value


async def finished_log(
    harness: Harness, peer: Peer, session_id: str, run_id: str, *, live: list[Sse]
) -> list[Sse]:
    """The run succeeded; its replayed stream is the stored log, begins with what was streamed
    live, holds nothing unstorable, and its deltas add up to the stored assistant message."""
    run = await wait_for_end(harness, session_id, run_id)
    assert run["status"] == "succeeded", run
    log = await events(harness.client, harness.account, session_id, run_id)
    assert log == await peer.stored_events(run_id)
    assert log[: len(live)] == live, "the live stream and the replay differ"
    for event in log:
        assert_storable(event.data)
    assert [e.event for e in log][-2:] == ["message.completed", "run.finished"]
    reply = "".join(deltas_of(log))
    stored = await messages_of(harness.client, harness.account, session_id)
    assert stored[-1]["role"] == "assistant"
    assert stored[-1]["content"] == reply
    assert next(e for e in log if e.event == "message.completed").data["content"] == reply
    [(content,)] = await peer.fetch(
        "SELECT content FROM messages WHERE run_id = ? AND role = 'assistant'", run_id
    )
    assert content == reply
    return log


def json_objects(value: Any) -> list[dict[str, Any]]:
    """Every JSON object in ``value``, however deep."""
    if isinstance(value, dict):
        return [value, *(found for item in value.values() for found in json_objects(item))]
    if isinstance(value, list):
        return [found for item in value for found in json_objects(item)]
    return []


def only(log: list[Sse], name: str) -> dict[str, Any]:
    [event] = [e for e in log if e.event == name]
    return event.data


async def stored_approval(peer: Peer, approval_id: str) -> tuple[str, dict[str, Any]]:
    """The approval's tool and arguments as committed."""
    [(tool, arguments)] = await peer.fetch(
        "SELECT tool, arguments FROM approvals WHERE id = ?", approval_id
    )
    return tool, json.loads(arguments) if isinstance(arguments, str) else dict(arguments)


# --- (a) model text ------------------------------------------------------------------------------


async def test_nul_and_lone_surrogates_in_model_text_are_stored_as_replacement_characters(
    database: TestDatabase, tmp_path: Path
) -> None:
    chunks = ("Nul\x00here", " lone\ud800high", " lone\udfff low", " \x00\ud83d\x00")
    with FakeOpenAI() as server:
        server.script(text(*chunks))
        async with (
            running_app(database, tmp_path, **fake_model_settings(server)) as harness,
            Peer(database) as peer,
        ):
            session_id = await new_session(harness.client, harness.account)
            live = await stream_message(harness, session_id, "say something odd")
            run_id = live[0].data["run_id"]
            log = await finished_log(harness, peer, session_id, run_id, live=live)

            assert log == live, "the whole run was streamed live"
            assert deltas_of(log) == [
                f"Nul{R}here",
                f" lone{R}high",
                f" lone{R} low",
                f" {R}{R}{R}",
            ]
            run = await run_of(harness.client, harness.account, session_id, run_id)
            assert run["error"] is None
    assert len(server.requests) == 1


async def test_nul_and_lone_surrogates_in_a_providers_error_message(
    database: TestDatabase, tmp_path: Path
) -> None:
    """The run fails with its reason stored (run.failed and the run's error) the same on both."""
    with FakeOpenAI() as server:
        server.script(error(500, "broken\x00 here\ud800"), text("Back", " again."))
        async with (
            running_app(database, tmp_path, **fake_model_settings(server)) as harness,
            Peer(database) as peer,
        ):
            client, account = harness.client, harness.account
            session_id = await new_session(client, account)
            live = await stream_message(harness, session_id, "fail please")
            run_id = live[0].data["run_id"]
            run = await wait_for_end(harness, session_id, run_id)
            reason = f"the model provider failed (HTTP 500): broken{R} here{R}"
            assert (run["status"], run["error"]) == ("failed", reason)
            log = await events(client, account, session_id, run_id)
            assert log == live == await peer.stored_events(run_id)
            assert [e.event for e in log] == ["run.started", "run.failed"]
            assert log[-1].data["reason"] == reason
            [(error_text,)] = await peer.fetch("SELECT error FROM runs WHERE id = ?", run_id)
            assert error_text == reason

            # The session is free: the next message is answered.
            again = await stream_message(harness, session_id, "again")
            assert "".join(deltas_of(again)) == "Back again."


# --- (b) tool arguments --------------------------------------------------------------------------
# A lone surrogate escaped in a tool call's JSON never reaches a tool or an approval: pydantic's
# JSON parser refuses it and the model is asked again. NUL does reach them.


async def test_nul_in_the_arguments_of_an_asked_tool_call(
    database: TestDatabase, tmp_path: Path
) -> None:
    """The approval holds the arguments as stored; approved, they are what the tool runs with."""
    # The message holds the JSON escapes as text; the demo model's JSON parser makes them real.
    command = r'/tool shell {"command": "echo a\u0000b \u0000"}'
    async with running_app(database, tmp_path) as harness, Peer(database) as peer:
        client, account = harness.client, harness.account
        session_id = await new_session(client, account)
        live = await stream_message(harness, session_id, command)
        assert [e.event for e in live] == ["run.started", "approval.required"], live
        run_id = live[0].data["run_id"]
        required = live[-1].data
        stored_arguments = {"command": f"echo a{R}b {R}"}
        assert required["tool"] == "shell"
        assert required["arguments"] == stored_arguments
        pending = await client.get(
            f"/api/v1/sessions/{session_id}/pending-approvals", headers=account.headers
        )
        assert pending.status_code == 200, pending.text
        [item] = pending.json()["items"]
        assert item["arguments"] == stored_arguments
        assert await stored_approval(peer, required["approval_id"]) == ("shell", stored_arguments)
        assert (await run_of(client, account, session_id, run_id))["status"] == (
            "awaiting_approval"
        )

        await approve_only_approval(harness, session_id, live)
        log = await finished_log(harness, peer, session_id, run_id, live=live)
        assert only(log, "approval.resolved")["arguments"] == stored_arguments
        assert only(log, "tool.call")["arguments"] == stored_arguments
        assert only(log, "tool.result")["output"] == f"a{R}b {R}\n"
        assert "".join(deltas_of(log)) == f"a{R}b {R}\n"


async def test_nul_in_the_arguments_of_an_auto_tool_call(
    database: TestDatabase, tmp_path: Path
) -> None:
    """read_file (policy auto) gets the real NUL and refuses it; the call is stored replaced."""
    command = r'/tool read_file {"path": "a\u0000b"}'
    async with running_app(database, tmp_path) as harness, Peer(database) as peer:
        session_id = await new_session(harness.client, harness.account)
        live = await stream_message(harness, session_id, command)
        run_id = live[0].data["run_id"]
        log = await finished_log(harness, peer, session_id, run_id, live=live)
        assert log == live
        assert only(log, "tool.call")["arguments"] == {"path": f"a{R}b"}
        output = "path 'a\\x00b' contains a NUL byte"
        assert only(log, "tool.result")["output"] == output
        assert "".join(deltas_of(log)) == output


async def test_nul_in_argument_names_and_values_the_tool_refuses(
    database: TestDatabase, tmp_path: Path
) -> None:
    """An unknown argument: no tool runs, the model is told, and the stored history (which
    holds the refused name and value as real NULs) is stored replaced, dict keys included."""
    command = r'/tool read_file {"path": "a.txt", "k\u0000": "v\u0000"}'
    async with running_app(database, tmp_path) as harness, Peer(database) as peer:
        session_id = await new_session(harness.client, harness.account)
        live = await stream_message(harness, session_id, command)
        run_id = live[0].data["run_id"]
        log = await finished_log(harness, peer, session_id, run_id, live=live)
        assert log == live
        assert "tool.call" not in [e.event for e in log]
        # The model is told in JSON, so the NULs reach it (and the reply) as escapes.
        assert "".join(deltas_of(log)) == (
            '[{"type":"extra_forbidden","loc":["k\\u0000"],'
            '"msg":"Extra inputs are not permitted","input":"v\\u0000"}]'
        )
        rows = await peer.fetch(
            "SELECT data FROM model_messages WHERE run_id = ? ORDER BY seq", run_id
        )
        history = [json.loads(data) if isinstance(data, str) else data for (data,) in rows]
        assert_storable(history)
        refused = [item for item in json_objects(history) if item.get("type") == "extra_forbidden"]
        assert [(item["loc"], item["input"]) for item in refused] == [([f"k{R}"], f"v{R}")]


# --- (c) tool outputs ----------------------------------------------------------------------------


async def test_nul_bytes_in_a_shell_commands_output(database: TestDatabase, tmp_path: Path) -> None:
    async with running_app(database, tmp_path) as harness, Peer(database) as peer:
        session_id = await new_session(harness.client, harness.account)
        live = await stream_message(
            harness, session_id, '/tool shell {"command": "head -c 8 /dev/zero"}'
        )
        run_id = live[0].data["run_id"]
        arguments = {"command": "head -c 8 /dev/zero"}
        assert live[-1].data["arguments"] == arguments
        await approve_only_approval(harness, session_id, live)
        log = await finished_log(harness, peer, session_id, run_id, live=live)
        assert only(log, "tool.call")["arguments"] == arguments
        result = only(log, "tool.result")
        assert (result["tool"], result["output"]) == ("shell", R * 8)
        assert "".join(deltas_of(log)) == R * 8


async def test_a_binary_file_read_by_read_file(database: TestDatabase, tmp_path: Path) -> None:
    data = b"head\x00\x01\xff\xfe\xed\xa0\x80\x00tail"
    async with running_app(database, tmp_path) as harness, Peer(database) as peer:
        session_id = await new_session(harness.client, harness.account)
        workspace = harness.settings.workspace_root.resolve() / session_id
        workspace.mkdir(parents=True)
        (workspace / "blob.bin").write_bytes(data)
        live = await stream_message(harness, session_id, '/tool read_file {"path": "blob.bin"}')
        run_id = live[0].data["run_id"]
        log = await finished_log(harness, peer, session_id, run_id, live=live)
        assert log == live
        expected = data.decode("utf-8", errors="replace").replace("\x00", R)
        assert expected.startswith(f"head{R}\x01{R}")
        assert only(log, "tool.result")["output"] == expected
        assert "".join(deltas_of(log)) == expected


async def test_a_file_name_that_is_not_utf8_listed_by_list_files(
    database: TestDatabase, tmp_path: Path
) -> None:
    """Python shows the undecodable byte of a file name as a lone surrogate (U+DCFF)."""
    async with running_app(database, tmp_path) as harness, Peer(database) as peer:
        session_id = await new_session(harness.client, harness.account)
        workspace = harness.settings.workspace_root.resolve() / session_id
        workspace.mkdir(parents=True)
        (workspace / os.fsdecode(b"bad\xffname.txt")).write_text("x")
        live = await stream_message(harness, session_id, "/tool list_files {}")
        run_id = live[0].data["run_id"]
        log = await finished_log(harness, peer, session_id, run_id, live=live)
        assert log == live
        assert only(log, "tool.result")["output"] == f"bad{R}name.txt"
        assert "".join(deltas_of(log)) == f"bad{R}name.txt"


# --- what people send is still refused -----------------------------------------------------------


async def test_nul_and_lone_surrogates_from_people_are_still_refused(
    database: TestDatabase, tmp_path: Path
) -> None:
    """A person's message, rejection reason or edited arguments: 422, nothing stored or run."""
    async with running_app(database, tmp_path) as harness, Peer(database) as peer:
        client, account = harness.client, harness.account
        session_id = await new_session(client, account)
        url = f"/api/v1/sessions/{session_id}/messages"
        for content in (b'{"content": "a\\u0000b"}', b'{"content": "a\\ud800b"}'):
            refused = await client.post(
                url,
                content=content,
                headers={**account.headers, "Content-Type": "application/json"},
            )
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["code"] == "invalid_input"
            message = refused.json()["error"]["message"]
            assert any(word in message for word in ("NUL", "surrogate", "unicode")), message
        assert await peer.count("SELECT count(*) FROM runs WHERE session_id = ?", session_id) == 0

        live = await stream_message(harness, session_id, '/tool shell {"command": "echo hi"}')
        approval_url = f"/api/v1/sessions/{session_id}/approvals/{live[-1].data['approval_id']}"
        for body in (
            b'{"decision": "reject", "reason": "a\\u0000b"}',
            b'{"decision": "reject", "reason": "\\udfff"}',
            b'{"decision": "approve", "arguments": {"command": "echo a\\u0000b"}}',
            b'{"decision": "approve", "arguments": {"command": "echo \\ud800"}}',
            b'{"decision": "approve", "arguments": {"command": "echo", "x\\u0000": 1}}',
        ):
            refused = await client.post(
                approval_url,
                content=body,
                headers={**account.headers, "Content-Type": "application/json"},
            )
            assert refused.status_code == 422, (body, refused.text)
            assert refused.json()["error"]["code"] == "invalid_input"
            message = refused.json()["error"]["message"]
            assert any(word in message for word in ("NUL", "surrogate", "unicode")), message
        # Arguments nested deeper than anything a tool takes: 422, never a 500.
        deep = '{"decision": "approve", "arguments": {"a": ' + "[" * 500 + "]" * 500 + "}}"
        refused = await client.post(
            approval_url,
            content=deep.encode(),
            headers={**account.headers, "Content-Type": "application/json"},
        )
        assert refused.status_code == 422, refused.text
        assert "nested" in refused.json()["error"]["message"]
        run_id = live[0].data["run_id"]
        assert (await run_of(client, account, session_id, run_id))["status"] == (
            "awaiting_approval"
        )
        [(status,)] = await peer.fetch(
            "SELECT status FROM approvals WHERE id = ?", live[-1].data["approval_id"]
        )
        assert status == "pending"
