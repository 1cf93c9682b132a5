"""The built-in tools (workspace files and a shell command) and their policies auto|ask|deny.

This module owns what a tool call may touch and how it is recorded:

- every path a tool takes is resolved inside the turn's workspace, symlinks followed, and
  refused when it lands outside;
- ``shell`` runs a command split into arguments (no interpreter unless configured), in the
  workspace, with a minimal environment and a timeout that stops the whole process group;
- every call that reaches a tool is journaled ``started`` before it runs and ``finished`` with
  its output after, so a crash between the two is visible as an outcome nobody knows.

Expected failures (a missing file, a refused path, a failing command) are the tool's output,
so the model can react; only unexpected errors propagate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NoReturn, Protocol

import anyio
from pydantic import ValidationError
from pydantic_ai import ApprovalRequired, RunContext, Tool
from pydantic_ai.messages import ModelResponse
from pydantic_ai.tools import ToolFuncContext
from pydantic_ai.toolsets import FunctionToolset, ToolsetTool
from pydantic_core import to_jsonable_python

from countersign.agent.mcp import McpHub, McpServer, object_arguments, schema_error_details
from countersign.agent.plugins import PluginTool
from countersign.agent.rules import ArgumentKind, PolicyDecision, check_rules, decide
from countersign.agent.sandbox import Sandbox, startup_failure
from countersign.domain.errors import InvalidInput
from countersign.domain.models import ToolPolicy, ToolSetting

ASKED_BECAUSE = "asked_because"
"""The key of a deferred call's metadata that says why it asks (a rule, or the policy)."""


class ToolJournal(Protocol):
    """Where a tool call is recorded (the executor's turn)."""

    async def tool_started(
        self,
        *,
        call_id: str,
        tool: str,
        arguments: dict[str, Any],
        other_calls: Sequence[dict[str, Any]] = (),
    ) -> None:
        """A tool is about to run with these (validated) arguments: commit it before returning.

        ``other_calls``: the other calls (``tool``, ``arguments``, ``call_id``) of the model
        response that made this one, which may not reach a tool before a crash (a call that
        asks, one waiting its turn): the journal keeps them so that recovery loses none.
        """

    async def tool_finished(
        self, *, call_id: str, tool: str, output: str, stopped: bool = False
    ) -> None:
        """A tool has run (or was refused) and this is what the model gets back.

        ``stopped``: it ended by an error or a cancel, and the run is about to stop: commit the
        record before returning. Otherwise it may go with the run's next write, which comes
        before the model is asked anything again.
        """


@dataclass(frozen=True, slots=True)
class ToolLimits:
    """Bounds on what one tool call may take."""

    shell_timeout: float = 30.0
    """Seconds a shell command may run before its process group is killed."""
    output_max_chars: int = 16_000
    """Cap on any tool's output; a cut output says so."""
    shell_interpreter: bool = False
    """True: run commands through ``/bin/sh -c``; False: ``shlex.split`` and exec, no shell."""
    sandbox: Sandbox | None = None
    """Run shell commands under bubblewrap (``COUNTERSIGN_SANDBOX``); None: directly."""


@dataclass(frozen=True, slots=True)
class TurnDeps:
    """What the tools of one agent turn get through pydantic-ai's RunContext.deps."""

    workspace: Path
    journal: ToolJournal
    limits: ToolLimits


class _ToolProblem(Exception):
    """An expected failure whose message is the tool's output (the model can react to it)."""


# The command's environment is fixed rather than inherited: the server's environment holds
# secrets (database URL, API keys) that a command must not see.
_SHELL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# After the command ends and its group is killed, the output pipe closes at once unless a
# process that left the group (setsid, a daemon) still holds it; don't wait on that forever.
_OUTPUT_GRACE_SECONDS = 2.0


# --- paths -------------------------------------------------------------------------------


def _workspace_root(deps: TurnDeps) -> Path:
    """The resolved workspace folder, created on first use."""
    deps.workspace.mkdir(parents=True, exist_ok=True)
    return deps.workspace.resolve()


def _inside(root: Path, path: str) -> Path:
    """Resolve ``path`` against the workspace ``root``; refuse it unless it stays inside."""
    if "\x00" in path:
        raise _ToolProblem(f"path {path!r} contains a NUL byte")
    candidate = Path(path)
    if candidate.is_absolute():
        raise _ToolProblem(f"path {path} is outside the workspace")
    try:
        # resolve() follows every symlink on the way (a linked file or a linked directory in
        # the middle), so what is checked is where the path really leads, not how it reads.
        resolved = (root / candidate).resolve(strict=False)
    except (RuntimeError, OSError) as exc:
        # Python 3.11 reports a symlink loop as RuntimeError.
        raise _ToolProblem(f"path {path} cannot be resolved: {exc}") from None
    if not resolved.is_relative_to(root):
        raise _ToolProblem(f"path {path} is outside the workspace")
    # A symlink swapped in between this check and the use (by a command still running in the
    # background) is not caught here; commands need a person's approval by default.
    return resolved


def _cap(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n... [output cut at {limit} characters]"


# --- the tools (their docstrings are what the model reads) --------------------------------


def list_files(ctx: RunContext[TurnDeps], path: str = ".") -> str:
    """List the entries of one folder in the workspace (one level, not recursive).

    Entries are relative to the workspace, sorted, one per line; folders end with "/",
    symbolic links with "@".

    Args:
        path: The folder to list, relative to the workspace.
    """
    root = _workspace_root(ctx.deps)
    folder = _inside(root, path)
    if not folder.exists():
        raise _ToolProblem(f"folder {path} does not exist")
    if not folder.is_dir():
        raise _ToolProblem(f"path {path} is not a folder")
    entries: list[str] = []
    for child in sorted(folder.iterdir()):
        name = child.relative_to(root).as_posix()
        if child.is_symlink():
            entries.append(f"{name}@")
        elif child.is_dir():
            entries.append(f"{name}/")
        else:
            entries.append(name)
    return "\n".join(entries) if entries else f"(folder {path} is empty)"


def read_file(ctx: RunContext[TurnDeps], path: str) -> str:
    """Read a text file in the workspace (UTF-8; long files are cut).

    Args:
        path: The file to read, relative to the workspace.
    """
    root = _workspace_root(ctx.deps)
    target = _inside(root, path)
    if not target.exists():
        raise _ToolProblem(f"file {path} does not exist")
    if not target.is_file():
        # Also keeps FIFOs and devices out: reading one could block forever.
        raise _ToolProblem(f"path {path} is not a file")
    limit = ctx.deps.limits.output_max_chars
    with target.open(encoding="utf-8", errors="replace") as file:
        # One character past the cap is enough to know the text was cut; a huge file is never
        # read whole.
        return file.read(limit + 1)


def write_file(ctx: RunContext[TurnDeps], path: str, content: str) -> str:
    """Write a text file in the workspace (UTF-8), creating its folders; replaces an old file.

    Args:
        path: The file to write, relative to the workspace.
        content: The whole new content of the file.
    """
    root = _workspace_root(ctx.deps)
    target = _inside(root, path)
    if target == root or target.is_dir():
        raise _ToolProblem(f"path {path} is a folder")
    data = content.encode("utf-8")
    # The parents lie between the workspace and the checked target, so they are inside too.
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return f"wrote {len(data)} bytes to {path}"


async def shell(ctx: RunContext[TurnDeps], command: str) -> str:
    """Run a command in the workspace and return its combined output.

    The command is split into arguments like a shell would (quotes work), but it is not run
    by a shell unless the server is set up so: pipes, redirections, variables and ";" are then
    passed literally. Background processes are stopped when the command ends.

    Args:
        command: The command line, e.g. "ls -la" or "python3 script.py".
    """
    deps = ctx.deps
    root = _workspace_root(deps)
    limits = deps.limits
    if limits.shell_interpreter:
        argv = ["/bin/sh", "-c", command]
    else:
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise _ToolProblem(f"cannot split the command into arguments: {exc}") from None
    if not argv:
        raise _ToolProblem("the command is empty")
    if any("\x00" in argument for argument in argv):
        raise _ToolProblem("the command contains a NUL byte")
    # Enough bytes for output_max_chars characters of UTF-8, plus one to know it was cut.
    keep_bytes = 4 * (limits.output_max_chars + 1)
    sandbox = limits.sandbox
    loop = asyncio.get_running_loop()
    try:
        transport, output = await loop.subprocess_exec(
            lambda: _CommandOutput(keep_bytes),
            *(argv if sandbox is None else sandbox.wrap(argv, root, _SHELL_PATH)),
            cwd=root,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={"PATH": _SHELL_PATH, "HOME": str(root), "LANG": "C.UTF-8"},
            # Its own process group, so a timeout can stop every process it started.
            start_new_session=True,
            preexec_fn=None if sandbox is None else sandbox.limit,
        )
    except FileNotFoundError:
        raise _ToolProblem(f"command not found: {argv[0]}") from None
    except PermissionError:
        raise _ToolProblem(f"permission denied: {argv[0]}") from None
    timed_out = False
    try:
        try:
            async with asyncio.timeout(limits.shell_timeout):
                await output.exited.wait()
        except TimeoutError:
            timed_out = True
        _kill_group(transport.get_pid())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_OUTPUT_GRACE_SECONDS):
                await output.closed.wait()
                await output.exited.wait()
    finally:
        # Also on cancellation: no process of this call outlives it, and it is reaped.
        _kill_group(transport.get_pid())
        if not output.exited.is_set():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(_OUTPUT_GRACE_SECONDS):
                    await output.exited.wait()
        transport.close()
    text = _cap(output.text(), limits.output_max_chars)
    # The status goes first so that cutting a long output never hides it.
    if timed_out:
        return f"timed out after {limits.shell_timeout:g} s; output so far:\n{text}"
    code = transport.get_returncode()
    if code == 1 and sandbox is not None:
        failure = startup_failure(text)
        if failure is not None:
            raise _ToolProblem(failure)
    if code:
        return f"exit code {code}\n{text}"
    return text


class _CommandOutput(asyncio.SubprocessProtocol):
    """Collects a command's combined output (bounded) and tells when it ended."""

    def __init__(self, keep_bytes: int) -> None:
        self._keep_bytes = keep_bytes
        self._kept = bytearray()
        self.exited = asyncio.Event()
        self.closed = asyncio.Event()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        room = self._keep_bytes - len(self._kept)
        if room > 0:
            self._kept += data[:room]
        # Beyond the cap the data is dropped, but still read, so the command never blocks on
        # a full pipe.

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self.closed.set()

    def process_exited(self) -> None:
        self.exited.set()

    def text(self) -> str:
        return self._kept.decode("utf-8", errors="replace")


def _kill_group(pid: int) -> None:
    # The group id is the command's pid (start_new_session); it is gone once all its members are.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


# --- the toolset --------------------------------------------------------------------------

_FUNCTIONS: dict[str, ToolFuncContext[TurnDeps, ...]] = {
    "list_files": list_files,
    "read_file": read_file,
    "write_file": write_file,
    "shell": shell,
}
BUILTIN_TOOLS: frozenset[str] = frozenset(_FUNCTIONS)
ARGUMENT_KINDS: dict[str, dict[str, ArgumentKind]] = {
    "list_files": {"path": ArgumentKind.PATH},
    "read_file": {"path": ArgumentKind.PATH},
    "write_file": {"path": ArgumentKind.PATH},
    "shell": {"command": ArgumentKind.COMMAND},
}
"""How argument rules read each built-in's arguments (the rest are plain text)."""


_PLUGIN_TOOLS: dict[str, PluginTool] = {}
"""The tools of the plugins this process loaded (``install_plugins``), by name."""
_MCP: list[McpHub] = []
"""The MCP servers of this process (``install_mcp``): none, or one hub."""


def install_plugins(tools: dict[str, PluginTool]) -> None:
    """Make these plugin tools (and no others) the ones agents may name in this process."""
    _PLUGIN_TOOLS.clear()
    _PLUGIN_TOOLS.update(tools)


def install_mcp(hub: McpHub | None) -> None:
    """Make this hub's servers (or none) the MCP servers whose tools agents may name."""
    _MCP.clear()
    if hub is not None:
        _MCP.append(hub)


def mcp_hub() -> McpHub | None:
    """The MCP servers of this process, if any are configured."""
    return _MCP[0] if _MCP else None


def plugin_tools() -> dict[str, PluginTool]:
    """The plugin tools agents may name, by name."""
    return dict(_PLUGIN_TOOLS)


def _mcp_tools() -> dict[str, Any]:
    hub = mcp_hub()
    return hub.tools() if hub is not None else {}


def tools_generation() -> int:
    """Grows whenever the tools on offer change (an MCP server connected with other tools)."""
    hub = mcp_hub()
    return hub.generation if hub is not None else 0


def known_tools() -> list[str]:
    """Every tool name an agent may use: the built-ins, the plugins' tools, the MCP tools."""
    return sorted(BUILTIN_TOOLS) + sorted(_PLUGIN_TOOLS) + sorted(_mcp_tools())


def _reference_tool(name: str) -> Tool[Any]:
    """The tool as pydantic-ai sees it: its schema, validator and description."""
    plugin = _PLUGIN_TOOLS.get(name)
    if plugin is not None:
        return plugin.tool
    mcp = _mcp_tools().get(name)
    if mcp is not None:
        tool: Tool[Any] = mcp.tool
        return tool
    server = _absent_mcp_server(name)
    if server is not None:
        return _absent_tool(name, server)
    return _builtin_tool(name)


def _absent_mcp_server(name: str) -> McpServer | None:
    """The configured MCP server a tool name belongs to, when that tool is not offered now
    (the server is down, or no longer has it)."""
    hub = mcp_hub()
    if name in BUILTIN_TOOLS or name in _PLUGIN_TOOLS or hub is None:
        return None
    if name in hub.tools():
        return None
    return hub.server_for(name)


def _absent_tool(name: str, server: McpServer) -> Tool[Any]:
    """A stand-in for a tool of an MCP server that does not offer it now: an agent that names
    it keeps working, and a call of it says why it did not run."""

    def unavailable(**_arguments: Any) -> str:
        if not server.up:
            return (
                f"The MCP server {server.name} is not reachable ({server.error}), so the tool "
                f"{name} did not run."
            )
        return f"The MCP server {server.name} offers no tool {name} now, so it did not run."

    return object_arguments(
        Tool.from_schema(
            unavailable,
            name=name,
            description=f"A tool of the MCP server {server.name} (not reachable now).",
            json_schema={"type": "object", "additionalProperties": True},
        )
    )


@cache
def _builtin_tool(name: str) -> Tool[TurnDeps]:
    """A built-in as pydantic-ai sees it: built once."""
    return Tool(_FUNCTIONS[name])


class _BuiltinToolset(FunctionToolset[TurnDeps]):
    """The built-in tools of one agent, journaling each call and refusing the denied ones.

    A tool without argument rules has its policy fixed (pydantic-ai defers an ``ask`` call
    before it reaches here); one with rules is decided here, call by call, before anything
    is journaled: a call that must ask raises ApprovalRequired, naming the rule.
    """

    def __init__(self, *, denied: frozenset[str], ruled: dict[str, ToolSetting]) -> None:
        super().__init__()
        self._denied = denied
        self._ruled = ruled

    async def call_tool(
        self,
        name: str,
        tool_args: dict[str, Any],
        ctx: RunContext[TurnDeps],
        tool: ToolsetTool[TurnDeps],
    ) -> Any:
        """Run one validated call between a ``started`` and a ``finished`` record."""
        # pydantic-ai calls this only with validated arguments, and for a tool that needs
        # approval only once a person approved it: the one place every real run passes.
        call_id = ctx.tool_call_id
        if call_id is None:
            raise RuntimeError(f"the tool {name} was called outside an agent run")
        journal = ctx.deps.journal
        arguments: dict[str, Any] = to_jsonable_python(tool_args)
        refusal = self._refusal(name, arguments, ctx)
        await journal.tool_started(
            call_id=call_id,
            tool=name,
            arguments=arguments,
            other_calls=self._other_calls(call_id, ctx),
        )
        try:
            output = refusal or await self._output(name, tool_args, ctx, tool)
        except BaseException as exc:
            # A started call must always be closed, or it would look unfinished and never be
            # retried; shielded so that a cancelled run still records it.
            with anyio.CancelScope(shield=True):
                await journal.tool_finished(
                    call_id=call_id, tool=name, output=_stopped(name, exc), stopped=True
                )
            raise
        await journal.tool_finished(call_id=call_id, tool=name, output=output)
        return output

    def _other_calls(self, call_id: str, ctx: RunContext[TurnDeps]) -> list[dict[str, Any]]:
        """The other calls, of this agent's tools that are not denied, of the new model
        response that made this one. An approved call comes from a response already stored:
        nothing to add."""
        if ctx.tool_call_approved:
            return []
        response = next(
            (message for message in reversed(ctx.messages) if isinstance(message, ModelResponse)),
            None,
        )
        if response is None:
            return []
        return [
            {"tool": call.tool_name, "arguments": call.args_as_dict(), "call_id": call.tool_call_id}
            for call in response.tool_calls
            if call.tool_call_id != call_id
            and call.tool_name in self.tools
            and call.tool_name not in self._denied  # refused, never run: nothing to ask
        ]

    def _refusal(
        self, name: str, arguments: dict[str, Any], ctx: RunContext[TurnDeps]
    ) -> str | None:
        """What a call refused by its rules gets back; None when it may run. Raises
        ApprovalRequired when it must wait for a person (approved calls are decided again on
        the arguments as approved, so an edit cannot slip past a ``deny`` rule)."""
        setting = self._ruled.get(name)
        if setting is None:
            return None
        decision = decide(
            setting,
            arguments,
            kinds=ARGUMENT_KINDS.get(name, {}),
            workspace=ctx.deps.workspace,
            interpreter=ctx.deps.limits.shell_interpreter,
        )
        if decision.policy is ToolPolicy.DENY:
            # Which rule refused stays out of what the model reads (it would say what to
            # avoid); the approval and the journal are where people look.
            return f"The tool {name} is not allowed with these arguments by this agent's rules."
        if decision.policy is ToolPolicy.AUTO and _reference_tool(name).requires_approval:
            decision = PolicyDecision(ToolPolicy.ASK, "the plugin's tool requires approval")
        if decision.policy is ToolPolicy.ASK and not ctx.tool_call_approved:
            raise ApprovalRequired(metadata={ASKED_BECAUSE: decision.because})
        return None

    async def _output(
        self,
        name: str,
        tool_args: dict[str, Any],
        ctx: RunContext[TurnDeps],
        tool: ToolsetTool[TurnDeps],
    ) -> str:
        """The tool's output, expected failures included. A built-in's unexpected error
        propagates (a bug); whatever a plugin's or MCP tool's code raises (sys.exit included)
        is its output, so that neither the run nor the server goes down with it. A cancel
        still cancels."""
        if name in self._denied:
            return f"The tool {name} is not allowed by this agent's policy."
        limit = ctx.deps.limits.output_max_chars
        try:
            result = await super().call_tool(name, tool_args, ctx, tool)
        except (asyncio.CancelledError, ApprovalRequired):
            raise
        except _ToolProblem as problem:
            return str(problem)
        except BaseException as exc:  # sorted below by whose code raised it
            if name not in BUILTIN_TOOLS:
                detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                return _cap(f"the tool {name} failed: {detail}", limit)
            if isinstance(exc, OSError):
                # The file system said no (permissions, disk full, name too long...);
                # strerror rather than str(exc), which would show the server's paths.
                return f"{name} failed: {exc.strerror or type(exc).__name__}"
            raise
        return _cap(str(result), limit)


def _stopped(name: str, exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return f"the tool {name} was cancelled before it finished"
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return _cap(f"the tool {name} failed unexpectedly: {detail}", 2_000)


def build_toolset(
    tools: Sequence[ToolSetting], *, strict: bool = True
) -> FunctionToolset[TurnDeps]:
    """The toolset for an agent's tool settings; unknown names raise InvalidInput.

    ``strict=False`` (running an agent rather than saving one): a tool of a configured MCP
    server that does not offer it now (the server is down) is a stand-in whose calls say so,
    and its argument rules wait until the server offers the tool again.
    """
    names = [setting.name for setting in tools]
    for name in names:
        if strict or _absent_mcp_server(name) is None:
            _check_known(name)
        if names.count(name) > 1:
            raise InvalidInput(f"tool {name} is listed more than once")
    for setting in tools:
        if _absent_mcp_server(setting.name) is None:
            check_rules(
                setting, tool_parameters(setting.name), ARGUMENT_KINDS.get(setting.name, {})
            )
    toolset = _BuiltinToolset(
        denied=frozenset(s.name for s in tools if s.policy == ToolPolicy.DENY and not s.rules),
        ruled={s.name: s for s in tools if s.rules and _absent_mcp_server(s.name) is None},
    )
    for setting in tools:
        reference = _reference_tool(setting.name)
        absent = _absent_mcp_server(setting.name) is not None
        ruled = bool(setting.rules) and not absent
        # A plugin's tool that requires approval asks whatever the agent says (deny still
        # refuses); its retries, timeout and strictness go with it. The stand-in for a tool
        # whose MCP server does not offer it never asks: a call of it only says so.
        asks = not absent and (
            setting.policy == ToolPolicy.ASK
            or (reference.requires_approval and setting.policy == ToolPolicy.AUTO)
        )
        toolset.add_tool(
            Tool(
                reference.function,
                name=reference.name,
                description=reference.description,
                function_schema=reference.function_schema,
                args_validator=reference.args_validator,
                max_retries=reference.max_retries,
                timeout=reference.timeout,
                strict=reference.strict,
                requires_approval=asks and not ruled,
                # One at a time: the tools share a workspace, and the journal then reads in the
                # order things happened.
                sequential=True,
            )
        )
    return toolset


def validate_tool_arguments(tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Check arguments against the tool's own schema; return them as plain JSON values.

    An MCP tool's schema is the server's JSON schema (checked with jsonschema); the others'
    is their function's (checked with pydantic).
    """
    _check_known(tool)
    mcp = _mcp_tools().get(tool)
    if mcp is not None:
        details = schema_error_details(mcp.schema, arguments)
        if details:
            _invalid_arguments(tool, details)
        plain_arguments: dict[str, Any] = to_jsonable_python(arguments)
        return plain_arguments
    validator = _reference_tool(tool).function_schema.validator
    try:
        validated = validator.validate_python(arguments)
    except ValidationError as exc:
        _invalid_arguments(
            tool, exc.errors(include_url=False, include_context=False, include_input=False)
        )
    plain: dict[str, Any] = to_jsonable_python(validated)
    return plain


def _invalid_arguments(tool: str, details: Sequence[Any]) -> NoReturn:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'arguments'}: {error['msg']}"
        for error in details
    )
    raise InvalidInput(f"invalid arguments for tool {tool}: {problems}", detail=list(details))


def tool_parameters(name: str) -> dict[str, Any]:
    """A tool's arguments: its JSON schema's properties."""
    _check_known(name)
    schema = _reference_tool(name).function_schema.json_schema
    properties: dict[str, Any] = schema.get("properties", {})
    return properties


def tool_schema(name: str) -> dict[str, Any]:
    """A tool's whole JSON schema for its arguments."""
    _check_known(name)
    return dict(_reference_tool(name).function_schema.json_schema)


def tool_descriptions() -> dict[str, str]:
    """Each tool's name and the first line of its description."""
    return {
        name: ((_reference_tool(name).description or name).strip().splitlines() or [name])[0]
        for name in known_tools()
    }


def _check_known(name: str) -> None:
    if name in BUILTIN_TOOLS or name in _PLUGIN_TOOLS or name in _mcp_tools():
        return
    server = _absent_mcp_server(name)
    if server is not None:
        why = f"not reachable now ({server.error})" if not server.up else "up, without it"
        raise InvalidInput(
            f"unknown tool: {name}; the MCP server {server.name} is {why}, so its tools "
            "cannot be checked; try again once it offers the tool (see GET /tools)"
        )
    known = f"built-in tools are {', '.join(sorted(BUILTIN_TOOLS))}"
    if _PLUGIN_TOOLS:
        known += f"; plugin tools are {', '.join(sorted(_PLUGIN_TOOLS))}"
    if _mcp_tools():
        known += "; MCP tools are listed by GET /tools"
    raise InvalidInput(f"unknown tool: {name}; {known}")
