"""The MCP hub on its own, against the real test MCP server (stdio): names, clashes, the
schema check of arguments, a server that dies and comes back, and a missing extra."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from countersign.agent import mcp as mcp_module
from countersign.agent.mcp import McpHub, McpServerSpec, schema_error_details, schema_problems
from tests.support.mcp_server import McpHttpServer, free_port, stdio_settings

WAIT = 30.0


def stdio_spec(name: str, **extra: Any) -> McpServerSpec:
    settings = stdio_settings()
    return McpServerSpec(name, command=settings["command"], args=tuple(settings["args"]), **extra)


async def until(check: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.05)


def test_arguments_are_checked_against_the_json_schema_field_by_field() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["a"],
        "additionalProperties": False,
    }
    assert schema_problems(schema, {"a": 1, "tags": ["x"]}) == []
    assert schema_problems(schema, {"a": "1", "tags": ["x", 2]}) == [
        "a: '1' is not of type 'integer'",
        "tags.1: 2 is not of type 'string'",
    ]
    details = schema_error_details(schema, {"b": 1})
    assert sorted((d["type"], d["loc"]) for d in details) == [
        ("additionalProperties", []),
        ("required", []),
    ]
    # A server whose own schema is broken judges the arguments itself.
    assert schema_problems({"type": "no-such-type"}, {"a": 1}) == []


async def test_tools_are_named_by_server_and_a_clashing_tool_is_left_out() -> None:
    hub = McpHub({"t": stdio_spec("t"), "list": stdio_spec("list")}, taken=lambda: {"list_files"})
    try:
        await hub.start()
        assert {server.up for server in hub.servers.values()} == {True}
        tools = hub.tools()
        assert "t_add" in tools
        assert "list_add" in tools
        assert "list_files" not in tools
        assert "t_files" in tools
        assert hub.servers["list"].refused == [
            "the tool 'files' is left out: 'list_files' is taken"
        ]
        assert hub.server_for("list_whatever") is hub.servers["list"]
        assert hub.server_for("other_add") is None
        assert tools["t_add"].schema["required"] == ["a", "b"]
    finally:
        await hub.stop()


async def test_a_dead_server_is_noticed_without_a_call_and_connected_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mcp_module, "PING_EVERY", 0.2)
    monkeypatch.setattr(mcp_module, "FIRST_BACKOFF", 0.1)
    remote = McpHttpServer(port=free_port())
    hub = McpHub({"web": McpServerSpec("web", url=remote.url)}, taken=set)
    try:
        await asyncio.to_thread(remote.start)
        await hub.start()
        server = hub.servers["web"]
        assert server.up
        generation = hub.generation
        assert await server.call("add", {"a": 1, "b": 1}) == "2"

        await asyncio.to_thread(remote.stop)
        await until(lambda: not server.up, "the ping to find the server gone")
        assert server.error
        answer = await server.call("add", {"a": 1, "b": 1})
        assert answer.startswith("The MCP server web is not reachable (")
        assert server.stats.calls["unreachable"] == 1

        await asyncio.to_thread(remote.start)
        await until(lambda: server.up, "the server to be connected again")
        assert await server.call("add", {"a": 2, "b": 1}) == "3"
        assert hub.generation == generation  # the same tools: agents need not be rebuilt
    finally:
        await hub.stop()
        remote.stop()


_WITHOUT_EXTRA = textwrap.dedent(
    """
    import json, sys
    sys.modules["pydantic_ai.mcp"] = None  # as if the extra were not installed
    from countersign.app import create_app
    from countersign.config import Settings
    from countersign.domain.errors import ConfigError

    settings = Settings(_env_file=None, mcp_servers={"t": {"command": "x"}})
    try:
        create_app(settings)
    except ConfigError as error:
        print(json.dumps([error.message, error.hint]))
    """
)


def test_mcp_servers_without_the_mcp_extra_are_one_sentence_naming_the_pip_install() -> None:
    """In a process of its own where the extra cannot be imported; nothing is mocked."""
    finished = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRA],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    message, hint = json.loads(finished.stdout)
    assert message == (
        "COUNTERSIGN_MCP_SERVERS names MCP servers, but the MCP support is not installed."
    )
    assert hint == 'Install it with: pip install "countersign[mcp]"'
