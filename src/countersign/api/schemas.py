"""Request and response bodies: ``<Noun>Create``, ``<Noun>Update``, ``<Noun>Out``, ``Page``."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from countersign.domain.models import (
    EMAIL_MAX_LENGTH,
    TITLE_MAX_LENGTH,
    ApprovalStatus,
    Decision,
    MessageRole,
    RunStatus,
    SessionStatus,
    ToolPolicy,
    ToolSetting,
)
from countersign.domain.text import storable
from countersign.services.accounts import (
    API_KEY_NAME_MAX_LENGTH,
    PASSWORD_MAX_LENGTH,
    PASSWORD_MIN_LENGTH,
)
from countersign.services.agents import INSTRUCTIONS_MAX_LENGTH as AGENT_INSTRUCTIONS_MAX_LENGTH
from countersign.services.agents import NAME_MAX_LENGTH as AGENT_NAME_MAX_LENGTH

T = TypeVar("T")


def _storable(value: str) -> str:
    # PostgreSQL text cannot hold NUL, and a lone surrogate (JSON "\ud800") cannot be encoded
    # as UTF-8 by any driver or response; refuse both here rather than fail with a 500 later.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it has a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_storable)]
"""A string from a client: any text the database can store."""


def _storable_object(value: dict[str, Any]) -> dict[str, Any]:
    # As for Text, in every string of the object, names included: what a person sends is
    # refused, never changed (model and tool output is stored with U+FFFD instead).
    if _depth(value) > MAX_NESTING:
        raise ValueError(f"must not be nested more than {MAX_NESTING} levels deep")
    if storable(value) is not value:
        raise ValueError("must not contain NUL characters or lone surrogates")
    return value


MAX_NESTING = 64
"""How deep a JSON object from a client may nest (tool arguments are shallow)."""


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a JSON value (without recursion)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_NESTING:
            break
        if isinstance(item, dict):
            stack.extend((child, level + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, level + 1) for child in item)
    return deepest


JSONObjectIn = Annotated[dict[str, Any], AfterValidator(_storable_object)]
"""A JSON object from a client whose every string the database can store."""


class Strict(BaseModel):
    """A request body: unknown fields are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")


class Out(BaseModel):
    """A response body, built from a domain object's attributes."""

    model_config = ConfigDict(from_attributes=True)


class Page(BaseModel, Generic[T]):
    """One page of a list; pass ``next_cursor`` as ``?cursor=`` for the next (null at the end)."""

    items: list[T]
    next_cursor: str | None


class ErrorDetail(BaseModel):
    """What went wrong: a stable ``code``, a sentence, and optional structured detail."""

    code: str
    message: str
    detail: Any = None


class ErrorBody(BaseModel):
    """Every error response has this shape."""

    error: ErrorDetail


API_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No or bad credentials"},
    413: {"model": ErrorBody, "description": "The request body is over the size limit"},
    422: {"model": ErrorBody, "description": "Invalid input"},
}
"""Errors every authenticated operation may answer, documented with the one envelope."""


class UserOut(Out):
    """A user; ``email`` is null for an account a provider made without one."""

    id: uuid.UUID
    email: str | None
    created_at: datetime


EMAIL_FORMAT: dict[str, JsonValue] = {"format": "email"}
"""Emails are checked by the service (``normalise_email``); the OpenAPI says what they are."""


class UserCreate(Strict):
    """A sign-up: an email and a password (10 to 1024 characters, not a common one)."""

    email: Text = Field(max_length=EMAIL_MAX_LENGTH, json_schema_extra=EMAIL_FORMAT)
    # The length is checked by the service, with its own sentence; here for the OpenAPI.
    password: Text = Field(
        max_length=PASSWORD_MAX_LENGTH, json_schema_extra={"minLength": PASSWORD_MIN_LENGTH}
    )


class LoginCreate(Strict):
    """A login; ``cookie: true`` also sets the web page's session and CSRF cookies."""

    email: Text = Field(max_length=EMAIL_MAX_LENGTH, json_schema_extra=EMAIL_FORMAT)
    password: Text = Field(max_length=PASSWORD_MAX_LENGTH)
    cookie: bool = False


class AccessTokenOut(BaseModel):
    """An access token: send it as ``Authorization: Bearer <access_token>``."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the scheme, not a secret
    expires_at: datetime


class SignInProviderOut(BaseModel):
    """A configured sign-in provider, for a login page."""

    name: str
    kind: str = Field(description="`oidc`, `google`, `github` or `kakao`.")
    login_url: str = Field(description="Where a browser goes to sign in with it.")


class SignInProvidersOut(BaseModel):
    """How one can sign in here."""

    items: list[SignInProviderOut]
    registration_open: bool = Field(description="Whether `POST /auth/register` takes new accounts.")


class ApiKeyCreate(Strict):
    """A new API key's name (what it is for)."""

    name: Text = Field(min_length=1, max_length=API_KEY_NAME_MAX_LENGTH)


class ApiKeyOut(Out):
    """An API key, without its secret."""

    id: uuid.UUID
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None


class ApiKeyCreatedOut(Out):
    """A new API key; ``key`` is shown in this answer only."""

    id: uuid.UUID
    name: str
    prefix: str
    key: str
    created_at: datetime


class SessionCreate(Strict):
    """A new session; without ``agent_id`` it uses the server's default agent."""

    agent_id: uuid.UUID | None = None
    title: Text | None = Field(default=None, max_length=TITLE_MAX_LENGTH)


class SessionUpdate(Strict):
    """New values for a session; at least one field (null leaves a field as it is)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    title: Text | None = Field(default=None, max_length=TITLE_MAX_LENGTH)
    status: SessionStatus | None = None

    @model_validator(mode="after")
    def _something_to_change(self) -> Self:
        if self.title is None and self.status is None:
            raise ValueError("give at least one of title or status")
        return self


class SessionOut(Out):
    """A conversation."""

    id: uuid.UUID
    title: str
    agent_id: uuid.UUID
    status: SessionStatus
    active_run_id: uuid.UUID | None = Field(
        description="The session's queued, running or waiting run (null when none)."
    )
    created_at: datetime
    updated_at: datetime


class MessageOut(Out):
    """One message of a session."""

    id: uuid.UUID
    seq: int
    role: MessageRole
    content: str
    run_id: uuid.UUID | None
    created_at: datetime


class ApprovalOut(Out):
    """A tool call waiting for, or given, a person's decision."""

    id: uuid.UUID
    session_id: uuid.UUID
    run_id: uuid.UUID
    tool: str
    arguments: dict[str, Any] = Field(description="The arguments as the model proposed them.")
    decided_arguments: dict[str, Any] | None = Field(
        description="The arguments as approved, when a person edited them (else null)."
    )
    asked_because: str = Field(description='Why the call waits for a person, e.g. "policy ask".')
    status: ApprovalStatus
    decided_by: uuid.UUID | None
    decided_at: datetime | None
    reason: str | None
    expires_at: datetime


class MessageCreate(Strict):
    """A user message; it starts a run."""

    content: Text = Field(min_length=1, max_length=100_000)


class RunOut(Out):
    """One agent turn."""

    id: uuid.UUID
    session_id: uuid.UUID
    status: RunStatus
    attempt: int
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class RunStartedOut(BaseModel):
    """The stored message and the run it started (answered with 202)."""

    message: MessageOut
    run: RunOut


class ApprovalDecision(Strict):
    """A person's decision; ``arguments`` (approve only) replaces the call's arguments."""

    decision: Decision
    reason: Text | None = Field(default=None, max_length=2_000)
    arguments: JSONObjectIn | None = None


class RuleConditionIn(Strict):
    """How one argument must compare: exactly one of the four."""

    equals: Text | None = Field(default=None, max_length=1_000)
    prefix: Text | None = Field(default=None, max_length=1_000)
    glob: Text | None = Field(
        default=None,
        max_length=1_000,
        description="`*` any run of characters but `/`, `**` any run, `?` one character.",
    )
    regex: Text | None = Field(
        default=None, max_length=1_000, description="RE2; must match the whole value."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        given = [
            name
            for name in ("equals", "prefix", "glob", "regex")
            if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError("give exactly one of equals, prefix, glob or regex")
        return self

    def pair(self) -> tuple[str, str]:
        """The matcher and its value."""
        for name in ("equals", "prefix", "glob", "regex"):
            value = getattr(self, name)
            if value is not None:
                return name, value
        raise AssertionError("validated to have one")


class ToolRuleIn(Strict):
    """A policy for the calls whose arguments meet every condition of `when`."""

    when: dict[Annotated[str, Field(min_length=1, max_length=100)], RuleConditionIn] = Field(
        min_length=1,
        max_length=10,
        examples=[{"command": {"prefix": "git status"}}],
        description="Argument name → condition; every condition must hold.",
    )
    policy: ToolPolicy


class ToolSettingIn(Strict):
    """One tool an agent may call, what happens when it does, and argument rules."""

    name: Text = Field(
        min_length=1,
        max_length=100,
        examples=["write_file"],
        description="A tool this server knows: a built-in (`read_file`, `write_file`, "
        "`list_files`, `shell`), an MCP server's tool (`SERVER_TOOL`) or a plugin's; "
        "`GET /api/v1/tools` lists them. Any other name is refused (422).",
    )
    policy: ToolPolicy = Field(
        description="`auto` runs it, `ask` waits for a person's approval, `deny` refuses it."
    )
    rules: list[ToolRuleIn] | None = Field(
        default=None,
        max_length=50,
        description="Checked in order before `policy`: the first rule whose conditions all "
        "hold decides the call's policy.",
    )

    def to_setting(self) -> ToolSetting:
        """The domain form."""
        return ToolSetting.from_json(
            {
                "name": self.name,
                "policy": self.policy,
                "rules": [
                    {
                        "when": {
                            argument: dict([condition.pair()])
                            for argument, condition in rule.when.items()
                        },
                        "policy": rule.policy,
                    }
                    for rule in self.rules or ()
                ],
            }
        )


class ToolOut(Out):
    """A tool an agent may be given."""

    name: str
    source: Literal["builtin", "mcp", "plugin"]
    server: str | None = Field(description="The MCP server it comes from (MCP tools only).")
    description: str
    parameters: dict[str, Any] = Field(description="Its arguments, as a JSON schema.")
    default_policy: ToolPolicy


class ToolList(BaseModel):
    """Every tool an agent may be given."""

    items: list[ToolOut]


class ToolRuleOut(BaseModel):
    """An argument rule as the agent stores it."""

    when: dict[str, dict[str, str]]
    policy: ToolPolicy


class ToolSettingOut(BaseModel):
    """One tool of an agent, its policy and its argument rules."""

    name: str
    policy: ToolPolicy
    rules: list[ToolRuleOut] | None = Field(
        default=None, description="Left out when the tool has none."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_setting(cls, data: Any) -> Any:
        if isinstance(data, ToolSetting):
            return data.to_json()
        return data

    @model_serializer(mode="wrap")
    def _without_empty_rules(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if not data.get("rules"):
            data.pop("rules", None)
        return data


class AgentCreate(Strict):
    """A new agent; what is left out is taken from the server's default agent."""

    name: Text = Field(min_length=1, max_length=AGENT_NAME_MAX_LENGTH)
    model: Text | None = Field(
        default=None,
        description=(
            "`demo`, `openai:<model>`, `anthropic:<model>` or `google:<model>`; the server's "
            "default model when left out. A provider whose API key is not set is refused."
        ),
    )
    instructions: Text | None = Field(
        default=None,
        max_length=AGENT_INSTRUCTIONS_MAX_LENGTH,
        description="The system prompt; the default agent's when left out.",
    )
    tools: list[ToolSettingIn] | None = Field(
        default=None,
        max_length=100,
        description="Built-in tools, each once; the default agent's tools when left out.",
    )


class AgentUpdate(Strict):
    """New values for one of your agents; at least one field (null leaves a field as it is).
    `tools` replaces the whole list."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    name: Text | None = Field(default=None, min_length=1, max_length=AGENT_NAME_MAX_LENGTH)
    model: Text | None = None
    instructions: Text | None = Field(default=None, max_length=AGENT_INSTRUCTIONS_MAX_LENGTH)
    tools: list[ToolSettingIn] | None = Field(default=None, max_length=100)

    @model_validator(mode="after")
    def _something_to_change(self) -> Self:
        if all(value is None for value in (self.name, self.model, self.instructions, self.tools)):
            raise ValueError("give at least one of name, model, instructions or tools")
        return self


class AgentOut(Out):
    """A reusable agent profile."""

    id: uuid.UUID
    name: str
    model: str
    instructions: str
    tools: list[ToolSettingOut]
    is_default: bool
    created_at: datetime
    updated_at: datetime
