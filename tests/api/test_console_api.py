"""What the web console needs from the API: sign-in providers, the approvals inbox, the
session's active run and title search, the approval's fields, `at` on events, idempotent
decisions, and the per-user live feed (`GET /me/events`), on both databases.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from countersign.config import Settings
from tests.api.test_errors import MakeAccount
from tests.api.test_runs import events, messages_of, new_session, run_of, send
from tests.conftest import Account
from tests.services.test_runs import WAIT, Harness, running_app, served_over_tcp
from tests.support.databases import TestDatabase

API = "/api/v1"
WRITE = '/tool write_file {{"path": "{name}", "content": "{content}"}}'


async def ask(client: httpx.AsyncClient, account: Account, session_id: str, name: str) -> str:
    """Send a tool call that waits for approval; the pending approval's id."""
    run_id = (await send(client, account, session_id, WRITE.format(name=name, content="x")))["run"][
        "id"
    ]
    first = await events(client, account, session_id, run_id)
    assert first[-1].event == "approval.required", first
    approval_id: str = first[-1].data["approval_id"]
    return approval_id


async def test_history_pages_upward_from_its_newest_message(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """`order=desc` lists a session's messages newest first, and its cursor goes on further
    back, so a page can show the end of a long history first; a bad order is a 422."""
    account = await make_account()
    session_id = await new_session(client, account)
    for index in range(3):
        run_id = (await send(client, account, session_id, f"message {index}"))["run"]["id"]
        await events(client, account, session_id, run_id)
    seqs: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = "order=desc&limit=4" + (f"&cursor={cursor}" if cursor else "")
        page = await client.get(
            f"{API}/sessions/{session_id}/messages?{query}", headers=account.headers
        )
        assert page.status_code == 200, page.text
        seqs += [item["seq"] for item in page.json()["items"]]
        pages += 1
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert pages == 2
    oldest_first = await client.get(
        f"{API}/sessions/{session_id}/messages?limit=100", headers=account.headers
    )
    assert seqs == [item["seq"] for item in oldest_first.json()["items"]][::-1]
    assert len(seqs) == 6
    bad = await client.get(
        f"{API}/sessions/{session_id}/messages?order=sideways", headers=account.headers
    )
    assert bad.status_code == 422


# --- sign-in providers ---------------------------------------------------------------------


async def test_sign_in_providers_are_public_and_name_their_login_urls(
    database: TestDatabase, tmp_path: Path
) -> None:
    providers = {
        "corp": {
            "kind": "oidc",
            "client_id": "corp-client",
            "client_secret": "corp-secret",
            "discovery_url": "https://idp.example/.well-known/openid-configuration",
        },
        "github": {"kind": "github", "client_id": "gh-client", "client_secret": "gh-secret"},
    }
    async with running_app(database, tmp_path, oauth_providers=providers) as harness:
        answer = await harness.client.get(f"{API}/auth/providers")  # no credentials
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body == {
            "items": [
                {
                    "name": "corp",
                    "kind": "oidc",
                    "login_url": f"{API}/auth/oauth/corp/login",
                },
                {
                    "name": "github",
                    "kind": "github",
                    "login_url": f"{API}/auth/oauth/github/login",
                },
            ],
            "registration_open": True,
        }
        assert "secret" not in answer.text


async def test_no_sign_in_providers_is_an_empty_list(client: httpx.AsyncClient) -> None:
    answer = await client.get(f"{API}/auth/providers")
    assert answer.status_code == 200
    assert answer.json() == {"items": [], "registration_open": True}


# --- sessions: active run and title search ---------------------------------------------------


async def test_a_session_names_its_active_run_until_it_ends(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account = await make_account()
    session_id = await new_session(client, account)
    url = f"{API}/sessions/{session_id}"
    assert (await client.get(url, headers=account.headers)).json()["active_run_id"] is None
    approval_id = await ask(client, account, session_id, "a.txt")
    session = (await client.get(url, headers=account.headers)).json()
    run_id = session["active_run_id"]
    assert run_id is not None
    assert (await run_of(client, account, session_id, run_id))["status"] == "awaiting_approval"
    listed = (await client.get(f"{API}/sessions", headers=account.headers)).json()["items"]
    assert [item["active_run_id"] for item in listed] == [run_id]
    decided = await client.post(
        f"{url}/approvals/{approval_id}", json={"decision": "reject"}, headers=account.headers
    )
    assert decided.status_code == 200
    await events(client, account, session_id, run_id)  # to its end
    assert (await client.get(url, headers=account.headers)).json()["active_run_id"] is None


async def test_sessions_are_searched_by_title_in_any_case_and_literally(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account, other = await make_account(), await make_account()
    titles = ["Quarterly report", "quarterly PLAN", "100% done", "1000 done", "misc"]
    made = {}
    for title in titles:
        answer = await client.post(
            f"{API}/sessions", json={"title": title}, headers=account.headers
        )
        made[title] = answer.json()["id"]
    await client.post(f"{API}/sessions", json={"title": "quarterly"}, headers=other.headers)

    async def found(q: str) -> list[str]:
        answer = await client.get(f"{API}/sessions", params={"q": q}, headers=account.headers)
        assert answer.status_code == 200, answer.text
        return [item["title"] for item in answer.json()["items"]]

    assert await found("QUARTERLY") == ["quarterly PLAN", "Quarterly report"]
    assert await found("100%") == ["100% done"]  # % is a character, not a wildcard
    assert await found("_") == []
    assert await found("nothing like it") == []
    page = await client.get(
        f"{API}/sessions", params={"q": "quarterly", "limit": 1}, headers=account.headers
    )
    first = page.json()
    assert [item["title"] for item in first["items"]] == ["quarterly PLAN"]
    rest = await client.get(
        f"{API}/sessions",
        params={"q": "quarterly", "cursor": first["next_cursor"]},
        headers=account.headers,
    )
    assert [item["title"] for item in rest.json()["items"]] == ["Quarterly report"]
    refused = await client.get(f"{API}/sessions", params={"q": "a\x00b"}, headers=account.headers)
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "invalid_input"


# --- approvals: inbox, fields, idempotent decisions ----------------------------------------


async def test_the_inbox_lists_pending_approvals_across_sessions_oldest_first(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account, other = await make_account(), await make_account()
    first_session = await new_session(client, account)
    second_session = await new_session(client, account)
    first = await ask(client, account, first_session, "one.txt")
    second = await ask(client, account, second_session, "two.txt")
    others = await ask(client, other, await new_session(client, other), "theirs.txt")

    answer = await client.get(
        f"{API}/approvals", params={"status": "pending"}, headers=account.headers
    )
    assert answer.status_code == 200, answer.text
    items = answer.json()["items"]
    assert [(item["id"], item["session_id"]) for item in items] == [
        (first, first_session),
        (second, second_session),
    ]
    assert items[0]["tool"] == "write_file"
    assert items[0]["arguments"] == {"path": "one.txt", "content": "x"}
    assert items[0]["asked_because"] == "policy ask"
    assert items[0]["decided_arguments"] is None
    theirs = await client.get(
        f"{API}/approvals", params={"status": "pending"}, headers=other.headers
    )
    assert [item["id"] for item in theirs.json()["items"]] == [others]

    page = await client.get(
        f"{API}/approvals", params={"status": "pending", "limit": 1}, headers=account.headers
    )
    assert [item["id"] for item in page.json()["items"]] == [first]
    rest = await client.get(
        f"{API}/approvals",
        params={"status": "pending", "cursor": page.json()["next_cursor"]},
        headers=account.headers,
    )
    assert [item["id"] for item in rest.json()["items"]] == [second]

    decided = await client.post(
        f"{API}/sessions/{first_session}/approvals/{first}",
        json={"decision": "reject", "reason": "no"},
        headers=account.headers,
    )
    assert decided.status_code == 200
    pending = await client.get(
        f"{API}/approvals", params={"status": "pending"}, headers=account.headers
    )
    assert [item["id"] for item in pending.json()["items"]] == [second]
    rejected = await client.get(
        f"{API}/approvals", params={"status": "rejected"}, headers=account.headers
    )
    assert [item["id"] for item in rejected.json()["items"]] == [first]
    everything = await client.get(f"{API}/approvals", headers=account.headers)
    assert [item["id"] for item in everything.json()["items"]] == [first, second]
    bad = await client.get(f"{API}/approvals", params={"status": "maybe"}, headers=account.headers)
    assert bad.status_code == 422


async def test_an_edit_keeps_the_proposed_arguments_beside_the_decided_ones(
    client: httpx.AsyncClient, make_account: MakeAccount, settings: Settings
) -> None:
    account = await make_account()
    session_id = await new_session(client, account)
    approval_id = await ask(client, account, session_id, "proposed.txt")
    edited = {"path": "edited.txt", "content": "as edited"}
    decided = await client.post(
        f"{API}/sessions/{session_id}/approvals/{approval_id}",
        json={"decision": "approve", "arguments": edited},
        headers=account.headers,
    )
    assert decided.status_code == 200, decided.text
    body = decided.json()
    assert body["arguments"] == {"path": "proposed.txt", "content": "x"}
    assert body["decided_arguments"] == edited
    assert body["session_id"] == session_id
    run_id = body["run_id"]
    rest = await events(client, account, session_id, run_id)
    assert rest[-1].event == "run.finished"
    workspace = Path(settings.workspace_root) / session_id
    assert (workspace / "edited.txt").read_text() == "as edited"
    assert not (workspace / "proposed.txt").exists()
    resolved = next(e for e in rest if e.event == "approval.resolved").data
    assert resolved["arguments"] == edited  # what the tool ran with
    listed = await client.get(f"{API}/approvals", headers=account.headers)
    [item] = listed.json()["items"]
    assert (item["arguments"]["path"], item["decided_arguments"]) == ("proposed.txt", edited)


async def test_one_approval_is_read_pending_then_decided_and_only_by_its_owner(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account, other = await make_account(), await make_account()
    session_id = await new_session(client, account)
    approval_id = await ask(client, account, session_id, "one.txt")
    url = f"{API}/sessions/{session_id}/approvals/{approval_id}"
    pending = await client.get(url, headers=account.headers)
    assert pending.status_code == 200, pending.text
    assert (pending.json()["status"], pending.json()["decided_by"]) == ("pending", None)
    decided = await client.post(
        url, json={"decision": "reject", "reason": "read it back"}, headers=account.headers
    )
    assert decided.status_code == 200
    after = (await client.get(url, headers=account.headers)).json()
    assert (after["status"], after["reason"]) == ("rejected", "read it back")
    assert after["decided_by"] == str(account.user.id)
    assert after == decided.json()
    theirs = await client.get(url, headers=other.headers)
    missing = await client.get(
        f"{API}/sessions/{session_id}/approvals/{uuid.uuid4()}", headers=account.headers
    )
    assert theirs.status_code == missing.status_code == 404


async def test_every_event_carries_when_it_was_recorded(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account = await make_account()
    session_id = await new_session(client, account)
    before = datetime.now().astimezone()
    run_id = (await send(client, account, session_id, "hello there"))["run"]["id"]
    log = await events(client, account, session_id, run_id)
    assert log[-1].event == "run.finished"
    stamps = [datetime.fromisoformat(event.data["at"]) for event in log]
    assert all(stamp.tzinfo is not None for stamp in stamps)
    assert stamps == sorted(stamps)
    assert before.timestamp() - 5 < stamps[0].timestamp() < before.timestamp() + 60


async def test_a_decision_retried_with_its_idempotency_key_answers_the_same(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account = await make_account()
    session_id = await new_session(client, account)
    approval_id = await ask(client, account, session_id, "once.txt")
    url = f"{API}/sessions/{session_id}/approvals/{approval_id}"
    headers = {**account.headers, "Idempotency-Key": "decide-once"}
    body = {"decision": "reject", "reason": "not now"}
    first = await client.post(url, json=body, headers=headers)
    assert first.status_code == 200, first.text
    again = await client.post(url, json=body, headers=headers)
    assert (again.status_code, again.json()) == (200, first.json())
    different = await client.post(url, json={"decision": "approve"}, headers=headers)
    assert different.status_code == 422
    without = await client.post(url, json=body, headers=account.headers)
    assert without.status_code == 409
    assert without.json()["error"]["code"] == "already_decided"
    log = await events(client, account, session_id, first.json()["run_id"])
    assert log[-1].event == "run.finished"
    assert [e.event for e in log].count("approval.resolved") == 1
    stored = await messages_of(client, account, session_id)
    assert stored[-1]["role"] == "assistant"


async def test_concurrent_retries_of_one_decision_all_answer_200(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account = await make_account()
    session_id = await new_session(client, account)
    approval_id = await ask(client, account, session_id, "race.txt")
    url = f"{API}/sessions/{session_id}/approvals/{approval_id}"
    headers = {**account.headers, "Idempotency-Key": "one-decision"}
    answers = await asyncio.gather(
        *(client.post(url, json={"decision": "approve"}, headers=headers) for _ in range(5))
    )
    assert [answer.status_code for answer in answers] == [200] * 5, [a.text for a in answers]
    assert len({json.dumps(answer.json(), sort_keys=True) for answer in answers}) == 1


# --- the per-user live feed ------------------------------------------------------------------


class FeedReader:
    """A `GET /me/events` stream read in the background; its events kept in order."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []
        self.changed = asyncio.Event()
        self.opened = asyncio.Event()
        self.ended = asyncio.Event()

    async def wait_for(self, event: str, **fields: Any) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            while True:
                for name, data in self.items:
                    if name == event and all(data.get(k) == v for k, v in fields.items()):
                        return data
                self.changed.clear()
                await self.changed.wait()


@asynccontextmanager
async def feed_of(base_url: str, account: Account) -> AsyncIterator[FeedReader]:
    reader = FeedReader()

    async def read() -> None:
        async with (
            httpx.AsyncClient(base_url=base_url, timeout=WAIT) as http,
            aconnect_sse(http, "GET", f"{API}/me/events", headers=account.headers) as source,
        ):
            assert source.response.status_code == 200
            reader.opened.set()
            async for sse in source.aiter_sse():
                reader.items.append((sse.event, json.loads(sse.data)))
                reader.changed.set()
        reader.ended.set()

    task = asyncio.create_task(read())
    try:
        async with asyncio.timeout(WAIT):
            await reader.opened.wait()
        await asyncio.sleep(0.05)  # the hub registers the feed as its body starts
        yield reader
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _account(harness: Harness) -> Account:
    from countersign.services.accounts import create_api_key, create_user

    email = f"feed-{uuid.uuid4().hex[:12]}@example.test"
    user = await create_user(harness.app.state.services, email=email, password="correct horse 1")
    _key, secret = await create_api_key(harness.app.state.services, email=email, name="feed")
    return Account(user=user, key=secret)


async def test_the_feed_tells_its_user_of_runs_approvals_and_sessions_and_no_one_else(
    database: TestDatabase, tmp_path: Path
) -> None:
    async with running_app(database, tmp_path) as harness, served_over_tcp(harness.app) as url:
        client, account = harness.client, harness.account
        other = await _account(harness)
        async with feed_of(url, account) as mine, feed_of(url, other) as theirs:
            session_id = await new_session(client, account)
            await mine.wait_for("session.changed", session_id=session_id)
            approval_id = await ask(client, account, session_id, "fed.txt")
            required = await mine.wait_for("approval.required", approval_id=approval_id)
            assert required["session_id"] == session_id
            assert required["tool"] == "write_file"
            assert required["status"] == "pending"
            run_id = required["run_id"]
            await mine.wait_for("run.status", run_id=run_id, status="awaiting_approval")

            decided = await client.post(
                f"{API}/sessions/{session_id}/approvals/{approval_id}",
                json={"decision": "reject", "reason": "not in the feed test"},
                headers=account.headers,
            )
            assert decided.status_code == 200
            resolved = await mine.wait_for("approval.resolved", approval_id=approval_id)
            assert (resolved["status"], resolved["reason"]) == ("rejected", "not in the feed test")
            assert resolved["decided_by"] == str(account.user.id)
            await mine.wait_for("run.status", run_id=run_id, status="succeeded")

            renamed = await client.patch(
                f"{API}/sessions/{session_id}", json={"title": "renamed"}, headers=account.headers
            )
            assert renamed.status_code == 200
            count = sum(1 for name, _ in mine.items if name == "session.changed")
            deleted = await client.delete(f"{API}/sessions/{session_id}", headers=account.headers)
            assert deleted.status_code == 204
            async with asyncio.timeout(WAIT):
                while sum(1 for name, _ in mine.items if name == "session.changed") < count + 1:
                    mine.changed.clear()
                    await mine.changed.wait()

            # The other user's feed: its own session shows up, and nothing of the first user's.
            own = await new_session(client, other)
            await theirs.wait_for("session.changed", session_id=own)
            mentioned = json.dumps(theirs.items)
            assert session_id not in mentioned
            assert approval_id not in mentioned
            assert run_id not in mentioned
            # Nothing of a run appears twice in a row with the same status.
            statuses = [
                (data["run_id"], data["status"])
                for name, data in mine.items
                if name == "run.status"
            ]
            assert all(a != b for a, b in itertools.pairwise(statuses))


async def test_a_feed_ends_once_its_credential_is_no_longer_valid(
    database: TestDatabase, tmp_path: Path
) -> None:
    """The feed checks its credential again every COUNTERSIGN_FEED_RECHECK_SECONDS: a deleted
    API key ends the feed it opened; a feed whose key stays valid goes on."""
    from countersign.services.accounts import create_api_key

    async with (
        running_app(database, tmp_path, feed_recheck_seconds=0.2) as harness,
        served_over_tcp(harness.app) as url,
    ):
        services = harness.app.state.services
        key, secret = await create_api_key(services, email=harness.account.user.email, name="tab")
        doomed = Account(user=harness.account.user, key=secret)
        async with feed_of(url, doomed) as ending, feed_of(url, harness.account) as staying:
            await asyncio.sleep(0.5)  # two rechecks pass: both keys are valid
            assert not ending.ended.is_set()
            assert not staying.ended.is_set()
            deleted = await harness.client.delete(
                f"{API}/api-keys/{key.id}", headers=harness.account.headers
            )
            assert deleted.status_code == 204
            async with asyncio.timeout(WAIT):
                await ending.ended.wait()
            await asyncio.sleep(0.5)
            assert not staying.ended.is_set()
            # The feed that goes on still carries events.
            session_id = await new_session(harness.client, harness.account)
            await staying.wait_for("session.changed", session_id=session_id)


async def test_the_feed_needs_credentials(client: httpx.AsyncClient) -> None:
    answer = await client.get(f"{API}/me/events")
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "unauthenticated"


@pytest.mark.backends("postgres")
async def test_a_decision_made_through_another_process_reaches_the_feed(
    database: TestDatabase, tmp_path: Path
) -> None:
    """Two servers on one PostgreSQL database: the feed is read from one, the approval is
    asked and decided through the other."""
    async with (
        running_app(database, tmp_path / "a") as first,
        served_over_tcp(first.app) as url,
        running_app(database, tmp_path / "b") as second,
    ):
        account = second.account
        async with feed_of(url, account) as feed:
            session_id = await new_session(second.client, account)
            approval_id = await ask(second.client, account, session_id, "far.txt")
            await feed.wait_for("approval.required", approval_id=approval_id)
            decided = await second.client.post(
                f"{API}/sessions/{session_id}/approvals/{approval_id}",
                json={"decision": "approve"},
                headers=account.headers,
            )
            assert decided.status_code == 200
            resolved = await feed.wait_for("approval.resolved", approval_id=approval_id)
            assert resolved["status"] == "approved"
