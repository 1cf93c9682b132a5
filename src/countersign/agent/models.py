"""Models by name: the offline ``demo`` model, OpenAI-compatible models, and their failures.

A model name is ``demo`` or ``openai:<model>``. ``resolve_model`` turns a name into a real
pydantic-ai model, so the demo goes through the same agent code path as a provider does.
``describe_model_error`` turns a provider failure into one sentence a person can act on.

The ``demo`` model (SPEC, "The offline demo model") is deterministic and needs no network:

- a plain message ``m`` → the reply ``You said: m``, streamed one word per delta;
- ``/tool NAME {json}`` → one call of tool ``NAME`` with those arguments (``{}`` when omitted);
- a request carrying tool results (or retry feedback) → a reply with their text, blank-line
  separated, in the order of the parts.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import openai
from pydantic_ai.exceptions import (
    ModelAPIError,
    ModelAuthenticationError,
    ModelConnectionError,
    ModelHTTPError,
    ModelQuotaExceededError,
    ModelRequestTimeout,
    ModelTimeoutError,
    UnexpectedModelBehavior,
)
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    RetryFeedbackPart,
    RetryPromptPart,
    TextContent,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import Model
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.settings import ModelSettings

from countersign.domain.errors import InvalidInput

DEMO_MODEL: Final = "demo"
OPENAI_PREFIX: Final = "openai:"
DEFAULT_OPENAI_BASE_URL: Final = "https://api.openai.com/v1"
MAX_MODEL_NAME_LENGTH: Final = 200  # the width of the agents.model column
# Local OpenAI-compatible servers (Ollama, vLLM, llama.cpp) ignore the key, but the SDK wants one.
LOCAL_SERVER_PLACEHOLDER_KEY: Final = "not-needed-for-a-local-server"

_ACCEPTED_FORMS = '"demo" (the offline model) or "openai:<model>", e.g. "openai:gpt-4o"'
_TOOL_COMMAND = re.compile(r"/tool(?:\s+(?P<name>[^\s{]+)(?P<arguments>.*))?", re.DOTALL)
_WORD = re.compile(r"\s*\S+")
_SECRET_LOOKING = re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_\-*.]{4,}")
_MAX_DETAIL_LENGTH = 200
_MIN_CREDENTIAL_LENGTH = 4
"""Shorter "keys" are not secrets worth hiding, and would blank out ordinary words."""


@dataclass(frozen=True, slots=True)
class ModelOptions:
    """How to reach model providers; built from Settings by the composition root."""

    openai_api_key: str | None = field(default=None, repr=False)
    """Never shown in a repr or a log."""
    openai_base_url: str | None = None
    """Any OpenAI-compatible server (Ollama, vLLM, llama.cpp); OpenAI itself when unset."""
    timeout: float = 60.0
    """Seconds one model request may wait for the provider (per read, on a stream)."""
    max_retries: int = 0
    """Retries inside the provider SDK; 0 because the executor owns retrying."""

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {self.timeout}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, not {self.max_retries}")


def validate_model_name(name: str) -> str:
    """Return the normalised model name, or raise InvalidInput naming the accepted forms."""
    candidate = name.strip()
    if candidate.lower() == DEMO_MODEL:
        return DEMO_MODEL
    if candidate[: len(OPENAI_PREFIX)].lower() == OPENAI_PREFIX:
        model = candidate[len(OPENAI_PREFIX) :]
        normalised = OPENAI_PREFIX + model
        if (
            model
            and model.isprintable()
            and not any(character.isspace() for character in model)
            and len(normalised) <= MAX_MODEL_NAME_LENGTH
        ):
            return normalised
    shown = candidate if len(candidate) <= 60 else candidate[:57] + "..."
    raise InvalidInput(
        f"The model name {shown!r} is not accepted; use {_ACCEPTED_FORMS}, "
        f"without spaces and at most {MAX_MODEL_NAME_LENGTH} characters long.",
        detail={"model": shown},
    )


def resolve_model(name: str, options: ModelOptions) -> Model:
    """Return the pydantic-ai model for a model name (``demo`` or ``openai:<model>``)."""
    normalised = validate_model_name(name)
    if normalised == DEMO_MODEL:
        return demo_model()
    api_key = options.openai_api_key or None
    if api_key is None:
        if not options.openai_base_url:
            raise InvalidInput(
                f"The model {normalised!r} needs an OpenAI API key: set "
                "COUNTERSIGN_OPENAI_API_KEY, or COUNTERSIGN_OPENAI_BASE_URL for a local "
                "OpenAI-compatible server.",
                detail={"model": normalised},
            )
        api_key = LOCAL_SERVER_PLACEHOLDER_KEY
    # The provider owns its HTTP client, so ``async with model`` (or the agent) closes it. The base
    # URL is always explicit so that a stray OPENAI_BASE_URL in the environment changes nothing.
    provider = OpenAIProvider(
        base_url=options.openai_base_url or DEFAULT_OPENAI_BASE_URL, api_key=api_key
    )
    settings = ModelSettings(timeout=options.timeout, max_retries=options.max_retries)
    return OpenAIChatModel(
        normalised.removeprefix(OPENAI_PREFIX), provider=provider, settings=settings
    )


AgentModel: TypeAlias = Model
"""A model the runner can use, as the rest of the code names it."""


async def open_model(name: str, options: ModelOptions) -> Model:
    """``resolve_model``, entered: the model keeps its HTTP client until ``close_model``."""
    model = resolve_model(name, options)
    await model.__aenter__()
    return model


async def close_model(model: Model) -> None:
    """Close the HTTP client an opened model holds."""
    await model.__aexit__(None, None, None)


def demo_model() -> FunctionModel:
    """Return the offline, deterministic ``demo`` model (streamed and non-streamed paths)."""
    return FunctionModel(_demo_response, stream_function=_demo_stream, model_name=DEMO_MODEL)


def describe_model_error(error: BaseException) -> str | None:
    """Return one sentence for a model/provider failure, or None if ``error`` is not one."""
    for candidate in _error_chain(error):
        sentence = _describe_one(candidate)
        if sentence is not None:
            return _redact(sentence, credentials=_credentials_in(error))
    return None


# --- the demo model -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ToolCall:
    tool_name: str
    arguments: dict[str, Any]


def _demo_plan(messages: list[ModelMessage]) -> str | _ToolCall:
    """What the demo model answers to a conversation: reply text, or one tool call."""
    request = next((m for m in reversed(messages) if isinstance(m, ModelRequest)), None)
    if request is None:
        return "You said: "
    results = [text for part in request.parts if (text := _result_text(part)) is not None]
    if results:
        reply = "\n\n".join(results)
        return reply if reply.strip() else "(the tool returned no output)"
    prompts = [part for part in request.parts if isinstance(part, UserPromptPart)]
    message = _prompt_text(prompts[-1]) if prompts else ""
    command = _TOOL_COMMAND.fullmatch(message.strip())
    if command is None:
        return f"You said: {message}"
    return _tool_command(command.group("name"), (command.group("arguments") or "").strip())


def _tool_command(name: str | None, arguments: str) -> str | _ToolCall:
    if name is None:
        return "Usage: /tool NAME {json arguments}"
    if not arguments:
        return _ToolCall(name, {})
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError as error:
        return (
            f"The arguments for tool {name} are not valid JSON ({error.msg} at column "
            f"{error.colno}); write them as a JSON object, e.g. /tool {name} {{}}"
        )
    if not isinstance(parsed, dict):
        return f"The arguments for tool {name} must be a JSON object, e.g. /tool {name} {{}}"
    return _ToolCall(name, parsed)


def _result_text(part: object) -> str | None:
    """The text a tool result or retry feedback carries; None for any other request part."""
    if isinstance(part, ToolReturnPart):
        return part.model_response_str(wrap_if_error=False)
    if isinstance(part, RetryPromptPart | RetryFeedbackPart):
        return part.content if isinstance(part.content, str) else part.model_response()
    return None


def _prompt_text(part: UserPromptPart) -> str:
    if isinstance(part.content, str):
        return part.content
    return "".join(
        item if isinstance(item, str) else item.content
        for item in part.content
        if isinstance(item, str | TextContent)
    )


def _words(text: str) -> list[str]:
    """Split text into one-word chunks whose concatenation is exactly ``text``."""
    chunks = _WORD.findall(text)
    rest = text[sum(map(len, chunks)) :]  # trailing whitespace stays with the last word
    if not chunks:
        return [text]
    chunks[-1] += rest
    return chunks


def _new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex}"


async def _demo_response(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    plan = _demo_plan(messages)
    if isinstance(plan, _ToolCall):
        call = ToolCallPart(plan.tool_name, plan.arguments, tool_call_id=_new_tool_call_id())
        return ModelResponse(parts=[call])
    return ModelResponse(parts=[TextPart(plan)])


async def _demo_stream(
    messages: list[ModelMessage], info: AgentInfo
) -> AsyncIterator[str | DeltaToolCalls]:
    plan = _demo_plan(messages)
    if isinstance(plan, _ToolCall):
        call = DeltaToolCall(
            name=plan.tool_name,
            json_args=json.dumps(plan.arguments),
            tool_call_id=_new_tool_call_id(),
        )
        yield {0: call}
        return
    for word in _words(plan):
        yield word


# --- describing provider failures --------------------------------------------------------


def _error_chain(error: BaseException) -> Iterator[BaseException]:
    """The error, then its causes, contexts and grouped errors, outermost first, each once."""
    pending = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        if current.__cause__ is not None:
            pending.append(current.__cause__)
        if current.__context__ is not None:
            pending.append(current.__context__)


def _describe_one(error: BaseException) -> str | None:
    if isinstance(error, ModelHTTPError | openai.APIStatusError):
        return _describe_status(error, error.status_code, error.body)
    if isinstance(error, ModelRequestTimeout):
        return f"the model provider did not answer within {error.timeout:g} s"
    if isinstance(error, ModelConnectionError | openai.APIConnectionError):
        phase = error.phase if isinstance(error, ModelConnectionError) else None
        where = _provider_url(error)
        at = f" at {where}" if where else ""
        if isinstance(error, ModelTimeoutError | openai.APITimeoutError):
            if phase == "connect":
                return f"cannot reach the model provider{at}{_within(error, 'connect')}"
            return f"the model provider did not answer{_within(error, 'read') or ' in time'}"
        if phase in ("read", "write"):
            return f"the connection to the model provider{at} broke off"
        return f"cannot reach the model provider{at}"
    if isinstance(error, UnexpectedModelBehavior):
        return f"the model answered with something unusable: {_shorten(error.message)}"
    if isinstance(error, ModelAPIError):
        return f"the model provider failed: {_shorten(error.message)}"
    if isinstance(error, openai.APIError):
        return f"the model provider failed: {_shorten(error.message)}"
    return None


def _describe_status(error: BaseException, status: int, body: object) -> str:
    if status in (401, 403) or isinstance(error, ModelAuthenticationError):
        return f"the model provider refused the API key (HTTP {status})"
    if isinstance(error, ModelQuotaExceededError):
        return f"the model provider says the quota for this API key is used up (HTTP {status})"
    if status == 429:
        return f"the model provider's rate limit was hit; try again later (HTTP {status})"
    detail = _body_message(body)
    suffix = f": {detail}" if detail else ""
    if status >= 500:
        return f"the model provider failed (HTTP {status}){suffix}"
    return f"the model provider rejected the request (HTTP {status}){suffix}"


def _body_message(body: object) -> str:
    """The short human message inside an (OpenAI-style) error body."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            inner = inner.get("message")
        body = inner
    return _shorten(body) if isinstance(body, str) else ""


def _shorten(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _MAX_DETAIL_LENGTH else flat[: _MAX_DETAIL_LENGTH - 3] + "..."


def _redact(sentence: str, *, credentials: Iterable[str] = ()) -> str:
    """Hide the request's own credentials and anything else that looks like an API key, should
    a provider echo them back (a local server's key need not look like ``sk-...``)."""
    for credential in sorted(credentials, key=len, reverse=True):
        sentence = re.sub(rf"(?<![\w-]){re.escape(credential)}(?![\w-])", "[redacted]", sentence)
    return _SECRET_LOOKING.sub("[redacted]", sentence)


def _credentials_in(error: BaseException) -> set[str]:
    """The API keys the failed requests carried (Authorization or api-key headers)."""
    found: set[str] = set()
    for request in _requests_in(error):
        headers = getattr(request, "headers", None)
        if headers is None:
            continue
        for name in ("authorization", "api-key", "x-api-key"):
            value = str(headers.get(name) or "").strip()
            scheme, _, token = value.partition(" ")
            credential = token.strip() if scheme.lower() == "bearer" else value
            if len(credential) >= _MIN_CREDENTIAL_LENGTH:
                found.add(credential)
    return found


def _requests_in(error: BaseException) -> Iterator[Any]:
    """HTTP requests that the error or its causes carry (openai and httpx errors keep them)."""
    for candidate in _error_chain(error):
        try:
            request = getattr(candidate, "request", None)
        except RuntimeError:  # httpx raises when an error was made without a request
            continue
        if request is not None and hasattr(request, "url"):
            yield request


def _within(error: BaseException, phase: str) -> str:
    """`` within N s`` for the timeout of that phase of the failed request, or ``""``."""
    for request in _requests_in(error):
        timeouts = getattr(request, "extensions", {}).get("timeout")
        if isinstance(timeouts, dict) and isinstance(timeouts.get(phase), int | float):
            return f" within {timeouts[phase]:g} s"
    return ""


def _provider_url(error: BaseException) -> str | None:
    """The provider's base URL (no credentials, no query) from the failed request."""
    for request in _requests_in(error):
        parts = urlsplit(str(request.url))
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{host}:{parts.port}" if parts.port is not None else host
        path = parts.path
        for endpoint in ("/chat/completions", "/responses", "/completions", "/embeddings"):
            path = path.removesuffix(endpoint)
        return urlunsplit((parts.scheme, netloc, path.rstrip("/"), "", ""))
    return None
