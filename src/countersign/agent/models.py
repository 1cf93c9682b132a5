"""Models by name: the offline ``demo`` model, provider models, and their failures.

A model name is ``demo``, ``openai:<model>`` (OpenAI or any OpenAI-compatible server),
``anthropic:<model>`` or ``google:<model>`` (the Gemini API). ``check_model`` says whether this
server can use a name (its provider's key is set, its optional extra installed);
``resolve_model`` turns a name into a real pydantic-ai model, so the demo goes through the same
agent code path as a provider does. ``describe_model_error`` turns a provider failure into one
sentence a person can act on.

The ``demo`` model (SPEC, "The offline demo model") is deterministic and needs no network:

- a plain message ``m`` → the reply ``You said: m``, streamed one word per delta;
- ``/tool NAME {json}`` → one call of tool ``NAME`` with those arguments (``{}`` when omitted);
- a request carrying tool results (or retry feedback) → a reply with their text, blank-line
  separated, in the order of the parts.
"""

from __future__ import annotations

import importlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias
from urllib.parse import parse_qsl, urlsplit, urlunsplit

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
ANTHROPIC_PREFIX: Final = "anthropic:"
GOOGLE_PREFIX: Final = "google:"
DEFAULT_OPENAI_BASE_URL: Final = "https://api.openai.com/v1"
DEFAULT_ANTHROPIC_BASE_URL: Final = "https://api.anthropic.com"
DEFAULT_GOOGLE_BASE_URL: Final = "https://generativelanguage.googleapis.com/"
MAX_MODEL_NAME_LENGTH: Final = 200  # the width of the agents.model column
# Local OpenAI-compatible servers (Ollama, vLLM, llama.cpp) ignore the key, but the SDK wants one.
LOCAL_SERVER_PLACEHOLDER_KEY: Final = "not-needed-for-a-local-server"

_ACCEPTED_FORMS = (
    '"demo" (the offline model), "openai:<model>", "anthropic:<model>" or "google:<model>", '
    'e.g. "openai:gpt-4o", "anthropic:claude-sonnet-4-5" or "google:gemini-2.5-flash"'
)
_TOOL_COMMAND = re.compile(r"/tool(?:\s+(?P<name>[^\s{]+)(?P<arguments>.*))?", re.DOTALL)
_WORD = re.compile(r"\s*\S+")
# OpenAI-style keys (sk-…, also Anthropic's sk-ant-…) and Google API keys (AIza…).
_SECRET_LOOKING = re.compile(r"\b(?:(?:sk|pk|rk)-[A-Za-z0-9_\-*.]{4,}|AIza[0-9A-Za-z_\-]{20,})")
_MAX_DETAIL_LENGTH = 200
_CREDENTIAL_HEADERS: Final = ("authorization", "api-key", "x-api-key", "x-goog-api-key")
_ENDPOINT = re.compile(
    r"(?:/chat/completions|/responses|/completions|/embeddings"  # OpenAI (after the base URL)
    r"|/v1/messages(?:/count_tokens)?"  # Anthropic
    r"|/v1\w*/models/[^/]+:\w+)$"  # Google: /v1beta/models/MODEL:streamGenerateContent
)
"""The endpoint a provider's SDK appends to its base URL, so an error can name the base URL."""
_MIN_CREDENTIAL_LENGTH = 4
"""Shorter "keys" are not secrets worth hiding, and would blank out ordinary words."""


@dataclass(frozen=True, slots=True)
class ModelOptions:
    """How to reach model providers; built from Settings by the composition root."""

    openai_api_key: str | None = field(default=None, repr=False)
    """Never shown in a repr or a log."""
    openai_base_url: str | None = None
    """Any OpenAI-compatible server (Ollama, vLLM, llama.cpp); OpenAI itself when unset."""
    anthropic_api_key: str | None = field(default=None, repr=False)
    """Never shown in a repr or a log."""
    anthropic_base_url: str | None = None
    """Another address of the Anthropic Messages API (a proxy); Anthropic itself when unset."""
    google_api_key: str | None = field(default=None, repr=False)
    """Never shown in a repr or a log."""
    google_base_url: str | None = None
    """Another address of the Gemini API (a proxy); Google itself when unset."""
    timeout: float = 60.0
    """Seconds one model request may wait for the provider (per read, on a stream)."""
    max_retries: int = 0
    """Retries inside the provider SDK; 0 because the executor owns retrying."""

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {self.timeout}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, not {self.max_retries}")


@dataclass(frozen=True, slots=True)
class _Provider:
    """A provider that needs an optional extra of Countersign (pydantic-ai's SDK glue)."""

    label: str
    extra: str
    modules: tuple[str, ...]
    key_setting: str
    a_key: str
    """How a sentence names its key: "an Anthropic API key"."""


_ANTHROPIC = _Provider(
    label="Anthropic",
    extra="anthropic",
    modules=("pydantic_ai.models.anthropic", "pydantic_ai.providers.anthropic"),
    key_setting="COUNTERSIGN_ANTHROPIC_API_KEY",
    a_key="an Anthropic API key",
)
_GOOGLE = _Provider(
    label="Google",
    extra="google",
    modules=("pydantic_ai.models.google", "pydantic_ai.providers.google"),
    key_setting="COUNTERSIGN_GOOGLE_API_KEY",
    a_key="a Google API key",
)
_PREFIXES: Final = (OPENAI_PREFIX, ANTHROPIC_PREFIX, GOOGLE_PREFIX)


def validate_model_name(name: str) -> str:
    """Return the normalised model name, or raise InvalidInput naming the accepted forms.

    Only the form is checked; ``check_model`` also checks that this server can use it.
    """
    candidate = name.strip()
    if candidate.lower() == DEMO_MODEL:
        return DEMO_MODEL
    for prefix in _PREFIXES:
        if candidate[: len(prefix)].lower() != prefix:
            continue
        model = candidate[len(prefix) :]
        normalised = prefix + model
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


def check_model(name: str, options: ModelOptions) -> str:
    """Return the normalised name of a model this server can use, or raise InvalidInput with
    one sentence saying why not: a name of no accepted form, its provider's API key not set, or
    the optional extra its provider needs not installed."""
    normalised = validate_model_name(name)
    if normalised.startswith(OPENAI_PREFIX):
        _openai_key(normalised, options)
    elif normalised.startswith(ANTHROPIC_PREFIX):
        _require_extra(_ANTHROPIC, normalised)
        _required_key(_ANTHROPIC, normalised, options.anthropic_api_key)
    elif normalised.startswith(GOOGLE_PREFIX):
        _require_extra(_GOOGLE, normalised)
        _required_key(_GOOGLE, normalised, options.google_api_key)
    return normalised


def resolve_model(name: str, options: ModelOptions) -> Model:
    """Return the pydantic-ai model for a model name; InvalidInput as ``check_model`` says."""
    normalised = check_model(name, options)
    if normalised == DEMO_MODEL:
        return demo_model()
    # Each provider owns its HTTP client, so ``async with model`` (or the agent) closes it. Base
    # URLs are always explicit so that a stray OPENAI_BASE_URL, ANTHROPIC_BASE_URL or
    # GOOGLE_GEMINI_BASE_URL in the environment changes nothing; keys are explicit too.
    settings = ModelSettings(timeout=options.timeout, max_retries=options.max_retries)
    if normalised.startswith(ANTHROPIC_PREFIX):
        return _anthropic_model(normalised.removeprefix(ANTHROPIC_PREFIX), options, settings)
    if normalised.startswith(GOOGLE_PREFIX):
        return _google_model(normalised.removeprefix(GOOGLE_PREFIX), options, settings)
    provider = OpenAIProvider(
        base_url=options.openai_base_url or DEFAULT_OPENAI_BASE_URL,
        api_key=_openai_key(normalised, options),
    )
    return OpenAIChatModel(
        normalised.removeprefix(OPENAI_PREFIX), provider=provider, settings=settings
    )


def _openai_key(normalised: str, options: ModelOptions) -> str:
    """The key to send to the OpenAI-compatible server (a placeholder for a local one)."""
    api_key = options.openai_api_key or None
    if api_key is not None:
        return api_key
    if not options.openai_base_url:
        raise InvalidInput(
            f"The model {normalised!r} needs an OpenAI API key: set "
            "COUNTERSIGN_OPENAI_API_KEY, or COUNTERSIGN_OPENAI_BASE_URL for a local "
            "OpenAI-compatible server.",
            detail={"model": normalised},
        )
    return LOCAL_SERVER_PLACEHOLDER_KEY


def _required_key(provider: _Provider, normalised: str, api_key: str | None) -> str:
    if not api_key:
        raise InvalidInput(
            f"The model {normalised!r} needs {provider.a_key}: set {provider.key_setting}.",
            detail={"model": normalised},
        )
    return api_key


def _require_extra(provider: _Provider, normalised: str) -> None:
    """InvalidInput when the SDK the provider needs is not installed (an optional extra)."""
    try:
        for module in provider.modules:
            importlib.import_module(module)
    except ImportError:
        raise InvalidInput(
            f"The model {normalised!r} needs {provider.label} support, which is not installed: "
            f'pip install "countersign[{provider.extra}]".',
            detail={"model": normalised, "extra": provider.extra},
        ) from None


def _anthropic_model(model: str, options: ModelOptions, settings: ModelSettings) -> Model:
    from pydantic_ai.models.anthropic import AnthropicModel
    from pydantic_ai.providers.anthropic import AnthropicProvider

    provider = AnthropicProvider(
        api_key=_required_key(_ANTHROPIC, ANTHROPIC_PREFIX + model, options.anthropic_api_key),
        base_url=options.anthropic_base_url or DEFAULT_ANTHROPIC_BASE_URL,
    )
    return AnthropicModel(model, provider=provider, settings=settings)


def _google_model(model: str, options: ModelOptions, settings: ModelSettings) -> Model:
    from pydantic_ai.models.google import GoogleModel
    from pydantic_ai.providers.google import GoogleProvider

    provider = GoogleProvider(
        api_key=_required_key(_GOOGLE, GOOGLE_PREFIX + model, options.google_api_key),
        base_url=options.google_base_url or DEFAULT_GOOGLE_BASE_URL,
    )
    return GoogleModel(model, provider=provider, settings=settings)


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
    """The API keys the failed requests carried: the Authorization, api-key (Azure), x-api-key
    (Anthropic) or x-goog-api-key (Google) header, or a ``key=`` query parameter (Google)."""
    found: set[str] = set()
    for request in _requests_in(error):
        query = parse_qsl(urlsplit(str(request.url)).query)
        candidates = [value for name, value in query if name == "key"]
        headers = getattr(request, "headers", None)
        if headers is not None:
            for name in _CREDENTIAL_HEADERS:
                value = str(headers.get(name) or "").strip()
                scheme, _, token = value.partition(" ")
                candidates.append(token.strip() if scheme.lower() == "bearer" else value)
        found.update(
            credential.strip()
            for credential in candidates
            if len(credential.strip()) >= _MIN_CREDENTIAL_LENGTH
        )
    return found


def _requests_in(error: BaseException) -> Iterator[Any]:
    """HTTP requests that the error or its causes carry: openai, anthropic and httpx errors keep
    them, google-genai errors keep the response (which keeps its request)."""
    for candidate in _error_chain(error):
        request = _attribute(candidate, "request")
        if request is None:
            request = _attribute(_attribute(candidate, "response"), "request")
        if request is not None and hasattr(request, "url"):
            yield request


def _attribute(holder: object, name: str) -> Any:
    try:
        return getattr(holder, name, None)
    except RuntimeError:  # httpx raises when an error was made without a request or response
        return None


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
        path = _ENDPOINT.sub("", parts.path)
        return urlunsplit((parts.scheme, netloc, path.rstrip("/"), "", ""))
    return None
