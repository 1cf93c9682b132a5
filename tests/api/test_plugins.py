"""Tool plugins through the API, on both databases: a plugin named in the settings gives its
tools (listed by `GET /tools`, usable by an agent under its policy, rules and approvals, its
arguments checked against its own schema); one installed but not named gives nothing; a
plugin tool that fails gives the model its error as the tool's output."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.api.test_runs import Sse, events, send
from tests.api.test_tool_rules import make_agent, session_with
from tests.conftest import Account
from tests.services.test_runs import running_app
from tests.support.databases import TestDatabase
from tests.support.plugins import plugin_folder

API = "/api/v1"


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test plugins, installed for this process (their folder on sys.path)."""
    folder = plugin_folder(tmp_path / "site")
    monkeypatch.syspath_prepend(str(folder))
    return folder


async def run_tool(
    client: httpx.AsyncClient, account: Account, session_id: str, command: str
) -> list[Sse]:
    started = await send(client, account, session_id, command)
    return await events(client, account, session_id, started["run"]["id"])


async def test_a_named_plugin_gives_its_tools_and_an_unnamed_one_nothing(
    database: TestDatabase, tmp_path: Path, installed: Path
) -> None:
    async with running_app(database, tmp_path, plugins=["greeter"]) as harness:
        client, account = harness.client, harness.account
        listed = (await client.get(f"{API}/tools", headers=account.headers)).json()["items"]
        tools = {tool["name"]: tool for tool in listed}
        assert {"greet", "explode", "leave", "careful"} <= set(tools)
        assert "hidden" not in tools  # the unnamed plugin's
        greet = tools["greet"]
        assert (greet["source"], greet["server"], greet["default_policy"]) == (
            "plugin",
            None,
            "ask",
        )
        assert greet["description"] == "Greet someone by name."
        assert greet["parameters"]["properties"]["name"]["type"] == "string"

        agent = await make_agent(
            client,
            account,
            [{"name": "greet", "policy": "auto"}, {"name": "explode", "policy": "auto"}],
        )
        assert agent.status_code == 201, agent.text
        session_id = await session_with(client, account, agent.json()["id"])
        ran = await run_tool(client, account, session_id, '/tool greet {"name": "Ada"}')
        result = next(event for event in ran if event.event == "tool.result")
        assert result.data["output"] == "hello Ada"
        assert ran[-1].event == "run.finished"

        failed = await run_tool(client, account, session_id, '/tool explode {"reason": "test"}')
        output = next(e for e in failed if e.event == "tool.result").data["output"]
        assert output == "the tool explode failed: RuntimeError: boom: test"
        assert failed[-1].event == "run.finished"

        # A plugin tool that ends the process (sys.exit) ends neither the run nor the server.
        agent = await make_agent(
            client,
            account,
            [{"name": "leave", "policy": "auto"}, {"name": "careful", "policy": "auto"}],
        )
        session_id = await session_with(client, account, agent.json()["id"])
        left = await run_tool(client, account, session_id, "/tool leave {}")
        output = next(e for e in left if e.event == "tool.result").data["output"]
        assert output == "the tool leave failed: SystemExit: 3"
        assert left[-1].event == "run.finished"
        # A plugin tool that requires approval asks, though the agent says auto.
        asked = await run_tool(client, account, session_id, '/tool careful {"what": "x"}')
        assert asked[-1].event == "approval.required"

        unknown = await make_agent(client, account, [{"name": "hidden", "policy": "auto"}])
        assert unknown.status_code == 422
        assert "unknown tool: hidden" in unknown.json()["error"]["message"]


async def test_a_plugin_tool_waits_for_approval_and_its_edits_meet_its_schema(
    database: TestDatabase, tmp_path: Path, installed: Path
) -> None:
    async with running_app(database, tmp_path, plugins=["greeter"]) as harness:
        client, account = harness.client, harness.account
        rules = [{"when": {"name": {"equals": "Ada"}}, "policy": "auto"}]
        agent = await make_agent(
            client, account, [{"name": "greet", "policy": "ask", "rules": rules}]
        )
        assert agent.status_code == 201, agent.text
        session_id = await session_with(client, account, agent.json()["id"])

        ran = await run_tool(client, account, session_id, '/tool greet {"name": "Ada"}')
        assert ran[-1].event == "run.finished"

        waiting = await run_tool(client, account, session_id, '/tool greet {"name": "Bob"}')
        required = waiting[-1]
        assert required.event == "approval.required"
        assert required.data["asked_because"] == "policy ask"
        url = f"{API}/sessions/{session_id}/approvals/{required.data['approval_id']}"
        bad = await client.post(
            url,
            json={"decision": "approve", "arguments": {"name": "Bob", "excited": "very"}},
            headers=account.headers,
        )
        assert bad.status_code == 422
        assert "excited" in bad.json()["error"]["message"]
        good = await client.post(
            url,
            json={"decision": "approve", "arguments": {"name": "Bob", "excited": True}},
            headers=account.headers,
        )
        assert good.status_code == 200, good.text
        run_id = required.data["run_id"]
        rest = await events(client, account, session_id, run_id, after=required.id)
        result = next(event for event in rest if event.event == "tool.result")
        assert result.data["output"] == "hello Bob!"
