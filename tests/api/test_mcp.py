"""Tools from MCP servers through the API, on both databases, against a real MCP server (the
MCP SDK's own, in a process of its own: stdio, or streamable HTTP with a bearer token).

Their tools are listed by ``GET /tools`` as ``NAME_TOOL``, run under the agent's policy, rules
and approvals (edited arguments are checked against the tool's own JSON schema), share one
connection per server, and never take a turn down: a tool's error, a call past its time limit
and a server that is down are each the tool's output. A server that comes back is connected
again without a restart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.api.test_runs import Sse, events, send
from tests.api.test_tool_rules import make_agent, session_with
from tests.conftest import Account
from tests.services.test_runs import FAKE_MODEL, fake_model_settings, running_app
from tests.support.databases import TestDatabase
from tests.support.fake_openai import FakeOpenAI, text, tool_call
from tests.support.mcp_server import McpHttpServer, free_port, stdio_settings

API = "/api/v1"
WAIT = 40.0
T = TypeVar("T")


async def run_tool(
    client: httpx.AsyncClient, account: Account, session_id: str, command: str
) -> list[Sse]:
    started = await send(client, account, session_id, command)
    return await events(client, account, session_id, started["run"]["id"])


def output_of(ran: list[Sse]) -> str:
    result = next(event for event in ran if event.event == "tool.result")
    output: str = result.data["output"]
    return output


async def listed_tools(client: httpx.AsyncClient, account: Account) -> dict[str, Any]:
    answer = await client.get(f"{API}/tools", headers=account.headers)
    assert answer.status_code == 200, answer.text
    return {tool["name"]: tool for tool in answer.json()["items"]}


async def eventually(check: Callable[[], Awaitable[T | None]], what: str) -> T:
    deadline = time.monotonic() + WAIT
    while True:
        found = await check()
        if found is not None:
            return found
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.2)


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the Prometheus text, or None when it is not there."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


async def test_mcp_tools_are_listed_named_by_server_and_run_under_the_agents_policy(
    database: TestDatabase, tmp_path: Path
) -> None:
    servers = {"t": stdio_settings(), "list": stdio_settings()}
    async with running_app(database, tmp_path, mcp_servers=servers) as harness:
        client, account = harness.client, harness.account
        tools = await listed_tools(client, account)
        add = tools["t_add"]
        assert (add["source"], add["server"], add["default_policy"]) == ("mcp", "t", "ask")
        assert add["description"] == "Add two whole numbers."
        assert add["parameters"]["properties"]["a"]["type"] == "integer"
        # "list" + "files" would be the built-in list_files: that tool is left out.
        assert tools["list_files"]["source"] == "builtin"
        assert "list_echo" in tools

        agent = await make_agent(
            client,
            account,
            [
                {"name": "t_add", "policy": "auto"},
                {"name": "t_fail", "policy": "auto"},
                {"name": "t_environment", "policy": "auto"},
                {"name": "t_pid", "policy": "auto"},
            ],
        )
        assert agent.status_code == 201, agent.text
        session_id = await session_with(client, account, agent.json()["id"])

        ran = await run_tool(client, account, session_id, '/tool t_add {"a": 2, "b": 40}')
        call = next(event for event in ran if event.event == "tool.call")
        assert (call.data["tool"], call.data["arguments"]) == ("t_add", {"a": 2, "b": 40})
        assert output_of(ran) == "42"
        assert ran[-1].event == "run.finished"

        failed = await run_tool(client, account, session_id, '/tool t_fail {"message": "no"}')
        assert output_of(failed) == "The tool t_fail failed: Error executing tool fail: no"
        assert failed[-1].event == "run.finished"

        # The model's arguments are checked against the tool's schema before anything runs:
        # it is asked to correct them, and the server is never called with them.
        wrong = await run_tool(client, account, session_id, '/tool t_add {"a": "x", "b": 1}')
        assert "tool.call" not in [event.event for event in wrong]
        assert wrong[-1].event == "run.finished"
        # (the demo model answers a retry prompt with its text)
        completed = next(event for event in wrong if event.event == "message.completed")
        assert completed.data["content"] == (
            "invalid arguments for tool t_add: a: 'x' is not of type 'integer'"
        )

        # The server's process does not see the server's own environment (its secrets).
        names = output_of(await run_tool(client, account, session_id, "/tool t_environment {}"))
        assert not [name for name in names.split(",") if name.startswith("COUNTERSIGN")]

        # One connection (one process) serves every run.
        sessions = [await session_with(client, account, agent.json()["id"]) for _ in range(4)]
        pids = await asyncio.gather(
            *(run_tool(client, account, other, "/tool t_pid {}") for other in sessions)
        )
        assert len({output_of(ran) for ran in pids}) == 1

        unknown = await make_agent(client, account, [{"name": "t_nothing", "policy": "auto"}])
        assert unknown.status_code == 422
        assert "unknown tool: t_nothing" in unknown.json()["error"]["message"]

        samples = (await client.get("/metrics")).text
        assert metric(samples, "countersign_mcp_up", server="t") == 1.0
        assert metric(samples, "countersign_mcp_calls_total", server="t", outcome="ok") == 6.0
        assert metric(samples, "countersign_mcp_calls_total", server="t", outcome="error") == 1.0
        count = metric(samples, "countersign_mcp_call_duration_seconds_count", server="t")
        assert count == 7.0


async def test_an_mcp_call_waits_for_approval_and_edited_arguments_meet_the_tools_schema(
    database: TestDatabase, tmp_path: Path
) -> None:
    async with running_app(database, tmp_path, mcp_servers={"t": stdio_settings()}) as harness:
        client, account = harness.client, harness.account
        rules = [{"when": {"text": {"prefix": "safe "}}, "policy": "auto"}]
        agent = await make_agent(
            client, account, [{"name": "t_echo", "policy": "ask", "rules": rules}]
        )
        assert agent.status_code == 201, agent.text
        bad_rule = await make_agent(
            client,
            account,
            [{"name": "t_echo", "policy": "ask", "rules": [{"when": {"nope": {"equals": "x"}}}]}],
        )
        assert bad_rule.status_code == 422
        session_id = await session_with(client, account, agent.json()["id"])

        ran = await run_tool(client, account, session_id, '/tool t_echo {"text": "safe hi"}')
        assert output_of(ran) == "safe hi"

        waiting = await run_tool(client, account, session_id, '/tool t_echo {"text": "risky"}')
        required = waiting[-1]
        assert required.event == "approval.required", waiting
        assert required.data["tool"] == "t_echo"
        assert required.data["arguments"] == {"text": "risky"}
        url = f"{API}/sessions/{session_id}/approvals/{required.data['approval_id']}"
        bad = await client.post(
            url,
            json={"decision": "approve", "arguments": {"text": 5}},
            headers=account.headers,
        )
        assert bad.status_code == 422, bad.text
        error = bad.json()["error"]
        assert (
            "invalid arguments for tool t_echo: text: 5 is not of type 'string'"
            in (error["message"])
        )
        assert error["detail"][0]["loc"] == ["text"]
        missing = await client.post(
            url, json={"decision": "approve", "arguments": {}}, headers=account.headers
        )
        assert missing.status_code == 422
        assert "'text' is a required property" in missing.json()["error"]["message"]

        good = await client.post(
            url,
            json={"decision": "approve", "arguments": {"text": "edited"}},
            headers=account.headers,
        )
        assert good.status_code == 200, good.text
        rest = await events(client, account, session_id, required.data["run_id"], after=required.id)
        assert output_of(rest) == "edited"
        assert rest[-1].event == "run.finished"


async def test_arguments_that_are_not_an_object_go_back_to_the_model_and_nothing_runs(
    database: TestDatabase, tmp_path: Path
) -> None:
    with FakeOpenAI() as model:
        model.script(tool_call("t_add", "[1, 2]"), text("sorry"))
        settings = fake_model_settings(model, mcp_servers={"t": stdio_settings()})
        async with running_app(database, tmp_path, **settings) as harness:
            client, account = harness.client, harness.account
            agent = await client.post(
                f"{API}/agents",
                json={
                    "name": "listy",
                    "model": FAKE_MODEL,
                    "tools": [{"name": "t_add", "policy": "auto"}],
                },
                headers=account.headers,
            )
            assert agent.status_code == 201, agent.text
            session_id = await session_with(client, account, agent.json()["id"])
            ran = await run_tool(client, account, session_id, "add one and two")
            assert [event.event for event in ran if event.event.startswith("tool.")] == []
            assert ran[-1].event == "run.finished"
            assert ran[-1].data["status"] == "succeeded"
    retry = model.requests[1].messages[-1]
    assert retry["role"] == "tool"
    assert "dict" in retry["content"] or "object" in retry["content"], retry


async def test_a_tool_past_its_time_limit_is_its_output_and_the_turn_goes_on(
    database: TestDatabase, tmp_path: Path
) -> None:
    servers = {"t": stdio_settings(timeout_seconds=0.5)}
    async with running_app(database, tmp_path, mcp_servers=servers) as harness:
        client, account = harness.client, harness.account
        agent = await make_agent(client, account, [{"name": "t_sleep", "policy": "auto"}])
        session_id = await session_with(client, account, agent.json()["id"])
        ran = await run_tool(client, account, session_id, '/tool t_sleep {"seconds": 5}')
        assert output_of(ran) == (
            "The tool t_sleep did not answer within 0.5 s; whether it took effect is unknown."
        )
        assert ran[-1].event == "run.finished"
        quick = await run_tool(client, account, session_id, '/tool t_sleep {"seconds": 0}')
        assert output_of(quick) == "slept 0 s"


async def test_a_server_down_at_start_is_connected_once_it_is_up_and_again_after_it_drops(
    database: TestDatabase, tmp_path: Path
) -> None:
    remote = McpHttpServer(token="s3cret-token", port=free_port())
    servers = {
        "web": {"url": remote.url, "headers": {"Authorization": "Bearer s3cret-token"}},
    }
    try:
        async with running_app(database, tmp_path, mcp_servers=servers) as harness:
            client, account = harness.client, harness.account
            # Down at start: the server serves anyway; the tools are not known yet.
            assert (await client.get("/health/ready")).status_code == 200
            assert "web_add" not in await listed_tools(client, account)
            refused = await make_agent(client, account, [{"name": "web_add", "policy": "auto"}])
            assert refused.status_code == 422
            assert "the MCP server web is not reachable now" in (refused.json()["error"]["message"])
            samples = (await client.get("/metrics")).text
            assert metric(samples, "countersign_mcp_up", server="web") == 0.0

            await asyncio.to_thread(remote.start)

            async def offered() -> dict[str, Any] | None:
                tools = await listed_tools(client, account)
                return tools if "web_add" in tools else None

            tools = await eventually(offered, "the MCP server's tools")
            assert tools["web_add"]["server"] == "web"
            agent = await make_agent(client, account, [{"name": "web_add", "policy": "auto"}])
            assert agent.status_code == 201, agent.text
            session_id = await session_with(client, account, agent.json()["id"])
            ran = await run_tool(client, account, session_id, '/tool web_add {"a": 1, "b": 2}')
            assert output_of(ran) == "3"

            # The server goes away: a call says so, and the turn still ends well.
            await asyncio.to_thread(remote.stop)
            down = await run_tool(client, account, session_id, '/tool web_add {"a": 1, "b": 2}')
            assert down[-1].event == "run.finished"
            assert "web" in output_of(down)
            assert "is not reachable" in output_of(down) or "broke off" in output_of(down), (
                output_of(down)
            )
            assert "s3cret-token" not in str(down)

            async def marked_down() -> bool | None:
                samples = (await client.get("/metrics")).text
                return True if metric(samples, "countersign_mcp_up", server="web") == 0 else None

            await eventually(marked_down, "countersign_mcp_up to be 0")
            after = await run_tool(client, account, session_id, '/tool web_add {"a": 1, "b": 2}')
            assert output_of(after).startswith("The MCP server web is not reachable (")
            assert output_of(after).endswith("so the tool web_add did not run.")

            # It comes back on the same address: connected again, no restart needed.
            await asyncio.to_thread(remote.start)

            async def answered() -> str | None:
                ran = await run_tool(client, account, session_id, '/tool web_add {"a": 2, "b": 2}')
                return output_of(ran) if output_of(ran) == "4" else None

            assert await eventually(answered, "a call after the server came back") == "4"
            samples = (await client.get("/metrics")).text
            assert metric(samples, "countersign_mcp_up", server="web") == 1.0
            unreachable = metric(
                samples, "countersign_mcp_calls_total", server="web", outcome="unreachable"
            )
            assert unreachable is not None
            assert unreachable >= 1
    finally:
        remote.stop()


async def test_an_agent_keeps_working_when_its_mcp_server_is_unreachable_at_start(
    database: TestDatabase, tmp_path: Path
) -> None:
    with McpHttpServer(token="right") as remote:
        good = {"web": {"url": remote.url, "headers": {"Authorization": "Bearer right"}}}
        async with running_app(database, tmp_path, mcp_servers=good) as harness:
            client, account = harness.client, harness.account
            denying = [{"when": {"text": {"prefix": "x"}}, "policy": "deny"}]
            agent = await make_agent(
                client,
                account,
                [
                    {"name": "web_add", "policy": "auto"},
                    {"name": "web_echo", "policy": "ask", "rules": denying},
                ],
            )
            assert agent.status_code == 201, agent.text
            session_id = await session_with(client, account, agent.json()["id"])
            ran = await run_tool(client, account, session_id, '/tool web_add {"a": 1, "b": 2}')
            assert output_of(ran) == "3"

        # The operator's token is wrong after a restart: the server starts and serves anyway.
        wrong = {"web": {"url": remote.url, "headers": {"Authorization": "Bearer wrong"}}}
        async with running_app(database, tmp_path, mcp_servers=wrong) as later:
            client = later.client
            assert (await client.get("/health/ready")).status_code == 200
            assert "web_add" not in await listed_tools(client, account)
            ran = await run_tool(client, account, session_id, '/tool web_add {"a": 1, "b": 2}')
            assert ran[-1].event == "run.finished"
            output = output_of(ran)
            assert output.startswith("The MCP server web is not reachable (")
            assert output.endswith("so the tool web_add did not run.")
            assert "wrong" not in output.replace("went wrong", "")
            # Its stand-in never asks a person about a call that cannot run, rules or not.
            for arguments in ('{"text": "xyz"}', '{"text": "abc"}'):
                ruled = await run_tool(client, account, session_id, f"/tool web_echo {arguments}")
                assert ruled[-1].event == "run.finished"
                assert output_of(ruled).endswith("so the tool web_echo did not run.")
