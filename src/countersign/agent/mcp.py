"""Tools from MCP servers: one shared connection per server, kept up, and calls that never
take a turn down.

The operator names the servers (``COUNTERSIGN_MCP_SERVERS``); this module connects to each
through pydantic-ai's ``MCPToolset`` (stdio or streamable HTTP) and offers each of its tools
as ``NAME_TOOL``. Each server has one task that holds its connection: it connects, lists the
tools, pings the server while it is idle, and when the connection drops (a failed ping, or a
call that lost it) connects again after a back-off that doubles up to ``MAX_BACKOFF``.

A call never raises into the turn: a server that is down, a tool that reports an error, a
call past its time limit and a connection lost during a call are each the tool's output, a
sentence the model can read (and the journal keeps). Whether a call whose connection broke
off took effect is unknown, and the output says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
import jsonschema
from pydantic_ai import ModelRetry, Tool
from pydantic_core import SchemaValidator, core_schema, to_jsonable_python

from countersign.domain.errors import ConfigError

logger = logging.getLogger("countersign.mcp")

SERVER_NAME = re.compile(r"^[A-Za-z0-9-]{1,32}$")
TOOL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
PING_EVERY = 10.0
"""Seconds between pings of an idle connection (a dead server is found without a call)."""
CONNECT_TIMEOUT = 10.0
"""Seconds to connect (start the process, or reach the URL) and list the tools."""
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CALL_OUTCOMES = ("ok", "error", "timeout", "unreachable", "broken", "cancelled")
"""A call's outcome: answered, the tool reported an error, past its time limit, server down
(it did not run), the connection broke off during the call (whether it ran is unknown), the
run was cancelled (or stopped) during the call."""


@dataclass(frozen=True, slots=True)
class McpServerSpec:
    """How to reach one MCP server (built from Settings by the composition root)."""

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    """The process's whole environment (it does not inherit the server's secrets)."""
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Sent with every request (e.g. an Authorization header): never logged."""
    timeout: float = 30.0
    """Seconds one tool call may take."""

    @property
    def transport(self) -> str:
        """``stdio`` or ``http``."""
        return "stdio" if self.command is not None else "http"


@dataclass(frozen=True, slots=True)
class McpTool:
    """One tool of one MCP server, as agents name it (``SERVER_TOOL``)."""

    name: str
    server: str
    remote: str
    """Its name on the server."""
    description: str
    schema: dict[str, Any]
    """Its input JSON schema."""
    tool: Tool[Any]


@dataclass(slots=True)
class McpStats:
    """Calls, outcomes and latency of one server (read by the metrics collector)."""

    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CALL_OUTCOMES, 0))
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    seconds: float = 0.0
    count: int = 0

    def record(self, outcome: str, elapsed: float) -> None:
        """One call ended with this outcome after ``elapsed`` seconds."""
        self.calls[outcome] += 1
        self.seconds += elapsed
        self.count += 1
        for index, bound in enumerate(LATENCY_BUCKETS):
            if elapsed <= bound:
                self.buckets[index] += 1


def check_specs(specs: Mapping[str, McpServerSpec]) -> None:
    """ConfigError (one sentence) when MCP servers are configured but cannot be used."""
    if not specs:
        return
    try:
        import pydantic_ai.mcp  # noqa: F401 - the optional extra
    except ImportError:
        raise ConfigError(
            "COUNTERSIGN_MCP_SERVERS names MCP servers, but the MCP support is not installed.",
            hint='Install it with: pip install "countersign[mcp]"',
        ) from None


class McpServer:
    """One configured server: its connection, its tools and its health."""

    def __init__(self, spec: McpServerSpec, hub: McpHub) -> None:
        self.spec = spec
        self._hub = hub
        self.up = False
        self.error: str | None = "not connected yet"
        self.tools: dict[str, McpTool] = {}
        """Its tools that agents may name, by their full name."""
        self.refused: list[str] = []
        """One sentence per tool of the server that is not offered (a name clash)."""
        self.stats = McpStats()
        self._toolset: Any = None
        self._lost = asyncio.Event()
        self.first_attempt = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        """The server's configured name."""
        return self.spec.name

    def start(self) -> None:
        """Begin holding the connection, in a task of its own (on the running event loop)."""
        self._lost = asyncio.Event()
        self.first_attempt = asyncio.Event()
        self._task = asyncio.create_task(self._hold(), name=f"mcp:{self.name}")

    async def stop(self) -> None:
        """Close the connection (bounded)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, timeout=5)
            self._task = None

    async def connect_once(self) -> None:
        """Connect, list the tools and disconnect (``tools check``); sets up/error/tools."""
        toolset = self._new_toolset()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                async with toolset:
                    listed = await toolset.list_tools()
            self._install(listed)
            self.up = True
            self.error = None
        except Exception as exc:  # noqa: BLE001 - whatever the connection raised, in words
            self.error = _describe(exc)
        finally:
            self.first_attempt.set()

    async def _hold(self) -> None:
        backoff = FIRST_BACKOFF
        while True:
            toolset = self._new_toolset()
            entered = False
            try:
                try:
                    async with asyncio.timeout(CONNECT_TIMEOUT):
                        await toolset.__aenter__()
                        entered = True
                        listed = await toolset.list_tools()
                    self._install(listed)
                except Exception as exc:  # noqa: BLE001 - the server is down: say why
                    self._went_down(_describe(exc))
                else:
                    backoff = FIRST_BACKOFF
                    self._toolset = toolset
                    self._lost.clear()
                    self.up = True
                    self.error = None
                    logger.info("MCP server %s is connected (%d tools)", self.name, len(listed))
                    self.first_attempt.set()
                    await self._watch(toolset)
            except Exception as exc:
                logger.exception("holding the connection to MCP server %s failed", self.name)
                self._went_down(_describe(exc))
            finally:
                self.first_attempt.set()
                # Calls that took this connection before now fail on it and report no loss
                # (it is no longer the current one); later calls find the server down.
                self._toolset = None
                self.up = False
                if entered:
                    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                        async with asyncio.timeout(5):
                            await toolset.__aexit__(None, None, None)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _watch(self, toolset: Any) -> None:
        """Return once the connection is lost: a call lost it, or a ping failed."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PING_EVERY):
                    await self._lost.wait()
            if self._lost.is_set():
                self._went_down(self.error or "the connection was lost")
                return
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await toolset.client.ping()
            except Exception as exc:  # noqa: BLE001 - any failure means the connection is gone
                self._went_down(_describe(exc))
                return

    def _went_down(self, reason: str) -> None:
        if self.up or self.error != reason:
            logger.warning("MCP server %s is not reachable: %s", self.name, reason)
        self.up = False
        self.error = reason

    def _install(self, listed: list[Any]) -> None:
        tools: dict[str, McpTool] = {}
        refused: list[str] = []
        taken = self._hub.taken_by_others(self.name)
        for remote in listed:
            full = f"{self.name}_{remote.name}"
            if not TOOL_NAME.fullmatch(full):
                refused.append(
                    f"the tool {remote.name!r} is left out: {full!r} is not a usable tool name"
                )
            elif full in taken:
                refused.append(f"the tool {remote.name!r} is left out: {full!r} is taken")
            else:
                tools[full] = self._tool(full, remote)
        for sentence in refused:
            if sentence not in self.refused:
                logger.warning("MCP server %s: %s", self.name, sentence)
        self.refused = refused
        if tools.keys() != self.tools.keys() or any(
            tools[name].schema != self.tools[name].schema
            or tools[name].description != self.tools[name].description
            for name in tools
        ):
            self.tools = tools
            self._hub.changed()

    def _tool(self, full: str, remote: Any) -> McpTool:
        listed = getattr(remote, "input_schema", None) or getattr(remote, "inputSchema", None)
        schema: dict[str, Any] = dict(listed or {"type": "object"})
        schema.setdefault("type", "object")
        description = (remote.description or "").strip() or f"The tool {remote.name} of {self.name}"
        remote_name: str = remote.name

        async def call(**arguments: Any) -> str:
            return await self.call(remote_name, arguments)

        def check(_ctx: Any, **arguments: Any) -> None:
            problems = schema_problems(schema, arguments)
            if problems:
                raise ModelRetry(f"invalid arguments for tool {full}: {'; '.join(problems)}")

        tool = object_arguments(
            Tool.from_schema(
                call, name=full, description=description, json_schema=schema, args_validator=check
            )
        )
        return McpTool(full, self.name, remote_name, description, schema, tool)

    def _new_toolset(self) -> Any:
        from fastmcp.client.transports import StdioTransport  # the optional extra
        from pydantic_ai.mcp import MCPToolset  # the optional extra

        spec = self.spec
        common: dict[str, Any] = {
            "id": spec.name,
            # A tool's error comes back as an exception, turned into its output here.
            "tool_error_behavior": "error",
            "init_timeout": CONNECT_TIMEOUT,
            # The client's own limit on a request stays out of the way of the call's.
            "read_timeout": spec.timeout + CONNECT_TIMEOUT,
            "cache_tools": True,
        }
        if spec.command is not None:
            transport = StdioTransport(
                # The connection task holds the client open for as long as the connection
                # lives; leaving it ends the process (kept alive, it would outlive its close).
                command=spec.command,
                args=list(spec.args),
                env=dict(spec.env),
                keep_alive=False,
            )
            return MCPToolset(transport, **common)
        assert spec.url is not None
        return MCPToolset(spec.url, headers=dict(spec.headers) or None, **common)

    async def call(self, remote: str, arguments: dict[str, Any]) -> str:
        """Call a tool of this server: its output, or a sentence saying why there is none."""
        full = f"{self.name}_{remote}"
        toolset = self._toolset
        started = time.perf_counter()
        outcome = "cancelled"
        try:
            if toolset is None or not self.up:
                outcome = "unreachable"
                return (
                    f"The MCP server {self.name} is not reachable ({self.error}), so the tool "
                    f"{full} did not run."
                )
            try:
                async with asyncio.timeout(self.spec.timeout):
                    # On the held client itself: a connection closed meanwhile fails the call
                    # (the toolset would quietly open a new one the hub knows nothing of).
                    result = await toolset.client.call_tool(remote, arguments, raise_on_error=True)
            except Exception as exc:  # noqa: BLE001 - sorted below, each one in words
                outcome = _failure(exc)
                if outcome == "timeout":
                    return (
                        f"The tool {full} did not answer within {self.spec.timeout:g} s; "
                        "whether it took effect is unknown."
                    )
                if outcome == "error":
                    detail = _one_line(str(_leaf(exc))) or type(_leaf(exc)).__name__
                    return f"The tool {full} failed: {detail}"
                reason = _describe(exc)
                if toolset is self._toolset:
                    # Only the current connection's loss counts: a late failure of a call on
                    # an old one must not tear down the connection that replaced it.
                    self.error = reason
                    self._lost.set()
                return (
                    f"The connection to the MCP server {self.name} broke off during the call "
                    f"({reason}); whether the tool {full} took effect is unknown."
                )
            outcome = "ok"
            return _as_text(result)
        finally:
            self.stats.record(outcome, time.perf_counter() - started)


class McpHub:
    """Every configured MCP server of this process, and the tools they offer."""

    def __init__(
        self, specs: Mapping[str, McpServerSpec], *, taken: Callable[[], set[str]]
    ) -> None:
        self.servers = {name: McpServer(spec, self) for name, spec in specs.items()}
        self._taken = taken
        self.generation = 0
        """Grows whenever the offered tools change (agents built before are rebuilt)."""

    def changed(self) -> None:
        """The tools some server offers changed."""
        self.generation += 1

    def taken_by_others(self, server: str) -> set[str]:
        """Tool names that ``server``'s tools may not have: built-ins, plugins, other servers'."""
        names = set(self._taken())
        for other in self.servers.values():
            if other.name != server:
                names.update(other.tools)
        return names

    def tools(self) -> dict[str, McpTool]:
        """The tools the servers offer now, by full name."""
        return {
            name: tool for server in self.servers.values() for name, tool in server.tools.items()
        }

    def server_for(self, tool: str) -> McpServer | None:
        """The configured server a tool name belongs to (by its ``NAME_`` prefix), if any."""
        matches = [s for s in self.servers.values() if tool.startswith(f"{s.name}_")]
        return max(matches, key=lambda server: len(server.name), default=None)

    async def start(self, *, wait: float = CONNECT_TIMEOUT) -> None:
        """Connect to every server, waiting (at most ``wait`` seconds) for the first attempts
        so that the tools are known when the server starts serving; a server that is down is
        logged and tried again in the background."""
        for server in self.servers.values():
            server.start()
        waits = [server.first_attempt.wait() for server in self.servers.values()]
        if waits:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await asyncio.gather(*waits)

    async def check(self) -> None:
        """Connect to each server once, list its tools and disconnect (``tools check``)."""
        for server in self.servers.values():
            await server.connect_once()

    async def stop(self) -> None:
        """Close every connection."""
        await asyncio.gather(*(server.stop() for server in self.servers.values()))


def object_arguments(tool: Tool[Any]) -> Tool[Any]:
    """The tool, taking only a JSON object as its arguments: a model that sends a list, a
    string or null is asked to correct them (``Tool.from_schema`` would take anything)."""
    tool.function_schema.validator = SchemaValidator(core_schema.dict_schema())
    return tool


def schema_problems(schema: dict[str, Any], arguments: dict[str, Any]) -> list[str]:
    """What is wrong with ``arguments`` by the tool's JSON schema, one line per problem
    starting with where (``field: …``); empty when they are valid."""
    return [
        f"{'.'.join(str(part) for part in error['loc']) or 'arguments'}: {error['msg']}"
        for error in schema_error_details(schema, arguments)
    ]


def schema_error_details(schema: dict[str, Any], arguments: dict[str, Any]) -> list[dict[str, Any]]:
    """The problems of ``arguments`` by the tool's JSON schema, as ``{loc, msg, type}`` entries
    (like pydantic's); empty when they are valid, or when the server's schema is itself broken
    (the server judges the arguments then)."""
    validator_class = jsonschema.validators.validator_for(
        schema, default=jsonschema.Draft202012Validator
    )
    try:
        validator_class.check_schema(schema)
        errors = list(validator_class(schema).iter_errors(arguments))
    except Exception:  # noqa: BLE001 - a broken schema (bad type, unresolvable $ref...)
        return []
    return [
        {"loc": list(error.path), "msg": _one_line(error.message), "type": str(error.validator)}
        for error in sorted(errors, key=lambda error: [str(part) for part in error.path])
    ]


def _leaf(exc: BaseException) -> BaseException:
    """The first error inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _failure(exc: Exception) -> str:
    """``error`` when the tool (or the server, about this call) said no and the connection is
    fine; ``timeout`` when the client gave up waiting; else ``broken``."""
    from fastmcp.exceptions import McpError, ToolError  # the optional extra
    from mcp.types import CONNECTION_CLOSED, REQUEST_TIMEOUT  # the optional extra

    if isinstance(exc, BaseExceptionGroup):
        # The client's task group may wrap the error; only a group of nothing but tool or
        # protocol errors is one.
        matched, rest = exc.split((ToolError, McpError))
        if matched is None or rest is not None:
            return "broken"
        exc = cast(Exception, _leaf(matched))
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ToolError):
        return "error"
    if isinstance(exc, McpError):
        if exc.error.code == REQUEST_TIMEOUT:
            return "timeout"
        return "broken" if exc.error.code == CONNECTION_CLOSED else "error"
    return "broken"


def _as_text(result: Any) -> str:
    """A tool's result as the text the model reads: its structured content when the text
    blocks only repeat it, else its blocks (media as a note of their type and size)."""
    structured = result.structured_content
    blocks = list(result.content or [])
    if structured is not None and all(_kind(block) == "text" for block in blocks):
        value = structured
        if isinstance(value, dict) and list(value) == ["result"]:
            value = value["result"]  # the SDK wraps a plain value
        if isinstance(value, str):
            return value
        return json.dumps(to_jsonable_python(value), ensure_ascii=False)
    return "\n".join(_block_text(block) for block in blocks)


def _kind(block: Any) -> str:
    return str(getattr(block, "type", ""))


def _block_text(block: Any) -> str:
    kind = _kind(block)
    if kind == "text":
        return str(block.text)
    if kind in ("image", "audio"):
        media = getattr(block, "mime_type", None) or getattr(block, "mimeType", "")
        size = len(getattr(block, "data", "") or "") * 3 // 4  # base64
        return f"[{media or kind} content, about {size} bytes]"
    if kind == "resource":
        resource = block.resource
        text = getattr(resource, "text", None)
        return str(text) if text is not None else f"[resource {resource.uri}]"
    if kind == "resource_link":
        return f"[resource {block.uri}]"
    return f"[{kind or 'unknown'} content]"


def _describe(exc: BaseException) -> str:
    """One line for a connection failure (the innermost useful error of a group)."""
    exc = _leaf(exc)
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    text = _one_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 300 else line[:297] + "..."
