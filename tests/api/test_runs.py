"""Messages start runs; their events stream over SSE; approvals pause and resume them.

Everything goes through the real app (lifespan, executor, database) over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from countersign.config import Settings
from tests.api.test_errors import MakeAccount
from tests.conftest import Account

WAIT = 20.0


@dataclass(frozen=True)
class Sse:
    """One parsed server-sent event."""

    id: int
    event: str
    data: dict[str, Any]


def parse_sse(body: str) -> list[Sse]:
    """The events of an SSE body (comments and pings left out)."""
    events: list[Sse] = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        if "event" in fields:
            events.append(Sse(int(fields["id"]), fields["event"], json.loads(fields["data"])))
    return events


async def new_session(client: httpx.AsyncClient, account: Account) -> str:
    response = await client.post("/api/v1/sessions", json={}, headers=account.headers)
    assert response.status_code == 201, response.text
    session_id: str = response.json()["id"]
    return session_id


async def send(
    client: httpx.AsyncClient, account: Account, session_id: str, content: str
) -> dict[str, Any]:
    response = await client.post(
        f"/api/v1/sessions/{session_id}/messages",
        json={"content": content},
        headers=account.headers,
    )
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


async def events(
    client: httpx.AsyncClient,
    account: Account,
    session_id: str,
    run_id: str,
    *,
    after: int | None = None,
) -> list[Sse]:
    headers = dict(account.headers)
    if after is not None:
        headers["Last-Event-ID"] = str(after)
    async with asyncio.timeout(WAIT):
        response = await client.get(
            f"/api/v1/sessions/{session_id}/runs/{run_id}/events", headers=headers
        )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return parse_sse(response.text)


async def run_of(
    client: httpx.AsyncClient, account: Account, session_id: str, run_id: str
) -> dict[str, Any]:
    response = await client.get(
        f"/api/v1/sessions/{session_id}/runs/{run_id}", headers=account.headers
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def messages_of(
    client: httpx.AsyncClient, account: Account, session_id: str
) -> list[dict[str, Any]]:
    response = await client.get(f"/api/v1/sessions/{session_id}/messages", headers=account.headers)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def test_a_message_streams_the_demo_reply_word_by_word(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """202 {message, run}; the events spell 'You said: ...' one word a delta, then finish."""
    account = await make_account()
    session_id = await new_session(client, account)
    started = await send(client, account, session_id, "hello there  world")
    assert started["message"]["role"] == "user"
    assert started["message"]["content"] == "hello there  world"
    assert started["run"]["status"] in ("queued", "running")
    run_id = started["run"]["id"]

    log = await events(client, account, session_id, run_id)
    names = [event.event for event in log]
    assert names[0] == "run.started"
    assert names[-2:] == ["message.completed", "run.finished"]
    assert [event.id for event in log] == list(range(1, len(log) + 1))
    assert all(event.data["run_id"] == run_id and event.data["seq"] == event.id for event in log)
    deltas = [event.data["text"] for event in log if event.event == "text.delta"]
    assert len(deltas) == 5
    text = "".join(deltas)
    assert text == "You said: hello there  world"

    stored = await messages_of(client, account, session_id)
    assert [(item["role"], item["content"]) for item in stored] == [
        ("user", "hello there  world"),
        ("assistant", text),
    ]
    assert stored[1]["run_id"] == run_id
    run = await run_of(client, account, session_id, run_id)
    assert run["status"] == "succeeded"
    assert run["finished_at"] is not None


async def test_accept_event_stream_answers_with_the_runs_events(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """POST .../messages with Accept: text/event-stream is 200 and the run's whole stream."""
    account = await make_account()
    session_id = await new_session(client, account)
    async with asyncio.timeout(WAIT):
        response = await client.post(
            f"/api/v1/sessions/{session_id}/messages",
            json={"content": "stream me"},
            headers={**account.headers, "Accept": "text/event-stream"},
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    log = parse_sse(response.text)
    assert log[-1].event == "run.finished"
    assert "".join(e.data["text"] for e in log if e.event == "text.delta") == "You said: stream me"
    # The run is named before the first event, so a broken stream can be resumed.
    run_id = log[0].data["run_id"]
    assert response.headers["location"] == f"/api/v1/sessions/{session_id}/runs/{run_id}"
    run = await client.get(response.headers["location"], headers=account.headers)
    assert run.json()["status"] == "succeeded"


async def test_a_message_without_a_stream_names_its_run_in_location(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account = await make_account()
    session_id = await new_session(client, account)
    response = await client.post(
        f"/api/v1/sessions/{session_id}/messages",
        json={"content": "later"},
        headers=account.headers,
    )
    assert response.status_code == 202
    run_id = response.json()["run"]["id"]
    assert response.headers["location"] == f"/api/v1/sessions/{session_id}/runs/{run_id}"


async def test_last_event_id_yields_exactly_the_missing_events(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """Invariant 4: resuming after any seq gives the rest of the log, no gap, no duplicate."""
    account = await make_account()
    session_id = await new_session(client, account)
    run_id = (await send(client, account, session_id, "one two three four"))["run"]["id"]
    full = await events(client, account, session_id, run_id)
    for cut in range(len(full)):
        rest = await events(client, account, session_id, run_id, after=full[cut].id)
        assert rest == full[cut + 1 :]


async def test_a_bad_last_event_id_is_422(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account = await make_account()
    session_id = await new_session(client, account)
    run_id = (await send(client, account, session_id, "hi"))["run"]["id"]
    response = await client.get(
        f"/api/v1/sessions/{session_id}/runs/{run_id}/events",
        headers={**account.headers, "Last-Event-ID": "abc"},
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_input"


async def test_a_second_message_while_a_run_waits_is_409_naming_run_and_approval(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """Invariant 9: the 409 names the active run and its pending approval."""
    account = await make_account()
    session_id = await new_session(client, account)
    run_id = (
        await send(
            client, account, session_id, '/tool write_file {"path": "a.txt", "content": "x"}'
        )
    )["run"]["id"]
    log = await events(client, account, session_id, run_id)
    assert log[-1].event == "approval.required"
    approval_id = log[-1].data["approval_id"]
    response = await client.post(
        f"/api/v1/sessions/{session_id}/messages",
        json={"content": "again"},
        headers=account.headers,
    )
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "run_active"
    assert error["detail"]["run_id"] == run_id
    assert error["detail"]["approval_id"] == approval_id
    assert run_id in error["message"]
    assert approval_id in error["message"]


async def test_an_approved_tool_call_runs_and_the_run_finishes(
    client: httpx.AsyncClient, make_account: MakeAccount, settings: Settings
) -> None:
    """ask → approval.required (stream ends) → approve → tool runs → reply with its result."""
    account = await make_account()
    session_id = await new_session(client, account)
    run_id = (
        await send(
            client, account, session_id, '/tool write_file {"path": "notes/a.txt", "content": "hi"}'
        )
    )["run"]["id"]
    first = await events(client, account, session_id, run_id)
    assert [e.event for e in first][-1] == "approval.required"
    required = first[-1].data
    assert required["tool"] == "write_file"
    assert required["arguments"] == {"path": "notes/a.txt", "content": "hi"}
    workspace = Path(settings.workspace_root) / session_id
    assert not (workspace / "notes" / "a.txt").exists()

    pending = await client.get(
        f"/api/v1/sessions/{session_id}/pending-approvals", headers=account.headers
    )
    assert [item["id"] for item in pending.json()["items"]] == [required["approval_id"]]
    assert (await run_of(client, account, session_id, run_id))["status"] == "awaiting_approval"

    decided = await client.post(
        f"/api/v1/sessions/{session_id}/approvals/{required['approval_id']}",
        json={"decision": "approve", "reason": "fine"},
        headers=account.headers,
    )
    assert decided.status_code == 200, decided.text
    body = decided.json()
    assert body["status"] == "approved"
    assert body["decided_by"] == str(account.user.id)
    assert body["reason"] == "fine"
    assert (await run_of(client, account, session_id, run_id))["status"] != "awaiting_approval"

    rest = await events(client, account, session_id, run_id, after=first[-1].id)
    names = [e.event for e in rest]
    assert names[0] == "approval.resolved"
    assert "tool.call" in names
    assert "tool.result" in names
    assert names[-1] == "run.finished"
    assert (workspace / "notes" / "a.txt").read_text() == "hi"
    result = next(e for e in rest if e.event == "tool.result").data
    assert result["tool"] == "write_file"
    stored = await messages_of(client, account, session_id)
    assert stored[-1]["role"] == "assistant"
    assert stored[-1]["content"] == result["output"]
    everything = await events(client, account, session_id, run_id)
    assert (
        "".join(e.data["text"] for e in everything if e.event == "text.delta")
        == stored[-1]["content"]
    )
    again = await client.post(
        f"/api/v1/sessions/{session_id}/approvals/{required['approval_id']}",
        json={"decision": "reject"},
        headers=account.headers,
    )
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "already_decided"


async def test_a_decided_run_is_handed_to_the_deciding_process_in_its_transaction(
    client: httpx.AsyncClient, make_account: MakeAccount, caplog: pytest.LogCaptureFixture
) -> None:
    """With a free slot, the decision's own transaction claims the re-queued run for this
    process's executor: it is never seen ``queued`` and the claim loop does not take it."""
    caplog.set_level(logging.DEBUG, logger="countersign.services.executor")
    account = await make_account()
    session_id = await new_session(client, account)
    command = '/tool write_file {"path": "b.txt", "content": "b"}'
    run_id = (await send(client, account, session_id, command))["run"]["id"]
    first = await events(client, account, session_id, run_id)
    assert first[-1].event == "approval.required"
    decided = await client.post(
        f"/api/v1/sessions/{session_id}/approvals/{first[-1].data['approval_id']}",
        json={"decision": "approve"},
        headers=account.headers,
    )
    assert decided.status_code == 200, decided.text
    # Committed as running (or already done) together with the decision.
    assert (await run_of(client, account, session_id, run_id))["status"] in (
        "running",
        "succeeded",
    )
    rest = await events(client, account, session_id, run_id, after=first[-1].id)
    assert rest[-1].event == "run.finished"
    attempts = [
        record.getMessage()
        for record in caplog.records
        if record.name == "countersign.services.executor" and run_id in record.getMessage()
    ]
    assert attempts == [
        f"run {run_id} attempt 1 handed over in-process",
        f"run {run_id} attempt 2 handed over in-process",
    ]


async def test_edited_arguments_are_used_and_checked(
    client: httpx.AsyncClient, make_account: MakeAccount, settings: Settings
) -> None:
    account = await make_account()
    session_id = await new_session(client, account)
    run_id = (
        await send(
            client, account, session_id, '/tool write_file {"path": "a.txt", "content": "x"}'
        )
    )["run"]["id"]
    approval_id = (await events(client, account, session_id, run_id))[-1].data["approval_id"]
    url = f"/api/v1/sessions/{session_id}/approvals/{approval_id}"
    bad = await client.post(
        url, json={"decision": "approve", "arguments": {"path": 3}}, headers=account.headers
    )
    assert bad.status_code == 422, bad.text
    assert (await run_of(client, account, session_id, run_id))["status"] == "awaiting_approval"
    good = await client.post(
        url,
        json={"decision": "approve", "arguments": {"path": "b.txt", "content": "edited"}},
        headers=account.headers,
    )
    assert good.status_code == 200, good.text
    assert good.json()["decided_arguments"] == {"path": "b.txt", "content": "edited"}
    assert good.json()["arguments"] == {"path": "a.txt", "content": "x"}
    await events(client, account, session_id, run_id, after=0)
    workspace = Path(settings.workspace_root) / session_id
    await wait_for_status(client, account, session_id, run_id, "succeeded")
    assert (workspace / "b.txt").read_text() == "edited"
    assert not (workspace / "a.txt").exists()


async def wait_for_status(
    client: httpx.AsyncClient, account: Account, session_id: str, run_id: str, status: str
) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        while True:
            run = await run_of(client, account, session_id, run_id)
            if run["status"] == status:
                return run
            await asyncio.sleep(0.05)


async def test_a_rejected_tool_call_is_not_run(
    client: httpx.AsyncClient, make_account: MakeAccount, settings: Settings
) -> None:
    account = await make_account()
    session_id = await new_session(client, account)
    run_id = (await send(client, account, session_id, '/tool shell {"command": "touch made"}'))[
        "run"
    ]["id"]
    approval_id = (await events(client, account, session_id, run_id))[-1].data["approval_id"]
    decided = await client.post(
        f"/api/v1/sessions/{session_id}/approvals/{approval_id}",
        json={"decision": "reject", "reason": "not now"},
        headers=account.headers,
    )
    assert decided.status_code == 200
    assert decided.json()["status"] == "rejected"
    await wait_for_status(client, account, session_id, run_id, "succeeded")
    log = await events(client, account, session_id, run_id)
    assert "tool.call" not in [e.event for e in log]
    resolved = next(e for e in log if e.event == "approval.resolved").data
    assert resolved["status"] == "rejected"
    assert resolved["reason"] == "not now"
    assert not (Path(settings.workspace_root) / session_id / "made").exists()
    reply = (await messages_of(client, account, session_id))[-1]["content"]
    assert "not now" in reply


async def test_concurrent_decisions_one_wins(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """Two decisions at once on one approval: exactly one 200, the other 409."""
    account = await make_account()
    session_id = await new_session(client, account)
    run_id = (
        await send(client, account, session_id, '/tool write_file {"path": "a", "content": "b"}')
    )["run"]["id"]
    approval_id = (await events(client, account, session_id, run_id))[-1].data["approval_id"]
    url = f"/api/v1/sessions/{session_id}/approvals/{approval_id}"
    answers = await asyncio.gather(
        client.post(url, json={"decision": "approve"}, headers=account.headers),
        client.post(url, json={"decision": "reject"}, headers=account.headers),
    )
    assert sorted(answer.status_code for answer in answers) == [200, 409]
    await wait_for_status(client, account, session_id, run_id, "succeeded")
    log = await events(client, account, session_id, run_id)
    assert [e.event for e in log].count("approval.resolved") == 1


async def test_cancel_ends_a_waiting_run(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account = await make_account()
    session_id = await new_session(client, account)
    run_id = (
        await send(client, account, session_id, '/tool write_file {"path": "a", "content": "b"}')
    )["run"]["id"]
    await events(client, account, session_id, run_id)
    url = f"/api/v1/sessions/{session_id}/runs/{run_id}/cancel"
    cancelled = await client.post(url, headers=account.headers)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    log = await events(client, account, session_id, run_id)
    assert log[-1].event == "run.failed"
    assert log[-1].data["status"] == "cancelled"
    pending = await client.get(
        f"/api/v1/sessions/{session_id}/pending-approvals", headers=account.headers
    )
    assert pending.json()["items"] == []
    again = await client.post(url, headers=account.headers)
    assert again.status_code == 409
    # The session is free again.
    await send(client, account, session_id, "next")


@pytest.mark.parametrize("path", ["", "/events", "/cancel"])
async def test_another_users_run_is_404(
    client: httpx.AsyncClient, make_account: MakeAccount, path: str
) -> None:
    owner, stranger = await make_account(), await make_account()
    session_id = await new_session(client, owner)
    run_id = (await send(client, owner, session_id, "mine"))["run"]["id"]
    url = f"/api/v1/sessions/{session_id}/runs/{run_id}{path}"
    method = "POST" if path == "/cancel" else "GET"
    theirs = await client.request(method, url, headers=stranger.headers)
    missing = await client.request(
        method,
        f"/api/v1/sessions/{session_id}/runs/0190a000-0000-7000-8000-000000000000{path}",
        headers=owner.headers,
    )
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["code"] == "not_found"
