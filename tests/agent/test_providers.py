"""``anthropic:MODEL`` and ``google:MODEL``: pydantic-ai's own models, driven by a real Agent.

Each provider talks HTTP to a fake of its API from ``tests.support.fake_providers`` on
127.0.0.1 (the Anthropic Messages API, the Gemini API); nothing leaves the host. Runs go the way
the runner drives them (``agent.iter`` and ``node.stream``), plus the non-streamed path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.models import Model
from pydantic_ai.models.anthropic import AnthropicModel
from pydantic_ai.models.google import GoogleModel

from countersign.agent.models import (
    DEFAULT_ANTHROPIC_BASE_URL,
    DEFAULT_GOOGLE_BASE_URL,
    ModelOptions,
    check_model,
    describe_model_error,
    resolve_model,
    validate_model_name,
)
from countersign.domain.errors import InvalidInput
from tests.agent.test_models import FILES, Workspace, make_agent, streamed
from tests.support.fake_openai import FakeServer
from tests.support.fake_providers import (
    FakeAnthropic,
    FakeGoogle,
    RecordedRequest,
    error,
    hang,
    text,
    tool_call,
)
from tests.support.postgres import free_port

pytestmark = pytest.mark.timeout(30)

API_KEY = "countersign-provider-key-Qw3Er4Ty5Ui6"
"""Not shaped like ``sk-...``: hiding it must come from knowing the request's credentials."""
MODEL = "test-model"


@dataclass(frozen=True)
class Provider:
    """One provider: its name, its fake, and how its wire format shows what the tests check."""

    name: str
    fake: type[FakeServer]
    model_class: type[Model]
    sent_key: Callable[[RecordedRequest], str | None]
    """The API key a request carried."""
    offered_tools: Callable[[RecordedRequest], list[dict[str, Any]]]
    """The tools a request offered, each as ``{name, description, parameters}``."""
    tool_result: Callable[[RecordedRequest], tuple[str, str]]
    """The (call id, text) of the tool result a request carried back."""
    streamed: Callable[[RecordedRequest], bool]

    def options(self, server: FakeServer | None = None, **overrides: Any) -> ModelOptions:
        values: dict[str, Any] = {f"{self.name}_api_key": API_KEY}
        if server is not None:
            values[f"{self.name}_base_url"] = server.base_url
        values.update(overrides)
        return ModelOptions(**values)

    def model(self, server: FakeServer, **overrides: Any) -> Model:
        return resolve_model(f"{self.name}:{MODEL}", self.options(server, **overrides))


def _anthropic_key(request: RecordedRequest) -> str | None:
    # The SDK sends the key as ``x-api-key`` or as a Bearer token, depending on its version.
    authorization = request.authorization or ""
    return request.headers.get("x-api-key") or authorization.removeprefix("Bearer ") or None


def _anthropic_tools(request: RecordedRequest) -> list[dict[str, Any]]:
    return [
        {"name": t["name"], "description": t["description"], "parameters": t["input_schema"]}
        for t in request.body["tools"]
    ]


def _anthropic_tool_result(request: RecordedRequest) -> tuple[str, str]:
    [block] = request.body["messages"][-1]["content"]
    assert block["type"] == "tool_result"
    content = block["content"]
    text = content if isinstance(content, str) else "".join(part["text"] for part in content)
    return block["tool_use_id"], text


def _google_tools(request: RecordedRequest) -> list[dict[str, Any]]:
    return [
        {
            "name": declaration["name"],
            "description": declaration["description"],
            "parameters": declaration.get("parameters_json_schema")
            or declaration.get("parametersJsonSchema")
            or declaration.get("parameters"),
        }
        for tool in request.body["tools"]
        for declaration in tool.get("functionDeclarations", [])
    ]


def _google_tool_result(request: RecordedRequest) -> tuple[str, str]:
    [part] = request.body["contents"][-1]["parts"]
    response = part["functionResponse"]
    return response["id"], response["response"]["return_value"]


ANTHROPIC = Provider(
    name="anthropic",
    fake=FakeAnthropic,
    model_class=AnthropicModel,
    sent_key=_anthropic_key,
    offered_tools=_anthropic_tools,
    tool_result=_anthropic_tool_result,
    streamed=lambda request: bool(request.body.get("stream")),
)
GOOGLE = Provider(
    name="google",
    fake=FakeGoogle,
    model_class=GoogleModel,
    sent_key=lambda request: request.headers.get("x-goog-api-key"),
    offered_tools=_google_tools,
    tool_result=_google_tool_result,
    streamed=lambda request: ":streamGenerateContent" in request.path,
)


@pytest.fixture(params=[ANTHROPIC, GOOGLE], ids=lambda provider: provider.name)
def provider(request: pytest.FixtureRequest) -> Provider:
    chosen: Provider = request.param
    return chosen


@pytest.fixture
def server(provider: Provider) -> Iterator[FakeServer]:
    with provider.fake() as fake:
        yield fake


# --- runs against the fake APIs --------------------------------------------------------------


async def test_streams_text_deltas(provider: Provider, server: FakeServer) -> None:
    server.script(text("Hello", " from", " the fake."))
    model = provider.model(server)

    async with model:
        turn = await streamed(make_agent(model, Workspace()), "Hi there")

    assert isinstance(model, provider.model_class)
    assert turn.deltas == ["Hello", " from", " the fake."]
    assert turn.output == "Hello from the fake."
    [request] = server.requests
    assert provider.streamed(request)
    assert provider.sent_key(request) == API_KEY
    if provider is ANTHROPIC:
        assert request.path == "/v1/messages"
        assert request.body["model"] == MODEL
        assert request.body["messages"][-1]["content"][-1]["text"] == "Hi there"
    else:
        assert request.path == f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
        assert request.body["contents"][-1]["parts"] == [{"text": "Hi there"}]


async def test_runs_without_streaming(provider: Provider, server: FakeServer) -> None:
    server.script(text("Hello", " again."))
    model = provider.model(server)

    async with model:
        result = await make_agent(model, Workspace()).run("Hi")

    assert result.output == "Hello again."
    [request] = server.requests
    assert not provider.streamed(request)
    assert provider.sent_key(request) == API_KEY


async def test_streamed_tool_call_runs_the_tool_then_answers(
    provider: Provider, server: FakeServer
) -> None:
    server.script(
        tool_call("list_files", {"path": "docs"}, call_id="call_42", fragment_size=5),
        text("There are ", "two files."),
    )
    workspace = Workspace()
    model = provider.model(server)

    async with model:
        turn = await streamed(make_agent(model, workspace), "What is in docs?")

    assert workspace.calls == [("list_files", {"path": "docs"})]
    assert [call.tool_name for call in turn.tool_calls] == ["list_files"]
    assert turn.output == "There are two files."
    assert "".join(turn.deltas) == "There are two files."
    first, second = server.requests
    [tool] = provider.offered_tools(first)
    assert tool["name"] == "list_files"
    assert tool["description"] == "List the files in a folder of the workspace."
    assert tool["parameters"]["properties"] == {"path": {"default": ".", "type": "string"}}
    assert provider.tool_result(second) == ("call_42", FILES)
    assert all(provider.sent_key(request) == API_KEY for request in (first, second))


async def test_non_streamed_tool_call(provider: Provider, server: FakeServer) -> None:
    server.script(tool_call("list_files"), text("Done."))
    workspace = Workspace()
    model = provider.model(server)

    async with model:
        result = await make_agent(model, workspace).run("List")

    assert result.output == "Done."
    assert workspace.calls == [("list_files", {"path": "."})]


@pytest.mark.parametrize(
    ("status", "sentence"),
    [
        (401, "the model provider refused the API key (HTTP 401)"),
        (403, "the model provider refused the API key (HTTP 403)"),
        (429, "the model provider's rate limit was hit; try again later (HTTP 429)"),
        (500, "the model provider failed (HTTP 500): The provider broke with key [redacted]."),
    ],
    ids=["401", "403", "429", "500"],
)
@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "not-streamed"])
async def test_error_status_becomes_one_sentence_without_the_key(
    provider: Provider, server: FakeServer, status: int, sentence: str, streaming: bool
) -> None:
    # Providers may echo the key in an error message; it must not reach the sentence.
    message = "The provider broke with key {}." if status == 500 else "Bad key {}."
    server.script(error(status, message.format(API_KEY)))
    model = provider.model(server)
    agent = make_agent(model, Workspace())

    async with model:
        with pytest.raises(ModelHTTPError) as raised:
            await (streamed(agent, "Hi") if streaming else agent.run("Hi"))

    assert describe_model_error(raised.value) == sentence
    assert len(server.requests) == 1  # max_retries=0: the executor owns retrying


@pytest.mark.timeout(15)
@pytest.mark.parametrize("partial", [False, True], ids=["silent", "after-some-text"])
async def test_hanging_server_times_out(
    provider: Provider, server: FakeServer, partial: bool
) -> None:
    server.script(hang("Hel") if partial else hang())
    model = provider.model(server, timeout=0.5)
    started = time.monotonic()

    async with model:
        with pytest.raises(Exception) as raised:  # noqa: PT011 - the sentence is what matters
            await streamed(make_agent(model, Workspace()), "Hi")

    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 5, elapsed  # the model's timeout ended it, not the test's bound
    assert describe_model_error(raised.value) == "the model provider did not answer within 0.5 s"
    assert len(server.requests) == 1


async def test_closed_port_cannot_be_reached(provider: Provider) -> None:
    base_url = f"http://127.0.0.1:{free_port()}"
    options = provider.options(**{f"{provider.name}_base_url": base_url})
    model = resolve_model(f"{provider.name}:{MODEL}", options)

    async with model:
        with pytest.raises(Exception) as raised:  # noqa: PT011 - the sentence is what matters
            await make_agent(model, Workspace()).run("Hi")

    assert describe_model_error(raised.value) == f"cannot reach the model provider at {base_url}"


# --- options, keys and extras ----------------------------------------------------------------


def test_options_reach_the_model_and_the_environment_changes_nothing(
    provider: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The SDKs read these when they are given nothing; Countersign always gives them its own.
    for variable in ("ANTHROPIC_BASE_URL", "GOOGLE_GEMINI_BASE_URL"):
        monkeypatch.setenv(variable, "http://elsewhere.invalid")
    for variable in ("ANTHROPIC_API_KEY", "GOOGLE_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.setenv(variable, "key-from-the-environment")

    model = resolve_model(f"{provider.name}:{MODEL}", provider.options(timeout=7.5))

    assert isinstance(model, provider.model_class)
    assert model.model_name == MODEL
    assert model.settings == {"timeout": 7.5, "max_retries": 0}
    default = DEFAULT_ANTHROPIC_BASE_URL if provider is ANTHROPIC else DEFAULT_GOOGLE_BASE_URL
    assert model.base_url.rstrip("/") == default.rstrip("/")
    with pytest.raises(InvalidInput):
        resolve_model(f"{provider.name}:{MODEL}", ModelOptions())


def test_keys_never_show_in_the_options_repr() -> None:
    options = ModelOptions(
        openai_api_key="openai-Secret-1",
        anthropic_api_key="anthropic-Secret-2",
        anthropic_base_url="http://127.0.0.1:1",
        google_api_key="google-Secret-3",
        google_base_url="http://127.0.0.1:2",
    )

    shown = repr(options)
    assert "Secret" not in shown
    assert "http://127.0.0.1:1" in shown
    assert "http://127.0.0.1:2" in shown


@pytest.mark.parametrize("key", [None, ""], ids=["unset", "empty"])
def test_a_missing_key_is_one_sentence_naming_the_setting(provider: Provider, key: Any) -> None:
    name = f"{provider.name}:{MODEL}"
    options = ModelOptions(**{f"{provider.name}_api_key": key, "openai_api_key": API_KEY})
    setting = f"COUNTERSIGN_{provider.name.upper()}_API_KEY"

    for call in (check_model, resolve_model):
        with pytest.raises(InvalidInput) as raised:
            call(name, options)
        a_key = "an Anthropic API key" if provider is ANTHROPIC else "a Google API key"
        assert raised.value.message == f"The model {name!r} needs {a_key}: set {setting}."


def test_check_model_accepts_what_it_can_use() -> None:
    options = ModelOptions(anthropic_api_key=API_KEY, google_api_key=API_KEY)

    assert check_model(" Anthropic:claude-sonnet-4-5 ", options) == "anthropic:claude-sonnet-4-5"
    assert check_model("GOOGLE:gemini-2.5-flash", options) == "google:gemini-2.5-flash"
    assert check_model("demo", ModelOptions()) == "demo"
    assert check_model("openai:llama3", ModelOptions(openai_base_url="http://127.0.0.1:1/v1"))
    with pytest.raises(InvalidInput, match="COUNTERSIGN_OPENAI_API_KEY"):
        check_model("openai:gpt-4o", options)


_WITHOUT_EXTRA = textwrap.dedent(
    """
    import json, sys
    sys.modules[sys.argv[1]] = None  # as if the package were not installed
    from countersign.agent.models import ModelOptions, check_model, resolve_model
    from countersign.app import create_app
    from countersign.config import Settings
    from countersign.domain.errors import ConfigError, InvalidInput

    name = sys.argv[2] + ":some-model"
    options = ModelOptions(anthropic_api_key="k" * 8, google_api_key="k" * 8)
    messages = []
    for call in (check_model, resolve_model):
        try:
            call(name, options)
        except InvalidInput as error:
            messages.append(error.message)
    settings = Settings(
        _env_file=None, default_model=name, anthropic_api_key="k" * 8, google_api_key="k" * 8
    )
    try:
        create_app(settings)
    except ConfigError as error:
        messages.append(str(error))
    print(json.dumps(messages))
    """
)


@pytest.mark.parametrize(
    ("hidden", "provider_name", "label"),
    [("anthropic", "anthropic", "Anthropic"), ("google.genai", "google", "Google")],
    ids=["anthropic", "google"],
)
def test_a_missing_extra_is_one_sentence_naming_the_pip_install(
    hidden: str, provider_name: str, label: str
) -> None:
    """Run in a process of its own where the SDK cannot be imported; nothing is mocked."""
    finished = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRA, hidden, provider_name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert finished.returncode == 0, finished.stderr
    check, resolve, start_up = json.loads(finished.stdout)
    expected = (
        f"The model '{provider_name}:some-model' needs {label} support, which is not "
        f'installed: pip install "countersign[{provider_name}]".'
    )
    assert check == resolve == expected
    assert start_up == (
        "COUNTERSIGN_DEFAULT_MODEL cannot be used: " + expected[:1].lower() + expected[1:]
    )


# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "normalised"),
    [
        ("anthropic:claude-sonnet-4-5", "anthropic:claude-sonnet-4-5"),
        (" Anthropic:claude-3-5-haiku-latest ", "anthropic:claude-3-5-haiku-latest"),
        ("ANTHROPIC:Claude-Opus", "anthropic:Claude-Opus"),
        ("google:gemini-2.5-flash", "google:gemini-2.5-flash"),
        ("Google:gemini-2.5-pro-preview-05-06", "google:gemini-2.5-pro-preview-05-06"),
        ("google:models/gemini-2.0-flash", "google:models/gemini-2.0-flash"),
        ("google:" + "g" * 193, "google:" + "g" * 193),
    ],
)
def test_valid_provider_model_names(name: str, normalised: str) -> None:
    assert validate_model_name(name) == normalised


@pytest.mark.parametrize(
    "name",
    [
        "anthropic:",
        "google:",
        "anthropic: claude-sonnet-4-5",
        "anthropic:claude sonnet",
        "google:gemini-2.5-flash\x00",
        "google:gemini\t2",
        "google:" + "g" * 194,
        "claude-sonnet-4-5",
        "gemini:gemini-2.5-flash",
        "anthropic/claude-sonnet-4-5",
    ],
)
def test_invalid_provider_model_names_say_what_is_accepted(name: str) -> None:
    options = ModelOptions(anthropic_api_key=API_KEY, google_api_key=API_KEY)
    for call in (validate_model_name, lambda name: check_model(name, options)):
        with pytest.raises(InvalidInput) as raised:
            call(name)
        for form in ('"demo"', '"openai:<model>"', '"anthropic:<model>"', '"google:<model>"'):
            assert form in raised.value.message


# --- describing failures -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        (
            f"https://generativelanguage.googleapis.com/v1beta/models/m:generateContent?key={API_KEY}",
            {},
        ),
        (
            "https://generativelanguage.googleapis.com/v1beta/models/m:generateContent",
            {"x-goog-api-key": API_KEY},
        ),
        ("https://api.anthropic.com/v1/messages", {"x-api-key": API_KEY}),
        ("https://api.anthropic.com/v1/messages", {"authorization": f"Bearer {API_KEY}"}),
    ],
    ids=["google-key-parameter", "google-key-header", "anthropic-x-api-key", "bearer"],
)
def test_the_requests_own_key_is_hidden_however_it_was_sent(
    url: str, headers: dict[str, str]
) -> None:
    request = httpx2.Request("POST", url, headers=headers)
    response = httpx2.Response(500, request=request)
    error = ModelHTTPError(500, "m", {"error": {"message": f"Internal error for {API_KEY}"}})
    error.__cause__ = httpx2.HTTPStatusError("Server error", request=request, response=response)

    described = describe_model_error(error)

    assert described == "the model provider failed (HTTP 500): Internal error for [redacted]"
