"""The agent API over HTTP: create, list by cursor, read, edit, delete, and what is refused.

The module's server is configured with a default model other than ``demo``, so that a test can
tell "the configured default" from a hard-coded one; agents that run turns name ``demo``.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from countersign.config import Settings
from countersign.domain.errors import Conflict
from countersign.domain.models import (
    DEFAULT_AGENT_INSTRUCTIONS,
    DEFAULT_AGENT_TOOLS,
    AgentId,
    ToolPolicy,
    ToolSetting,
)
from countersign.services import ServiceDeps
from countersign.services import agents as agent_service
from countersign.services.accounts import create_user
from tests.api.test_errors import MakeAccount, assert_error
from tests.api.test_runs import Sse, events, messages_of, send
from tests.api.test_sessions import default_agent_id, parse_time
from tests.conftest import Account, alive_rows, make_settings
from tests.support.databases import TestDatabase

AGENT_FIELDS = {
    "id",
    "name",
    "model",
    "instructions",
    "tools",
    "is_default",
    "created_at",
    "updated_at",
}
CONFIGURED_DEFAULT_MODEL = "openai:gpt-4o-mini"
DEFAULT_TOOLS_JSON = [{"name": t.name, "policy": t.policy.value} for t in DEFAULT_AGENT_TOOLS]
MISSING_ID = "0190a000-0000-7000-8000-000000000000"


@pytest.fixture
def settings(database: TestDatabase, tmp_path: Path) -> Settings:
    """This module's settings: a default model that is not ``demo`` (and its provider's key)."""
    return make_settings(
        database.url,
        workspace_root=tmp_path / "workspaces",
        default_model=CONFIGURED_DEFAULT_MODEL,
        openai_api_key="sk-test-agents-0123456789",
    )


async def create(
    client: httpx.AsyncClient, account: Account, body: dict[str, Any], **headers: str
) -> dict[str, Any]:
    """POST /agents, which must answer 201; the created agent."""
    response = await client.post(
        "/api/v1/agents", json=body, headers={**account.headers, **headers}
    )
    assert response.status_code == 201, response.text
    agent: dict[str, Any] = response.json()
    return agent


async def fetch(client: httpx.AsyncClient, account: Account, agent_id: str) -> dict[str, Any]:
    """GET /agents/{id}, which must answer 200."""
    response = await client.get(f"/api/v1/agents/{agent_id}", headers=account.headers)
    assert response.status_code == 200, response.text
    agent: dict[str, Any] = response.json()
    return agent


async def listed_ids(client: httpx.AsyncClient, account: Account) -> list[str]:
    """Every agent id the account can list, following the cursor through all pages."""
    ids: list[str] = []
    params: dict[str, str | int] = {"limit": 100}
    for _ in range(100):
        response = await client.get("/api/v1/agents", params=params, headers=account.headers)
        assert response.status_code == 200, response.text
        page = response.json()
        ids.extend(item["id"] for item in page["items"])
        if page["next_cursor"] is None:
            return ids
        params["cursor"] = page["next_cursor"]
    raise AssertionError("the cursor never ended")


# --- create and read ------------------------------------------------------------------------


async def test_create_keeps_every_field_given_and_reads_back_the_same(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """201 with the agent's fields; the name is trimmed and the model name normalised."""
    account = await make_account()
    tools = [{"name": "read_file", "policy": "auto"}, {"name": "shell", "policy": "deny"}]
    agent = await create(
        client,
        account,
        {"name": "  Reviewer  ", "model": " DEMO ", "instructions": "Be terse.", "tools": tools},
    )
    assert set(agent) == AGENT_FIELDS
    assert uuid.UUID(agent["id"]).version == 7
    assert agent["name"] == "Reviewer"
    assert agent["model"] == "demo"
    assert agent["instructions"] == "Be terse."
    assert agent["tools"] == tools
    assert agent["is_default"] is False
    assert parse_time(agent["created_at"]) == parse_time(agent["updated_at"])
    assert await fetch(client, account, agent["id"]) == agent


async def test_what_is_left_out_comes_from_the_default_agent_and_settings(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """Only a name: the configured default model, the default instructions and tools."""
    account = await make_account()
    agent = await create(client, account, {"name": "plain"})
    assert agent["model"] == CONFIGURED_DEFAULT_MODEL
    assert agent["instructions"] == DEFAULT_AGENT_INSTRUCTIONS
    assert agent["tools"] == DEFAULT_TOOLS_JSON
    explicit_nulls = await create(
        client, account, {"name": "nulls", "model": None, "instructions": None, "tools": None}
    )
    assert explicit_nulls["model"] == CONFIGURED_DEFAULT_MODEL
    assert explicit_nulls["tools"] == DEFAULT_TOOLS_JSON


async def test_an_empty_tool_list_means_no_tools(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """tools: [] is kept as no tools at all, not replaced by the defaults."""
    account = await make_account()
    agent = await create(client, account, {"name": "talker", "tools": [], "instructions": ""})
    assert agent["tools"] == []
    assert agent["instructions"] == ""
    assert (await fetch(client, account, agent["id"]))["tools"] == []


async def test_the_default_agent_can_be_read(
    client: httpx.AsyncClient, make_account: MakeAccount, services: ServiceDeps
) -> None:
    """Any user reads the default agent: is_default, the configured model, the default tools."""
    account = await make_account()
    agent = await fetch(client, account, await default_agent_id(services))
    assert set(agent) == AGENT_FIELDS
    assert agent["is_default"] is True
    assert agent["model"] == CONFIGURED_DEFAULT_MODEL
    assert agent["tools"] == DEFAULT_TOOLS_JSON


# --- list -----------------------------------------------------------------------------------


async def test_the_list_holds_your_agents_and_the_default_agent_only(
    client: httpx.AsyncClient, make_account: MakeAccount, services: ServiceDeps
) -> None:
    """Newest first, the default agent (made at start-up) last; another user's never."""
    mine, theirs = await make_account(), await make_account()
    first = await create(client, mine, {"name": "first"})
    other = await create(client, theirs, {"name": "other"})
    second = await create(client, mine, {"name": "second"})
    default_id = await default_agent_id(services)

    response = await client.get("/api/v1/agents", headers=mine.headers)
    assert response.status_code == 200, response.text
    page = response.json()
    assert set(page) == {"items", "next_cursor"}
    assert page["next_cursor"] is None
    assert [item["id"] for item in page["items"]] == [second["id"], first["id"], default_id]
    assert page["items"][0] == second
    assert all(set(item) == AGENT_FIELDS for item in page["items"])
    assert await listed_ids(client, theirs) == [other["id"], default_id]
    newcomer = await make_account()
    assert await listed_ids(client, newcomer) == [default_id]


async def test_the_list_pages_through_every_agent_once(
    client: httpx.AsyncClient, make_account: MakeAccount, services: ServiceDeps
) -> None:
    """11 agents and the default read with limit=5 come as 5, 5, 2, each once, then null."""
    account = await make_account()
    created = [(await create(client, account, {"name": f"a{n}"}))["id"] for n in range(11)]
    pages: list[list[str]] = []
    params: dict[str, str | int] = {"limit": 5}
    while True:
        response = await client.get("/api/v1/agents", params=params, headers=account.headers)
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append([item["id"] for item in page["items"]])
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
        assert len(pages) < 10, "the cursor never ended"
    assert [len(page) for page in pages] == [5, 5, 2]
    seen = [agent_id for page in pages for agent_id in page]
    assert seen == [*reversed(created), await default_agent_id(services)]


@pytest.mark.parametrize(
    "params",
    [{"cursor": "not a cursor!"}, {"cursor": "bm9wZQ"}, {"limit": 0}, {"limit": 101}],
)
async def test_bad_list_parameters_are_422(
    client: httpx.AsyncClient, make_account: MakeAccount, params: dict[str, Any]
) -> None:
    """A cursor that is not ours, or a limit out of 1..100, is 422 in the envelope."""
    account = await make_account()
    response = await client.get("/api/v1/agents", params=params, headers=account.headers)
    assert_error(response, 422, "invalid_input")


# --- edit -----------------------------------------------------------------------------------


async def test_patch_changes_what_is_given_and_keeps_the_rest(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """A new name leaves model, instructions and tools alone; a tool list replaces the old."""
    account = await make_account()
    agent = await create(
        client, account, {"name": "before", "model": "demo", "instructions": "Say little."}
    )
    url = f"/api/v1/agents/{agent['id']}"
    renamed = await client.patch(url, json={"name": " after "}, headers=account.headers)
    assert renamed.status_code == 200, renamed.text
    body = renamed.json()
    assert body["name"] == "after"
    unchanged = ("id", "model", "instructions", "tools", "is_default", "created_at")
    assert {key: body[key] for key in unchanged} == {key: agent[key] for key in unchanged}
    assert parse_time(body["updated_at"]) >= parse_time(agent["updated_at"])

    new_tools = [{"name": "write_file", "policy": "auto"}]
    retooled = await client.patch(
        url,
        json={"tools": new_tools, "model": "openai:gpt-4o", "instructions": ""},
        headers=account.headers,
    )
    assert retooled.status_code == 200, retooled.text
    assert retooled.json()["tools"] == new_tools
    assert retooled.json()["model"] == "openai:gpt-4o"
    assert retooled.json()["instructions"] == ""
    assert retooled.json()["name"] == "after"
    assert await fetch(client, account, agent["id"]) == retooled.json()


async def test_patch_with_nothing_to_change_is_422(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """{} and all-null bodies are 422 and change nothing."""
    account = await make_account()
    agent = await create(client, account, {"name": "same"})
    for body in ({}, {"name": None, "tools": None}):
        response = await client.patch(
            f"/api/v1/agents/{agent['id']}", json=body, headers=account.headers
        )
        error = assert_error(response, 422, "invalid_input")
        assert "at least one" in error["message"]
    assert await fetch(client, account, agent["id"]) == agent


# --- delete ---------------------------------------------------------------------------------


async def test_delete_removes_the_agent(
    client: httpx.AsyncClient, make_account: MakeAccount, services: ServiceDeps
) -> None:
    """204; then it is gone from reads, lists and new sessions, and a second delete is 404."""
    account = await make_account()
    kept = await create(client, account, {"name": "kept"})
    doomed = await create(client, account, {"name": "doomed"})
    url = f"/api/v1/agents/{doomed['id']}"
    response = await client.delete(url, headers=account.headers)
    assert response.status_code == 204, response.text
    assert response.content == b""
    assert_error(await client.get(url, headers=account.headers), 404, "not_found")
    assert_error(await client.delete(url, headers=account.headers), 404, "not_found")
    assert await listed_ids(client, account) == [kept["id"], await default_agent_id(services)]
    session = await client.post(
        "/api/v1/sessions", json={"agent_id": doomed["id"]}, headers=account.headers
    )
    assert_error(session, 404, "not_found")


async def test_deleting_an_agent_that_sessions_use_is_409_and_changes_nothing(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """409 naming the sessions while any (archived too) uses it; once they are gone, 204."""
    account = await make_account()
    agent = await create(client, account, {"name": "busy"})
    session_ids = []
    for title in ("one", "two"):
        made = await client.post(
            "/api/v1/sessions",
            json={"agent_id": agent["id"], "title": title},
            headers=account.headers,
        )
        assert made.status_code == 201, made.text
        session_ids.append(made.json()["id"])
    archived = await client.patch(
        f"/api/v1/sessions/{session_ids[1]}", json={"status": "archived"}, headers=account.headers
    )
    assert archived.status_code == 200, archived.text
    url = f"/api/v1/agents/{agent['id']}"

    error = assert_error(await client.delete(url, headers=account.headers), 409, "conflict")
    assert "used by 2 sessions" in error["message"]
    assert error["detail"] == {"agent_id": agent["id"], "sessions": 2}
    assert await fetch(client, account, agent["id"]) == agent
    for session_id in session_ids:
        still = await client.get(f"/api/v1/sessions/{session_id}", headers=account.headers)
        assert still.status_code == 200, still.text

    deleted = await client.delete(f"/api/v1/sessions/{session_ids[0]}", headers=account.headers)
    assert deleted.status_code == 204
    error = assert_error(await client.delete(url, headers=account.headers), 409, "conflict")
    assert "used by 1 session;" in error["message"]
    deleted = await client.delete(f"/api/v1/sessions/{session_ids[1]}", headers=account.headers)
    assert deleted.status_code == 204
    assert (await client.delete(url, headers=account.headers)).status_code == 204


async def test_the_foreign_key_refusal_is_a_conflict_too(
    client: httpx.AsyncClient, make_account: MakeAccount, services: ServiceDeps
) -> None:
    """A session made between the check and the delete: the RESTRICT foreign key says no, and
    the repository turns that into Conflict (not a driver error), leaving both rows in place."""
    account = await make_account()
    agent = await create(client, account, {"name": "raced"})
    made = await client.post(
        "/api/v1/sessions", json={"agent_id": agent["id"]}, headers=account.headers
    )
    assert made.status_code == 201, made.text
    agent_id = AgentId(uuid.UUID(agent["id"]))
    with pytest.raises(Conflict, match="used by sessions"):
        async with services.uow_factory() as uow:
            await uow.agents.delete_owned(agent_id, owner=account.user.id)
    assert await fetch(client, account, agent["id"]) == agent
    session = await client.get(f"/api/v1/sessions/{made.json()['id']}", headers=account.headers)
    assert session.status_code == 200, session.text


# --- who may do what ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "body"),
    [("GET", None), ("PATCH", {"name": "mine now"}), ("DELETE", None)],
)
async def test_another_users_agent_answers_like_a_missing_one(
    client: httpx.AsyncClient, make_account: MakeAccount, method: str, body: dict[str, Any] | None
) -> None:
    """404 with the very same body as an id nobody has; the owner's agent is untouched."""
    owner, stranger = await make_account(), await make_account()
    agent = await create(client, owner, {"name": "private"})
    theirs = await client.request(
        method, f"/api/v1/agents/{agent['id']}", json=body, headers=stranger.headers
    )
    missing = await client.request(
        method, f"/api/v1/agents/{MISSING_ID}", json=body, headers=stranger.headers
    )
    error = assert_error(theirs, 404, "not_found")
    assert error["message"] == "agent not found"
    assert theirs.content == missing.content
    assert await fetch(client, owner, agent["id"]) == agent


async def test_another_users_agent_cannot_drive_a_session(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """POST /sessions with someone else's agent is 404, like a missing agent."""
    owner, stranger = await make_account(), await make_account()
    agent = await create(client, owner, {"name": "private"})
    response = await client.post(
        "/api/v1/sessions", json={"agent_id": agent["id"]}, headers=stranger.headers
    )
    assert_error(response, 404, "not_found")


async def test_the_default_agent_is_read_only(
    client: httpx.AsyncClient, make_account: MakeAccount, services: ServiceDeps
) -> None:
    """PATCH and DELETE of the default agent are 409 saying the server manages it."""
    account = await make_account()
    default_id = await default_agent_id(services)
    before = await fetch(client, account, default_id)
    url = f"/api/v1/agents/{default_id}"
    for method, body in (("PATCH", {"tools": []}), ("DELETE", None)):
        response = await client.request(method, url, json=body, headers=account.headers)
        error = assert_error(response, 409, "conflict")
        assert "default agent is managed by the server" in error["message"]
        assert error["detail"] == {"agent_id": default_id}
    assert await fetch(client, account, default_id) == before


# --- refused input --------------------------------------------------------------------------

INVALID_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown tool", {"name": "x", "tools": [{"name": "rm_rf", "policy": "auto"}]}, "rm_rf"),
    ("bad policy", {"name": "x", "tools": [{"name": "shell", "policy": "maybe"}]}, "tools.0"),
    ("policy missing", {"name": "x", "tools": [{"name": "shell"}]}, "tools.0.policy"),
    (
        "duplicate tool",
        {
            "name": "x",
            "tools": [{"name": "shell", "policy": "ask"}, {"name": "shell", "policy": "deny"}],
        },
        "more than once",
    ),
    ("bad model", {"name": "x", "model": "gpt 4"}, "model name"),
    ("unknown provider", {"name": "x", "model": "mistral:mistral-large"}, "anthropic:"),
    ("provider without its key", {"name": "x", "model": "anthropic:claude"}, "API key"),
    ("unknown field", {"name": "x", "temperature": 0.2}, "temperature"),
    (
        "unknown tool field",
        {"name": "x", "tools": [{"name": "shell", "policy": "ask", "x": 1}]},
        "tools.0.x",
    ),
    ("no name", {"model": "demo"}, "name"),
    ("empty name", {"name": ""}, "name"),
    ("blank name", {"name": "   "}, "name"),
    ("long name", {"name": "n" * 101}, "name"),
    ("NUL in name", {"name": "a\x00b"}, "NUL"),
    ("long instructions", {"name": "x", "instructions": "i" * 20_001}, "instructions"),
    ("tools not a list", {"name": "x", "tools": "shell"}, "tools"),
    ("name not text", {"name": 5}, "name"),
]


@pytest.mark.parametrize(
    ("body", "expected"),
    [pytest.param(body, expected, id=case) for case, body, expected in INVALID_BODIES],
)
async def test_invalid_agents_are_422_and_nothing_is_made(
    client: httpx.AsyncClient,
    make_account: MakeAccount,
    services: ServiceDeps,
    body: dict[str, Any],
    expected: str,
) -> None:
    """Each bad body is 422 in the envelope, its message says what is wrong, nothing is stored."""
    account = await make_account()
    response = await client.post("/api/v1/agents", json=body, headers=account.headers)
    error = assert_error(response, 422, "invalid_input")
    assert expected in f"{error['message']} {error['detail']}", error
    assert await listed_ids(client, account) == [await default_agent_id(services)]


async def test_the_limits_themselves_are_accepted(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """A 100-character name and 20,000 characters of instructions are fine (the 422s are not
    off by one)."""
    account = await make_account()
    agent = await create(client, account, {"name": "é" * 100, "instructions": "i" * 20_000})
    assert agent["name"] == "é" * 100
    assert len((await fetch(client, account, agent["id"]))["instructions"]) == 20_000


async def test_an_unknown_tool_message_names_the_built_in_tools(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """The 422 for an unknown tool lists what there is to choose from."""
    account = await make_account()
    response = await client.post(
        "/api/v1/agents",
        json={"name": "x", "tools": [{"name": "browser", "policy": "ask"}]},
        headers=account.headers,
    )
    error = assert_error(response, 422, "invalid_input")
    assert error["message"] == (
        "unknown tool: browser; built-in tools are list_files, read_file, shell, write_file"
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"tools": [{"name": "nope", "policy": "ask"}]}, "unknown tool: nope"),
        ({"tools": [{"name": "shell", "policy": "never"}]}, "tools.0"),
        (
            {"tools": [{"name": "shell", "policy": "ask"}, {"name": "shell", "policy": "ask"}]},
            "more than once",
        ),
        ({"model": "openai:"}, "model name"),
        ({"name": "  "}, "name"),
        ({"instructions": "i" * 20_001}, "instructions"),
        ({"is_default": True}, "is_default"),
    ],
)
async def test_invalid_patches_are_422_and_change_nothing(
    client: httpx.AsyncClient, make_account: MakeAccount, body: dict[str, Any], expected: str
) -> None:
    """The same rules hold for PATCH; the agent is left as it was."""
    account = await make_account()
    agent = await create(client, account, {"name": "steady"})
    response = await client.patch(
        f"/api/v1/agents/{agent['id']}", json=body, headers=account.headers
    )
    error = assert_error(response, 422, "invalid_input")
    assert expected in f"{error['message']} {error['detail']}", error
    assert await fetch(client, account, agent["id"]) == agent


# --- idempotency ----------------------------------------------------------------------------


async def test_a_retried_create_with_the_same_key_returns_the_first_agent(
    client: httpx.AsyncClient, make_account: MakeAccount, services: ServiceDeps
) -> None:
    """Same key and body: the same status and bytes, and one agent; another body is 422."""
    account = await make_account()
    headers = {**account.headers, "Idempotency-Key": "make-agent-1"}
    body = {"name": "once", "tools": [{"name": "shell", "policy": "deny"}]}
    first = await client.post("/api/v1/agents", json=body, headers=headers)
    again = await client.post("/api/v1/agents", json=body, headers=headers)
    assert first.status_code == again.status_code == 201, again.text
    assert again.content == first.content
    default_id = await default_agent_id(services)
    assert await listed_ids(client, account) == [first.json()["id"], default_id]

    other = await client.post("/api/v1/agents", json={"name": "twice"}, headers=headers)
    assert_error(other, 422, "idempotency_key_reused")
    assert await listed_ids(client, account) == [first.json()["id"], default_id]

    # The key is the user's own: someone else with the same key makes their own agent.
    stranger = await make_account()
    theirs = await client.post(
        "/api/v1/agents", json=body, headers={**stranger.headers, "Idempotency-Key": "make-agent-1"}
    )
    assert theirs.status_code == 201, theirs.text
    assert theirs.json()["id"] != first.json()["id"]


async def test_agent_and_session_keys_do_not_collide(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """One key used on POST /sessions and POST /agents makes one of each."""
    account = await make_account()
    headers = {**account.headers, "Idempotency-Key": "shared-key"}
    session = await client.post("/api/v1/sessions", json={}, headers=headers)
    assert session.status_code == 201, session.text
    agent = await client.post("/api/v1/agents", json={"name": "a"}, headers=headers)
    assert agent.status_code == 201, agent.text
    assert set(agent.json()) == AGENT_FIELDS


# --- agents drive runs ----------------------------------------------------------------------


async def session_with_tools(
    client: httpx.AsyncClient, account: Account, tools: list[dict[str, str]]
) -> str:
    """A new session driven by a new demo agent with these tools."""
    agent = await create(client, account, {"name": "worker", "model": "demo", "tools": tools})
    response = await client.post(
        "/api/v1/sessions", json={"agent_id": agent["id"]}, headers=account.headers
    )
    assert response.status_code == 201, response.text
    assert response.json()["agent_id"] == agent["id"]
    session_id: str = response.json()["id"]
    return session_id


async def run_to_the_end(
    client: httpx.AsyncClient, account: Account, session_id: str, content: str
) -> list[Sse]:
    """Send a message and read the run's events until its stream ends."""
    run_id = (await send(client, account, session_id, content))["run"]["id"]
    log = await events(client, account, session_id, run_id)
    assert log, "the run produced no events"
    return log


async def test_a_tool_with_policy_auto_runs_without_an_approval(
    client: httpx.AsyncClient, make_account: MakeAccount, settings: Settings
) -> None:
    """write_file set to auto: the call runs at once, the file is written, the run succeeds."""
    account = await make_account()
    session_id = await session_with_tools(
        client, account, [{"name": "write_file", "policy": "auto"}]
    )
    log = await run_to_the_end(
        client, account, session_id, '/tool write_file {"path": "out/a.txt", "content": "auto"}'
    )
    names = [event.event for event in log]
    assert "approval.required" not in names
    assert names[-1] == "run.finished"
    assert "tool.call" in names
    result = next(event for event in log if event.event == "tool.result").data
    assert result["tool"] == "write_file"
    assert (Path(settings.workspace_root) / session_id / "out" / "a.txt").read_text() == "auto"
    pending = await client.get(
        f"/api/v1/sessions/{session_id}/pending-approvals", headers=account.headers
    )
    assert pending.json() == {"items": [], "next_cursor": None}
    reply = (await messages_of(client, account, session_id))[-1]
    assert reply["role"] == "assistant"
    assert reply["content"] == result["output"]


async def test_a_tool_with_policy_deny_is_refused_and_writes_nothing(
    client: httpx.AsyncClient, make_account: MakeAccount, settings: Settings
) -> None:
    """write_file set to deny: no approval, no file; the model is told the policy refused it."""
    account = await make_account()
    session_id = await session_with_tools(
        client, account, [{"name": "write_file", "policy": "deny"}]
    )
    log = await run_to_the_end(
        client, account, session_id, '/tool write_file {"path": "b.txt", "content": "no"}'
    )
    names = [event.event for event in log]
    assert "approval.required" not in names
    assert names[-1] == "run.finished"
    result = next(event for event in log if event.event == "tool.result").data
    assert "not allowed" in result["output"]
    workspace = Path(settings.workspace_root) / session_id
    assert not (workspace / "b.txt").exists()


async def test_a_tool_with_policy_ask_still_waits_for_a_person(
    client: httpx.AsyncClient, make_account: MakeAccount, settings: Settings
) -> None:
    """The same agent with write_file on ask stops at approval.required, file unwritten."""
    account = await make_account()
    session_id = await session_with_tools(
        client, account, [{"name": "write_file", "policy": "ask"}]
    )
    log = await run_to_the_end(
        client, account, session_id, '/tool write_file {"path": "c.txt", "content": "wait"}'
    )
    assert log[-1].event == "approval.required"
    assert not (Path(settings.workspace_root) / session_id / "c.txt").exists()


# --- the service boundary -------------------------------------------------------------------


async def test_no_row_is_alive_after_an_agent_service_call(services: ServiceDeps) -> None:
    """Invariant 1 for agents: every agent service returns plain values, no *Row survives."""
    user = await create_user(services, email="agents-gc@example.test", password="long enough pw")
    assert alive_rows() == []
    tools = [ToolSetting("shell", ToolPolicy.DENY)]
    agent = await agent_service.create_agent(services, actor=user.id, name="gc", tools=tools)
    assert alive_rows() == []
    page = await agent_service.list_agents(services, actor=user.id, cursor=None, limit=5)
    assert [item.is_default for item in page.items] == [False, True]
    assert page.items[0] == agent
    assert alive_rows() == []
    assert await agent_service.get_agent(services, actor=user.id, agent_id=agent.id) == agent
    assert alive_rows() == []
    edited = await agent_service.update_agent(
        services, actor=user.id, agent_id=agent.id, name="gc2"
    )
    assert edited.name == "gc2"
    assert alive_rows() == []
    await agent_service.delete_agent(services, actor=user.id, agent_id=agent.id)
    assert alive_rows() == []
