"""The built-in tools through a real pydantic-ai Agent: policies, journaling, path safety, shell."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai import (
    Agent,
    DeferredToolRequests,
    DeferredToolResults,
    ToolApproved,
    ToolDenied,
    models,
)
from pydantic_ai.messages import (
    ModelMessage,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

from countersign.agent.tools import (
    BUILTIN_TOOLS,
    ToolLimits,
    TurnDeps,
    build_toolset,
    tool_descriptions,
    validate_tool_arguments,
)
from countersign.domain.errors import InvalidInput
from countersign.domain.models import ToolPolicy, ToolSetting

Call = tuple[str, dict[str, Any]]
Record = tuple[str, str, str, Any]

EVERY_TOOL_AUTO = tuple(ToolSetting(name, ToolPolicy.AUTO) for name in sorted(BUILTIN_TOOLS))


@pytest.fixture(autouse=True)
def _no_real_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "ALLOW_MODEL_REQUESTS", False)


class RecordingJournal:
    """Keeps what the executor's journal would commit, in order."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.stopped: list[bool] = []
        """Per finished record: whether it came from an error or a cancel (commit at once)."""

    async def tool_started(
        self,
        *,
        call_id: str,
        tool: str,
        arguments: dict[str, Any],
        other_calls: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.records.append(("started", call_id, tool, arguments))

    async def tool_finished(
        self, *, call_id: str, tool: str, output: str, stopped: bool = False
    ) -> None:
        self.records.append(("finished", call_id, tool, output))
        self.stopped.append(stopped)


def scripted(*steps: Sequence[Call]) -> FunctionModel:
    """A model that makes each step's tool calls in turn, then answers with the last outputs."""

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        step = sum(isinstance(message, ModelResponse) for message in messages)
        if step < len(steps):
            return ModelResponse(
                parts=[
                    ToolCallPart(name, args, tool_call_id=f"call-{step}-{index}")
                    for index, (name, args) in enumerate(steps[step])
                ]
            )
        returns = [
            part
            for part in messages[-1].parts
            if isinstance(part, ToolReturnPart) and part.tool_name in BUILTIN_TOOLS
        ]
        return ModelResponse(parts=[TextPart("\n".join(str(part.content) for part in returns))])

    return FunctionModel(respond)


class Turn:
    """One agent with the built-in tools, a workspace and a journal, run like the executor does."""

    def __init__(
        self,
        workspace: Path,
        tools: Sequence[ToolSetting] = EVERY_TOOL_AUTO,
        limits: ToolLimits | None = None,
    ) -> None:
        self.workspace = workspace
        self.journal = RecordingJournal()
        self.deps = TurnDeps(
            workspace=workspace, journal=self.journal, limits=limits or ToolLimits()
        )
        self.toolset = build_toolset(tools)

    async def run(
        self,
        *steps: Sequence[Call],
        history: list[ModelMessage] | None = None,
        results: DeferredToolResults | None = None,
    ) -> tuple[str | DeferredToolRequests, list[ModelMessage]]:
        agent: Agent[TurnDeps, str | DeferredToolRequests] = Agent(
            scripted(*steps),
            deps_type=TurnDeps,
            output_type=[str, DeferredToolRequests],
            toolsets=[self.toolset],
        )
        result = await agent.run(
            None if history else "go",
            message_history=history,
            deferred_tool_results=results,
            deps=self.deps,
        )
        return result.output, result.all_messages()

    async def call(self, tool: str, **arguments: Any) -> str:
        """Run one tool call through the agent and return what the model got back."""
        output, _ = await self.run([(tool, arguments)])
        assert isinstance(output, str)
        return output


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return tmp_path / "workspace"


@pytest.fixture
def turn(workspace: Path) -> Turn:
    return Turn(workspace)


def populate(
    workspace: Path,
    files: dict[str, str | bytes] | None = None,
    links: dict[str, str | Path] | None = None,
) -> Path:
    """Create the workspace with these files and symlinks; return its resolved path."""
    workspace.mkdir(parents=True, exist_ok=True)
    for name, content in (files or {}).items():
        target = workspace / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, encoding="utf-8")
    for name, points_to in (links or {}).items():
        (workspace / name).symlink_to(points_to)
    return workspace.resolve()


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie nobody reaped yet counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def wait_until_dead(pid: int, bound: float = 20.0) -> bool:
    deadline = time.monotonic() + bound
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


# --- happy paths ---------------------------------------------------------------------------


async def test_list_files_lists_one_level_sorted_with_kinds(turn: Turn, workspace: Path) -> None:
    populate(workspace, {"b.txt": "b", "sub/a.txt": "a"}, links={"link": "b.txt"})
    (workspace / "sub" / "deeper").mkdir()

    assert await turn.call("list_files") == "b.txt\nlink@\nsub/"
    assert await turn.call("list_files", path="sub") == "sub/a.txt\nsub/deeper/"
    assert await turn.call("list_files", path="sub/deeper") == "(folder sub/deeper is empty)"
    assert await turn.call("list_files", path="b.txt") == "path b.txt is not a folder"
    assert await turn.call("list_files", path="nope") == "folder nope does not exist"
    # Ordinary outcomes (errors the model is told about included) need no commit at once.
    assert turn.journal.stopped == [False] * 5


async def test_the_workspace_is_created_on_first_use(tmp_path: Path) -> None:
    workspace = tmp_path / "not" / "yet"
    turn = Turn(workspace)

    assert await turn.call("list_files") == "(folder . is empty)"
    assert workspace.is_dir()


async def test_read_file_returns_text_and_reports_what_it_cannot_read(
    turn: Turn, workspace: Path
) -> None:
    populate(workspace, {"notes.txt": "héllo\n", "bytes.bin": b"ok\xff", "folder/a": ""})

    assert await turn.call("read_file", path="notes.txt") == "héllo\n"
    assert await turn.call("read_file", path="bytes.bin") == "ok\ufffd"
    assert await turn.call("read_file", path="missing.txt") == "file missing.txt does not exist"
    assert await turn.call("read_file", path="folder") == "path folder is not a file"


async def test_write_file_creates_folders_and_counts_bytes(turn: Turn, workspace: Path) -> None:
    output = await turn.call("write_file", path="deep/er/file.txt", content="héllo")

    assert output == "wrote 6 bytes to deep/er/file.txt"
    assert (workspace / "deep" / "er" / "file.txt").read_text(encoding="utf-8") == "héllo"
    assert await turn.call("write_file", path="deep", content="x") == "path deep is a folder"


async def test_every_call_is_journaled_started_then_finished(turn: Turn) -> None:
    await turn.run([("write_file", {"path": "a.txt", "content": "hi"})], [("list_files", {})])

    assert turn.journal.records == [
        ("started", "call-0-0", "write_file", {"path": "a.txt", "content": "hi"}),
        ("finished", "call-0-0", "write_file", "wrote 2 bytes to a.txt"),
        # Defaults are filled in: the journal shows what really ran.
        ("started", "call-1-0", "list_files", {"path": "."}),
        ("finished", "call-1-0", "list_files", "a.txt"),
    ]


async def test_expected_errors_are_journaled_as_the_output(turn: Turn) -> None:
    output = await turn.call("read_file", path="missing.txt")

    assert turn.journal.records[-1] == ("finished", "call-0-0", "read_file", output)


async def test_a_file_system_refusal_is_the_output_without_server_paths(
    turn: Turn, workspace: Path
) -> None:
    output = await turn.call("write_file", path="x" * 300 + ".txt", content="x")

    assert output == "write_file failed: File name too long"
    assert str(workspace) not in output
    assert turn.journal.records[-1] == ("finished", "call-0-0", "write_file", output)


async def test_read_file_output_is_cut_and_says_so(workspace: Path) -> None:
    populate(workspace, {"big.txt": "x" * 500})
    turn = Turn(workspace, limits=ToolLimits(output_max_chars=100))

    output = await turn.call("read_file", path="big.txt")

    assert output == "x" * 100 + "\n... [output cut at 100 characters]"


# --- policies --------------------------------------------------------------------------------

ASK_WRITE = (ToolSetting("write_file", ToolPolicy.ASK),)
WRITE_A = ("write_file", {"path": "a.txt", "content": "from the model"})


async def test_ask_stops_the_run_before_the_tool_runs(workspace: Path) -> None:
    turn = Turn(workspace, tools=ASK_WRITE)

    output, _ = await turn.run([WRITE_A])

    assert isinstance(output, DeferredToolRequests)
    assert [(call.tool_name, call.args_as_dict()) for call in output.approvals] == [
        ("write_file", {"path": "a.txt", "content": "from the model"})
    ]
    assert turn.journal.records == []
    assert not (workspace / "a.txt").exists()


async def test_ask_runs_the_tool_once_approved(workspace: Path) -> None:
    turn = Turn(workspace, tools=ASK_WRITE)
    requests, history = await turn.run([WRITE_A])
    assert isinstance(requests, DeferredToolRequests)

    output, _ = await turn.run(
        [WRITE_A],
        history=history,
        results=DeferredToolResults(approvals={"call-0-0": True}),
    )

    assert output == "wrote 14 bytes to a.txt"
    assert (workspace / "a.txt").read_text() == "from the model"
    assert [record[:3] for record in turn.journal.records] == [
        ("started", "call-0-0", "write_file"),
        ("finished", "call-0-0", "write_file"),
    ]


async def test_an_approval_with_edited_arguments_runs_the_edit(workspace: Path) -> None:
    turn = Turn(workspace, tools=ASK_WRITE)
    _, history = await turn.run([WRITE_A])
    edited = {"path": "b.txt", "content": "edited"}

    output, _ = await turn.run(
        [WRITE_A],
        history=history,
        results=DeferredToolResults(approvals={"call-0-0": ToolApproved(override_args=edited)}),
    )

    assert output == "wrote 6 bytes to b.txt"
    assert (workspace / "b.txt").read_text() == "edited"
    assert not (workspace / "a.txt").exists()
    assert turn.journal.records[0] == ("started", "call-0-0", "write_file", edited)


async def test_a_rejected_call_never_runs(workspace: Path) -> None:
    turn = Turn(workspace, tools=ASK_WRITE)
    _, history = await turn.run([WRITE_A])

    output, _ = await turn.run(
        [WRITE_A],
        history=history,
        results=DeferredToolResults(approvals={"call-0-0": ToolDenied("no, thanks")}),
    )

    assert output == "no, thanks"
    assert turn.journal.records == []
    assert not (workspace / "a.txt").exists()


async def test_deny_refuses_without_running_and_journals_the_refusal(workspace: Path) -> None:
    turn = Turn(workspace, tools=(ToolSetting("shell", ToolPolicy.DENY),))
    refusal = "The tool shell is not allowed by this agent's policy."

    output = await turn.call("shell", command="touch marker")

    assert output == refusal
    assert not (workspace / "marker").exists()
    assert turn.journal.records == [
        ("started", "call-0-0", "shell", {"command": "touch marker"}),
        ("finished", "call-0-0", "shell", refusal),
    ]


async def test_a_denied_tool_is_still_shown_to_the_model(workspace: Path) -> None:
    seen: list[str] = []

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.extend(tool.name for tool in info.function_tools)
        return ModelResponse(parts=[TextPart("ok")])

    agent = Agent(
        FunctionModel(respond),
        deps_type=TurnDeps,
        toolsets=[build_toolset((ToolSetting("shell", ToolPolicy.DENY),))],
    )
    deps = TurnDeps(workspace=workspace, journal=RecordingJournal(), limits=ToolLimits())
    await agent.run("go", deps=deps)

    assert seen == ["shell"]


async def test_unknown_or_repeated_tools_are_invalid_input() -> None:
    with pytest.raises(InvalidInput, match=r"^unknown tool: nope; built-in tools are list_files"):
        build_toolset((ToolSetting("nope", ToolPolicy.AUTO),))
    with pytest.raises(InvalidInput, match="listed more than once"):
        build_toolset((ToolSetting("shell", ToolPolicy.AUTO), ToolSetting("shell", ToolPolicy.ASK)))


# --- path safety -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../x", "sub/../../../x"])
async def test_paths_that_leave_the_workspace_are_refused(
    turn: Turn, tmp_path: Path, path: str
) -> None:
    refused = f"path {path} is outside the workspace"

    assert await turn.call("read_file", path=path) == refused
    assert await turn.call("write_file", path=path, content="x") == refused
    assert await turn.call("list_files", path=path) == refused
    assert not (tmp_path / "x").exists()


async def test_a_symlink_to_etc_is_refused(turn: Turn, workspace: Path) -> None:
    populate(workspace, links={"etc": "/etc"})

    assert await turn.call("read_file", path="etc/hostname") == (
        "path etc/hostname is outside the workspace"
    )
    assert await turn.call("list_files", path="etc") == "path etc is outside the workspace"


async def test_a_symlinked_file_pointing_outside_is_refused(
    turn: Turn, workspace: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    populate(tmp_path, {"secret.txt": "secret"})
    populate(workspace, links={"link.txt": secret})

    assert await turn.call("read_file", path="link.txt") == "path link.txt is outside the workspace"
    assert await turn.call("write_file", path="link.txt", content="overwritten") == (
        "path link.txt is outside the workspace"
    )
    assert secret.read_text() == "secret"


async def test_a_symlinked_folder_in_the_middle_is_refused(
    turn: Turn, workspace: Path, tmp_path: Path
) -> None:
    outside = populate(tmp_path / "outside")
    populate(workspace, links={"mid": outside})

    assert await turn.call("write_file", path="mid/new/file.txt", content="x") == (
        "path mid/new/file.txt is outside the workspace"
    )
    assert list(outside.iterdir()) == []


async def test_a_symlink_inside_the_workspace_is_followed(turn: Turn, workspace: Path) -> None:
    populate(workspace, {"real/a.txt": "inside"}, links={"alias": "real"})

    assert await turn.call("read_file", path="alias/a.txt") == "inside"


async def test_a_symlink_made_by_a_command_is_refused(turn: Turn) -> None:
    output, _ = await turn.run(
        [("shell", {"command": "ln -s / root"})],
        [("read_file", {"path": "root/etc/hostname"})],
    )

    assert output == "path root/etc/hostname is outside the workspace"


async def test_a_symlink_loop_and_a_nul_byte_are_refused(turn: Turn, workspace: Path) -> None:
    populate(workspace, links={"loop": "loop"})

    assert (await turn.call("read_file", path="loop")).startswith("path loop cannot be resolved")
    assert await turn.call("read_file", path="a\x00b") == "path 'a\\x00b' contains a NUL byte"


# --- shell ---------------------------------------------------------------------------------------


async def test_shell_passes_shell_syntax_as_literal_arguments(turn: Turn, workspace: Path) -> None:
    assert await turn.call("shell", command="echo 'a;b' $HOME") == "a;b $HOME\n"
    assert await turn.call("shell", command="echo x; touch y") == "x; touch y\n"
    assert not (workspace / "y").exists()


async def test_shell_runs_in_the_workspace_with_a_minimal_environment(
    turn: Turn, workspace: Path
) -> None:
    root = populate(workspace)

    output = await turn.call("shell", command="env")

    assert sorted(output.splitlines()) == sorted(
        [
            f"HOME={root}",
            "LANG=C.UTF-8",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ]
    )
    assert await turn.call("shell", command="pwd") == f"{root}\n"


async def test_shell_interpreter_is_used_only_when_configured(workspace: Path) -> None:
    turn = Turn(workspace, limits=ToolLimits(shell_interpreter=True))
    root = populate(workspace)

    assert await turn.call("shell", command="echo $HOME; echo two") == f"{root}\ntwo\n"


async def test_shell_reports_a_non_zero_exit_with_stderr(turn: Turn) -> None:
    output = await turn.call("shell", command="sh -c 'echo out; echo err >&2; exit 3'")

    assert output == "exit code 3\nout\nerr\n"


async def test_shell_reports_what_it_cannot_run(turn: Turn) -> None:
    assert await turn.call("shell", command="no-such-command-xyz --flag") == (
        "command not found: no-such-command-xyz"
    )
    assert await turn.call("shell", command="") == "the command is empty"
    assert (await turn.call("shell", command="echo 'open")).startswith(
        "cannot split the command into arguments"
    )


async def test_shell_output_is_cut_and_says_so(workspace: Path) -> None:
    turn = Turn(workspace, limits=ToolLimits(output_max_chars=50))

    output = await turn.call("shell", command="seq 1 1000")

    full = "".join(f"{number}\n" for number in range(1, 1001))
    assert output == full[:50] + "\n... [output cut at 50 characters]"


async def test_shell_timeout_kills_the_whole_process_group(workspace: Path) -> None:
    turn = Turn(workspace, limits=ToolLimits(shell_timeout=0.5))
    started = time.monotonic()

    # sh is exec'd (no interpreter around it); it starts a background child and waits.
    output = await turn.call("shell", command="sh -c 'echo started; sleep 30 & echo $!; wait'")

    elapsed = time.monotonic() - started
    assert elapsed < 25, "the timeout did not stop the command"
    status, partial, child = output.splitlines()
    assert status == "timed out after 0.5 s; output so far:"
    assert partial == "started"
    assert await wait_until_dead(int(child)), "the background child survived the timeout"


async def test_a_plain_sleep_is_stopped_by_the_timeout(workspace: Path) -> None:
    turn = Turn(workspace, limits=ToolLimits(shell_timeout=0.5))
    started = time.monotonic()

    output = await turn.call("shell", command="sleep 30")

    assert time.monotonic() - started < 25
    assert output == "timed out after 0.5 s; output so far:\n"


async def test_background_processes_stop_when_the_command_ends(turn: Turn) -> None:
    started = time.monotonic()

    output = await turn.call("shell", command="sh -c 'sleep 30 & echo $!'")

    # Without stopping the group, the sleep would hold the output pipe for 30 s.
    assert time.monotonic() - started < 25
    assert await wait_until_dead(int(output))


async def test_a_cancelled_command_is_killed_and_its_call_still_finished(
    turn: Turn, workspace: Path
) -> None:
    run = asyncio.create_task(turn.run([("shell", {"command": "sh -c 'echo $$ > pid; sleep 30'"})]))
    pid_file = workspace / "pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline, "the command did not start"
        await asyncio.sleep(0.05)

    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run

    assert await wait_until_dead(int(pid_file.read_text()))
    assert [record[0] for record in turn.journal.records] == ["started", "finished"]
    assert turn.journal.records[-1][3] == "the tool shell was cancelled before it finished"
    assert turn.journal.stopped == [True]


async def test_an_unexpected_error_is_journaled_as_finished_and_raised(tmp_path: Path) -> None:
    # A workspace path no file system accepts: not an error a tool is expected to report.
    turn = Turn(tmp_path / "bad\x00name")

    with pytest.raises(ValueError, match="null byte"):
        await turn.call("list_files")

    assert [record[0] for record in turn.journal.records] == ["started", "finished"]
    assert turn.journal.records[-1][3].startswith(
        "the tool list_files failed unexpectedly: ValueError: embedded null byte"
    )
    assert turn.journal.stopped == [True]


# --- argument validation and descriptions ---------------------------------------------------------


def test_validate_tool_arguments_returns_plain_validated_arguments() -> None:
    assert validate_tool_arguments("write_file", {"path": "a", "content": "b"}) == {
        "path": "a",
        "content": "b",
    }
    assert validate_tool_arguments("list_files", {}) == {"path": "."}


def test_validate_tool_arguments_names_the_missing_field() -> None:
    with pytest.raises(
        InvalidInput, match=r"invalid arguments for tool write_file: content: Field"
    ):
        validate_tool_arguments("write_file", {"path": "a"})


def test_validate_tool_arguments_names_the_wrongly_typed_field() -> None:
    with pytest.raises(
        InvalidInput, match=r"shell: command: Input should be a valid string"
    ) as err:
        validate_tool_arguments("shell", {"command": 42})
    assert err.value.detail == [
        {"type": "string_type", "loc": ("command",), "msg": "Input should be a valid string"}
    ]


def test_validate_tool_arguments_refuses_unknown_fields_and_tools() -> None:
    with pytest.raises(InvalidInput, match="extra: Extra inputs are not permitted"):
        validate_tool_arguments("read_file", {"path": "a", "extra": 1})
    with pytest.raises(InvalidInput, match=r"^unknown tool: rm; built-in tools are"):
        validate_tool_arguments("rm", {})


def test_tool_descriptions_are_one_line_each() -> None:
    descriptions = tool_descriptions()

    assert set(descriptions) == BUILTIN_TOOLS
    assert all(text and "\n" not in text for text in descriptions.values())
    assert descriptions["shell"] == "Run a command in the workspace and return its combined output."
