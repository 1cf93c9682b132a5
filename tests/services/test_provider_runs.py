"""Runs on ``anthropic:MODEL`` and ``google:MODEL`` end to end through the real app.

The same harness as ``tests.services.test_runs`` (the real application with its lifespan,
executor and migrated database, driven over its HTTP API), with the default agent on a provider
whose API is faked by ``tests.support.fake_providers`` on 127.0.0.1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.test_errors import assert_error
from tests.api.test_runs import events, messages_of, new_session, run_of, send
from tests.services.test_runs import (
    API_KEY,
    PROVIDER_FAILURES,
    assert_fails_clearly,
    deltas_of,
    running_app,
)
from tests.support.databases import TestDatabase
from tests.support.fake_openai import FakeServer
from tests.support.fake_providers import FakeAnthropic, FakeGoogle, text, tool_call

MODEL = "test-model"
FAKES: dict[str, type[FakeServer]] = {"anthropic": FakeAnthropic, "google": FakeGoogle}


each_provider = pytest.mark.parametrize("provider", sorted(FAKES))
"""Parametrised by mark, not by fixture, so that test ids start with the backend ([sqlite-...]),
which the per-backend summary of the test run counts by."""


@pytest.fixture
def server(provider: str) -> Iterator[FakeServer]:
    with FAKES[provider]() as fake:
        yield fake


def provider_settings(provider: str, server: FakeServer, **overrides: Any) -> dict[str, Any]:
    """Settings overrides for an app whose default agent talks to the provider's fake."""
    values: dict[str, Any] = {
        "default_model": f"{provider}:{MODEL}",
        f"{provider}_base_url": server.base_url,
        f"{provider}_api_key": API_KEY,
        "model_timeout_seconds": 10,
    }
    values.update(overrides)
    return values


def sent_key(provider: str, headers: dict[str, str]) -> str | None:
    if provider == "google":
        return headers.get("x-goog-api-key")
    # The Anthropic SDK sends ``x-api-key`` or a Bearer token, depending on its version.
    return headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")


@each_provider
async def test_a_streamed_text_reply_arrives_as_deltas_and_is_stored(
    database: TestDatabase, tmp_path: Path, provider: str, server: FakeServer
) -> None:
    server.script(text("Hello", " from", " the fake."))
    async with running_app(database, tmp_path, **provider_settings(provider, server)) as harness:
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
    assert sent_key(provider, request.headers) == API_KEY
    if provider == "anthropic":
        assert request.path == "/v1/messages"
        assert request.body["stream"] is True
        assert request.body["model"] == MODEL
    else:
        assert request.path == f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"


@each_provider
async def test_an_auto_tool_call_runs_and_the_answer_after_its_result_is_stored(
    database: TestDatabase, tmp_path: Path, provider: str, server: FakeServer
) -> None:
    server.script(
        tool_call("list_files", {"path": "."}, call_id="call_list_1", fragment_size=3),
        text("There are ", "two files."),
    )
    async with running_app(database, tmp_path, **provider_settings(provider, server)) as harness:
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
        assert (call["tool"], call["arguments"]) == ("list_files", {"path": "."})
        assert (result["tool"], result["output"]) == ("list_files", "a.txt\ndocs/")
        assert names.index("tool.call") < names.index("tool.result") < names.index("text.delta")
        assert "".join(deltas_of(log)) == "There are two files."
        stored = await messages_of(client, account, session_id)
        assert (stored[-1]["role"], stored[-1]["content"]) == ("assistant", "There are two files.")

    first, second = server.requests
    if provider == "anthropic":
        assert "list_files" in {tool["name"] for tool in first.body["tools"]}
        [block] = second.body["messages"][-1]["content"]
        assert block["type"] == "tool_result"
        assert block["tool_use_id"] == "call_list_1"
        returned = json.dumps(block["content"])
    else:
        declared = {d["name"] for t in first.body["tools"] for d in t["functionDeclarations"]}
        assert "list_files" in declared
        [part] = second.body["contents"][-1]["parts"]
        assert part["functionResponse"]["id"] == "call_list_1"
        assert part["functionResponse"]["name"] == "list_files"
        returned = json.dumps(part["functionResponse"]["response"])
    assert "a.txt" in returned
    assert "docs/" in returned


@each_provider
async def test_provider_failures_fail_the_run_with_a_clear_reason_without_the_key(
    database: TestDatabase, tmp_path: Path, provider: str, server: FakeServer
) -> None:
    """401, 429, 500 (echoing the key) and a timeout each fail their run in one sentence;
    the session is free again each time, and a next message with a good answer succeeds."""
    server.script(*(failure.reply for failure in PROVIDER_FAILURES.values()))
    server.script(text("Back", " again."))
    overrides = provider_settings(provider, server, model_timeout_seconds=0.5)
    async with running_app(database, tmp_path, **overrides) as harness:
        client, account = harness.client, harness.account
        session_id = await new_session(client, account)
        reasons = {
            what: await assert_fails_clearly(harness, session_id, words=failure.words, what=what)
            for what, failure in PROVIDER_FAILURES.items()
        }
        assert reasons["401"] == "the model provider refused the API key (HTTP 401)"
        assert reasons["timeout"] == "the model provider did not answer within 0.5 s"
        assert "[redacted]" in reasons["500"]

        next_run = (await send(client, account, session_id, "again"))["run"]["id"]
        next_log = await events(client, account, session_id, next_run)
        assert next_log[-1].event == "run.finished"
        assert "".join(deltas_of(next_log)) == "Back again."

    # One request per message: a failed model call is not retried behind the scenes.
    assert len(server.requests) == len(PROVIDER_FAILURES) + 1
    assert all(sent_key(provider, r.headers) == API_KEY for r in server.requests)


async def test_an_agent_on_a_provider_without_its_key_is_422_and_nothing_changes(
    database: TestDatabase, tmp_path: Path
) -> None:
    """Only the Anthropic key is set: an Anthropic agent is made (its name normalised), a Google
    one is refused at creation and at update with one sentence naming the setting."""
    async with running_app(database, tmp_path, anthropic_api_key=API_KEY) as harness:
        client, headers = harness.client, harness.account.headers
        made = await client.post(
            "/api/v1/agents",
            json={"name": "claude", "model": " Anthropic:claude-sonnet-4-5 "},
            headers=headers,
        )
        assert made.status_code == 201, made.text
        agent = made.json()
        assert agent["model"] == "anthropic:claude-sonnet-4-5"

        refused = await client.post(
            "/api/v1/agents",
            json={"name": "gemini", "model": "google:gemini-2.5-flash"},
            headers=headers,
        )
        error = assert_error(refused, 422, "invalid_input")
        assert error["message"] == (
            "The model 'google:gemini-2.5-flash' needs a Google API key: set "
            "COUNTERSIGN_GOOGLE_API_KEY."
        )

        patched = await client.patch(
            f"/api/v1/agents/{agent['id']}",
            json={"model": "google:gemini-2.5-flash", "name": "renamed"},
            headers=headers,
        )
        error = assert_error(patched, 422, "invalid_input")
        assert "COUNTERSIGN_GOOGLE_API_KEY" in error["message"]
        unchanged = await client.get(f"/api/v1/agents/{agent['id']}", headers=headers)
        assert unchanged.json() == agent

        listed = await client.get("/api/v1/agents", headers=headers)
        assert "gemini" not in {item["name"] for item in listed.json()["items"]}
