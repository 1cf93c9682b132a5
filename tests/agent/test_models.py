"""Models by name: the offline demo model and OpenAI-compatible models, driven by a real Agent.

The OpenAI tests talk HTTP to ``tests.support.fake_openai`` on 127.0.0.1; nothing leaves the host.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic_ai import Agent, DeferredToolRequests, DeferredToolResults, ToolDenied
from pydantic_ai.direct import model_request
from pydantic_ai.exceptions import ModelHTTPError, ModelTimeoutError, UnexpectedModelBehavior
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    PartDeltaEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import Model, override_allow_model_requests
from pydantic_ai.models.openai import OpenAIChatModel

from countersign.agent.models import (
    LOCAL_SERVER_PLACEHOLDER_KEY,
    ModelOptions,
    describe_model_error,
    resolve_model,
    validate_model_name,
)
from countersign.domain.errors import InvalidInput
from tests.support.fake_openai import FakeOpenAI, error, hang, text, tool_call
from tests.support.postgres import free_port

pytestmark = pytest.mark.timeout(30)

API_KEY = "sk-test-0123456789abcdef"
FILES = "notes.txt\nplan.md"


@dataclass
class Turn:
    """What one agent run showed: the streamed text deltas, the output and the history."""

    deltas: list[str]
    output: Any
    messages: list[ModelMessage]
    tool_calls: list[ToolCallPart] = field(default_factory=list)


@dataclass
class Workspace:
    """The tools' side effects, so a test can see which tool ran with what."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def make_agent(
    model: Model, workspace: Workspace, *, with_approval: bool = False
) -> Agent[None, Any]:
    """An agent with ``list_files`` (and ``write_file`` needing approval when asked for)."""
    output_type: Any = [str, DeferredToolRequests] if with_approval else str
    agent: Agent[None, Any] = Agent(model, output_type=output_type)

    @agent.tool_plain
    def list_files(path: str = ".") -> str:
        """List the files in a folder of the workspace."""
        workspace.calls.append(("list_files", {"path": path}))
        return FILES

    if with_approval:

        @agent.tool_plain(requires_approval=True)
        def write_file(path: str, content: str) -> str:
            """Write a file in the workspace."""
            workspace.calls.append(("write_file", {"path": path, "content": content}))
            return f"wrote {path}"

    return agent


async def streamed(agent: Agent[None, Any], prompt: str | None, **run_options: Any) -> Turn:
    """Run the agent the way the runner does: ``agent.iter`` and ``node.stream`` per model call."""
    deltas: list[str] = []
    calls: list[ToolCallPart] = []
    async with agent.iter(prompt, **run_options) as run:
        async for node in run:
            if not Agent.is_model_request_node(node):
                continue
            async with node.stream(run.ctx) as stream:
                async for event in stream:
                    if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
                        deltas.append(event.part.content)
                    elif isinstance(event, PartDeltaEvent) and isinstance(
                        event.delta, TextPartDelta
                    ):
                        deltas.append(event.delta.content_delta)
                    elif isinstance(event, PartStartEvent) and isinstance(event.part, ToolCallPart):
                        calls.append(event.part)
    assert run.result is not None
    return Turn(deltas, run.result.output, run.result.all_messages(), calls)


def response_tool_calls(messages: list[ModelMessage]) -> list[ToolCallPart]:
    return [
        part
        for message in messages
        if isinstance(message, ModelResponse)
        for part in message.parts
        if isinstance(part, ToolCallPart)
    ]


@pytest.fixture
def demo() -> Model:
    return resolve_model("demo", ModelOptions())


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any attempt to open a connection or resolve a name fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo model tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    with override_allow_model_requests(False):
        yield


# --- the demo model ---------------------------------------------------------------------------


@pytest.mark.usefixtures("no_network")
async def test_demo_streams_the_message_back_one_word_per_delta(demo: Model) -> None:
    agent = make_agent(demo, Workspace())
    message = "Hello,  brave new\tworld \n"

    turn = await streamed(agent, message)

    assert turn.deltas == ["You", " said:", " Hello,", "  brave", " new", "\tworld \n"]
    assert "".join(turn.deltas) == turn.output == f"You said: {message}"
    assert (await agent.run(message)).output == turn.output
    assert demo.model_name == "demo"


@pytest.mark.parametrize("message", ["", "   ", "\n"])
async def test_demo_answers_an_empty_message_too(demo: Model, message: str) -> None:
    turn = await streamed(make_agent(demo, Workspace()), message)

    assert "".join(turn.deltas) == turn.output == f"You said: {message}"
    assert turn.deltas[0] == "You"


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(message=st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=80))
async def test_demo_deltas_are_single_words_that_add_up_exactly(demo: Model, message: str) -> None:
    assume(not message.strip().startswith("/tool"))
    agent = make_agent(demo, Workspace())

    turn = await streamed(agent, message)

    expected = f"You said: {message}"
    assert "".join(turn.deltas) == turn.output == expected
    assert len(turn.deltas) == len(re.findall(r"\S+", expected))
    assert all(re.fullmatch(r"\s*\S+", delta) for delta in turn.deltas[:-1])
    assert re.fullmatch(r"\s*\S+\s*", turn.deltas[-1])
    assert (await agent.run(message)).output == expected


@pytest.mark.usefixtures("no_network")
async def test_demo_tool_command_calls_the_tool_and_replies_with_its_output(demo: Model) -> None:
    workspace = Workspace()
    agent = make_agent(demo, workspace)

    turn = await streamed(agent, "/tool list_files {}")

    assert [(call.tool_name, call.args_as_dict()) for call in turn.tool_calls] == [
        ("list_files", {})
    ]
    assert turn.tool_calls[0].tool_call_id
    assert workspace.calls == [("list_files", {"path": "."})]
    assert turn.output == FILES
    assert turn.deltas == ["notes.txt", "\nplan.md"]


async def test_demo_tool_command_passes_the_arguments_and_each_call_gets_a_fresh_id(
    demo: Model,
) -> None:
    workspace = Workspace()
    agent = make_agent(demo, workspace)

    first = await agent.run('/tool list_files {"path": "docs"}')
    second = await streamed(agent, '  /tool   list_files{"path": "src"}  ')

    assert first.output == second.output == FILES
    assert workspace.calls == [("list_files", {"path": "docs"}), ("list_files", {"path": "src"})]
    ids = {call.tool_call_id for call in response_tool_calls(first.all_messages())}
    ids |= {call.tool_call_id for call in second.tool_calls}
    assert len(ids) == 2


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ('/tool list_files {"path": ', "are not valid JSON"),
        ("/tool list_files path=docs", "are not valid JSON"),
        ('/tool list_files ["docs"]', "must be a JSON object"),
        ("/tool", "Usage: /tool NAME {json arguments}"),
    ],
)
async def test_demo_bad_tool_command_answers_in_words_without_calling(
    demo: Model, message: str, expected: str
) -> None:
    workspace = Workspace()
    agent = make_agent(demo, workspace)

    turn = await streamed(agent, message)
    result = await agent.run(message)

    assert expected in turn.output
    assert result.output == turn.output == "".join(turn.deltas)
    assert turn.tool_calls == []
    assert response_tool_calls(result.all_messages()) == []
    assert workspace.calls == []


async def test_demo_names_an_unknown_tool_in_its_reply(demo: Model) -> None:
    turn = await streamed(make_agent(demo, Workspace()), "/tool delete_everything {}")

    assert "delete_everything" in turn.output
    assert "list_files" in turn.output


async def test_demo_a_denied_call_ends_with_the_denial_text(demo: Model) -> None:
    workspace = Workspace()
    agent = make_agent(demo, workspace, with_approval=True)

    paused = await streamed(agent, '/tool write_file {"path": "a.txt", "content": "hi"}')
    assert isinstance(paused.output, DeferredToolRequests)
    [request] = paused.output.approvals
    assert (request.tool_name, request.args_as_dict()) == (
        "write_file",
        {"path": "a.txt", "content": "hi"},
    )

    resumed = await streamed(
        agent,
        None,
        message_history=paused.messages,
        deferred_tool_results=DeferredToolResults(
            approvals={request.tool_call_id: ToolDenied("The user rejected writing a.txt.")}
        ),
    )

    assert resumed.output == "The user rejected writing a.txt."
    assert "".join(resumed.deltas) == resumed.output
    assert workspace.calls == []


async def test_demo_an_approved_call_runs_and_replies_with_the_result(demo: Model) -> None:
    workspace = Workspace()
    agent = make_agent(demo, workspace, with_approval=True)
    paused = await agent.run('/tool write_file {"path": "a.txt", "content": "hi"}')
    assert isinstance(paused.output, DeferredToolRequests)

    resumed = await agent.run(
        message_history=paused.all_messages(),
        deferred_tool_results=DeferredToolResults(
            approvals={paused.output.approvals[0].tool_call_id: True}
        ),
    )

    assert resumed.output == "wrote a.txt"
    assert workspace.calls == [("write_file", {"path": "a.txt", "content": "hi"})]


async def test_demo_joins_several_results_with_a_blank_line_in_order(demo: Model) -> None:
    history: list[ModelMessage] = [
        ModelRequest(parts=[UserPromptPart("do two things")]),
        ModelResponse(
            parts=[
                ToolCallPart("list_files", {}, tool_call_id="one"),
                ToolCallPart("write_file", {}, tool_call_id="two"),
            ]
        ),
        ModelRequest(
            parts=[
                ToolReturnPart("list_files", FILES, tool_call_id="one"),
                ToolReturnPart(
                    "write_file", "Rejected: not today.", tool_call_id="two", outcome="denied"
                ),
            ]
        ),
    ]

    response = await model_request(demo, history)

    assert response.parts == [TextPart(f"{FILES}\n\nRejected: not today.")]


# --- OpenAI-compatible models through the fake server ------------------------------------------


def openai_model(server: FakeOpenAI, **options: Any) -> Model:
    values: dict[str, Any] = {"openai_api_key": API_KEY, "openai_base_url": server.base_url}
    values.update(options)
    return resolve_model("openai:gpt-test", ModelOptions(**values))


async def test_openai_streams_text_deltas(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(text("Hello", " from", " the fake."))
    model = openai_model(fake_openai)

    async with model:
        turn = await streamed(make_agent(model, Workspace()), "Hi there")

    assert isinstance(model, OpenAIChatModel)
    assert turn.deltas == ["Hello", " from", " the fake."]
    assert turn.output == "Hello from the fake."
    [request] = fake_openai.requests
    assert request.path == "/v1/chat/completions"
    assert request.authorization == f"Bearer {API_KEY}"
    assert request.body["model"] == "gpt-test"
    assert request.body["stream"] is True
    assert request.messages[-1] == {"role": "user", "content": "Hi there"}


async def test_openai_runs_without_streaming(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(text("Hello", " again."))
    model = openai_model(fake_openai)

    async with model:
        result = await make_agent(model, Workspace()).run("Hi")

    assert result.output == "Hello again."
    assert not fake_openai.requests[0].body.get("stream")


async def test_openai_streamed_tool_call_runs_the_tool_then_answers(
    fake_openai: FakeOpenAI,
) -> None:
    fake_openai.script(
        tool_call("list_files", {"path": "docs"}, call_id="call_42", fragment_size=5),
        text("There are ", "two files."),
    )
    workspace = Workspace()
    model = openai_model(fake_openai)

    async with model:
        turn = await streamed(make_agent(model, workspace), "What is in docs?")

    assert workspace.calls == [("list_files", {"path": "docs"})]
    assert turn.output == "There are two files."
    first, second = fake_openai.requests
    [tool] = first.tools
    assert tool["type"] == "function"
    assert tool["function"]["name"] == "list_files"
    assert tool["function"]["description"] == "List the files in a folder of the workspace."
    assert tool["function"]["parameters"]["properties"] == {
        "path": {"default": ".", "type": "string"}
    }
    assert all(request.authorization == f"Bearer {API_KEY}" for request in (first, second))
    assistant, tool_answer = second.messages[-2:]
    assert assistant["tool_calls"][0]["id"] == "call_42"
    assert assistant["tool_calls"][0]["function"]["name"] == "list_files"
    assert tool_answer == {"role": "tool", "tool_call_id": "call_42", "content": FILES}


async def test_openai_non_streamed_tool_call(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(tool_call("list_files"), text("Done."))
    workspace = Workspace()
    model = openai_model(fake_openai)

    async with model:
        result = await make_agent(model, workspace).run("List")

    assert result.output == "Done."
    assert workspace.calls == [("list_files", {"path": "."})]


@pytest.mark.parametrize(
    ("status", "sentence"),
    [
        (401, "the model provider refused the API key (HTTP 401)"),
        (403, "the model provider refused the API key (HTTP 403)"),
        (429, "rate limit"),
        (
            500,
            "the model provider failed (HTTP 500): "
            "The server had an error while processing your request.",
        ),
    ],
    ids=["401", "403", "429", "500"],
)
@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "not-streamed"])
async def test_openai_error_status_becomes_one_sentence(
    fake_openai: FakeOpenAI, status: int, sentence: str, streaming: bool
) -> None:
    # OpenAI echoes (part of) the key in a 401 body; it must not reach the sentence.
    message = None if status == 500 else f"Incorrect API key provided: {API_KEY}."
    fake_openai.script(error(status, message))
    model = openai_model(fake_openai)
    agent = make_agent(model, Workspace())

    async with model:
        with pytest.raises(ModelHTTPError) as raised:
            await (streamed(agent, "Hi") if streaming else agent.run("Hi"))

    described = describe_model_error(raised.value)
    assert described is not None
    assert sentence in described
    assert f"(HTTP {status})" in described
    assert API_KEY not in described
    assert len(fake_openai.requests) == 1  # max_retries=0: the executor owns retrying


@pytest.mark.timeout(15)
@pytest.mark.parametrize("partial", [False, True], ids=["silent", "after-some-text"])
async def test_openai_hanging_server_times_out(fake_openai: FakeOpenAI, partial: bool) -> None:
    fake_openai.script(hang("Hel") if partial else hang())
    model = openai_model(fake_openai, timeout=0.5)
    started = time.monotonic()

    async with model:
        with pytest.raises(Exception) as raised:  # noqa: PT011 - the sentence is what matters
            await streamed(make_agent(model, Workspace()), "Hi")

    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 5, elapsed  # the model's timeout ended it, not the test's bound
    assert describe_model_error(raised.value) == "the model provider did not answer within 0.5 s"


async def test_openai_closed_port_cannot_be_reached() -> None:
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    model = resolve_model(
        "openai:gpt-test", ModelOptions(openai_api_key=API_KEY, openai_base_url=base_url)
    )

    async with model:
        with pytest.raises(Exception) as raised:  # noqa: PT011 - the sentence is what matters
            await make_agent(model, Workspace()).run("Hi")

    assert describe_model_error(raised.value) == f"cannot reach the model provider at {base_url}"


async def test_openai_base_url_without_key_sends_a_placeholder(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(text("ok"))
    model = resolve_model("openai:llama3.1:8b", ModelOptions(openai_base_url=fake_openai.base_url))

    async with model:
        result = await make_agent(model, Workspace()).run("Hi")

    assert result.output == "ok"
    [request] = fake_openai.requests
    assert request.authorization == f"Bearer {LOCAL_SERVER_PLACEHOLDER_KEY}"
    assert request.body["model"] == "llama3.1:8b"


def test_openai_without_key_or_base_url_is_refused() -> None:
    with pytest.raises(InvalidInput, match="COUNTERSIGN_OPENAI_API_KEY"):
        resolve_model("openai:gpt-4o", ModelOptions())
    with pytest.raises(InvalidInput, match="COUNTERSIGN_OPENAI_API_KEY"):
        resolve_model("openai:gpt-4o", ModelOptions(openai_api_key=""))


def test_openai_options_reach_the_model() -> None:
    model = resolve_model("openai:gpt-4o", ModelOptions(openai_api_key=API_KEY, timeout=7.5))

    assert isinstance(model, OpenAIChatModel)
    assert model.model_name == "gpt-4o"
    assert model.settings == {"timeout": 7.5, "max_retries": 0}
    assert model.base_url == "https://api.openai.com/v1/"
    assert API_KEY not in repr(ModelOptions(openai_api_key=API_KEY))


# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "normalised"),
    [
        ("demo", "demo"),
        (" Demo ", "demo"),
        ("openai:gpt-4o", "openai:gpt-4o"),
        ("OpenAI:gpt-4o-mini", "openai:gpt-4o-mini"),
        ("openai:llama3.1:8b", "openai:llama3.1:8b"),
        ("openai:Qwen/Qwen2.5-7B-Instruct", "openai:Qwen/Qwen2.5-7B-Instruct"),
    ],
)
def test_valid_model_names(name: str, normalised: str) -> None:
    assert validate_model_name(name) == normalised


@pytest.mark.parametrize(
    "name",
    [
        "",
        "   ",
        "gpt-4o",
        "demo2",
        "openai:",
        "openai: gpt-4o",
        "openai:gpt 4o",
        "openai:gpt-4o\x00",
        "mistral:mistral-large",
        "openai:" + "x" * 200,
    ],
)
def test_invalid_model_names_say_what_is_accepted(name: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        validate_model_name(name)

    assert '"demo"' in raised.value.message
    assert '"openai:<model>"' in raised.value.message
    with pytest.raises(InvalidInput):
        resolve_model(name, ModelOptions(openai_api_key=API_KEY))


# --- describing errors -------------------------------------------------------------------------


def test_errors_that_are_not_model_failures_are_not_described() -> None:
    assert describe_model_error(ValueError("bad")) is None
    assert describe_model_error(RuntimeError("boom")) is None
    assert describe_model_error(ExceptionGroup("many", [ValueError(), KeyError()])) is None


def test_description_walks_causes_and_exception_groups() -> None:
    http = ModelHTTPError(502, "gpt-test", {"message": "Bad gateway"})
    try:
        try:
            raise http
        except ModelHTTPError as inner:
            raise RuntimeError("the run failed") from inner
    except RuntimeError as outer:
        wrapped = outer

    expected = "the model provider failed (HTTP 502): Bad gateway"
    assert describe_model_error(wrapped) == expected
    assert describe_model_error(ExceptionGroup("run", [ValueError(), http])) == expected


def test_a_connect_timeout_says_the_provider_cannot_be_reached() -> None:
    timeouts = {"connect": 5.0, "read": 60.0, "write": 60.0, "pool": 60.0}
    request = httpx2.Request(
        "POST",
        "http://user:secret@10.0.0.1:8000/v1/chat/completions?key=abc",
        extensions={"timeout": timeouts},
    )
    error = ModelTimeoutError("gpt-test", "Request timed out.", phase="connect")
    error.__cause__ = openai.APITimeoutError(request=request)

    described = describe_model_error(error)

    assert described == "cannot reach the model provider at http://10.0.0.1:8000/v1 within 5 s"


def test_model_options_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="timeout"):
        ModelOptions(timeout=0)
    with pytest.raises(ValueError, match="max_retries"):
        ModelOptions(max_retries=-1)


def test_unusable_answers_and_echoed_keys() -> None:
    unusable = UnexpectedModelBehavior("Received empty model response")
    echoed = ModelHTTPError(400, "gpt-test", {"error": {"message": f"Bad key {API_KEY}"}})

    assert describe_model_error(unusable) == (
        "the model answered with something unusable: Received empty model response"
    )
    described = describe_model_error(echoed)
    assert described is not None
    assert described.startswith("the model provider rejected the request (HTTP 400)")
    assert API_KEY not in described
