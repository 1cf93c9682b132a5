"""Domain values: frozen dataclasses and enums with no I/O. This is what leaves a repository.

Ids are UUIDv7 made by the application (time-ordered), so no database extension is needed.
"""

from __future__ import annotations

import base64
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Generic, NewType, Protocol, TypeVar

from countersign.domain.errors import AlreadyDecided, InvalidInput

if sys.version_info >= (3, 14):  # pragma: no cover - exercised on 3.14 only
    from uuid import uuid7 as _uuid7
else:
    from uuid_utils.compat import uuid7 as _uuid7

UserId = NewType("UserId", uuid.UUID)
ApiKeyId = NewType("ApiKeyId", uuid.UUID)
AgentId = NewType("AgentId", uuid.UUID)
SessionId = NewType("SessionId", uuid.UUID)
MessageId = NewType("MessageId", uuid.UUID)
RunId = NewType("RunId", uuid.UUID)
ApprovalId = NewType("ApprovalId", uuid.UUID)
AccessTokenId = NewType("AccessTokenId", uuid.UUID)
IdentityId = NewType("IdentityId", uuid.UUID)

JSONObject = dict[str, Any]
T = TypeVar("T")


def new_id() -> uuid.UUID:
    """A fresh time-ordered UUIDv7."""
    return uuid.UUID(bytes=_uuid7().bytes)


class Clock(Protocol):
    """Where services get the time; injected so tests can move it."""

    def now(self) -> datetime: ...


class SystemClock:
    """The real clock, in UTC."""

    def now(self) -> datetime:
        """The current time with a UTC zone."""
        return datetime.now(UTC)


class SessionStatus(StrEnum):
    """Whether a conversation is in use or put away."""

    ACTIVE = "active"
    ARCHIVED = "archived"


class MessageRole(StrEnum):
    """Who wrote a message."""

    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class RunStatus(StrEnum):
    """Where one agent turn is: queued → running → (awaiting_approval → queued → running)* → end."""

    QUEUED = "queued"
    RUNNING = "running"
    AWAITING_APPROVAL = "awaiting_approval"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_active(self) -> bool:
        """True while the run has not ended."""
        return self in _ACTIVE_RUN_STATUSES


_ACTIVE_RUN_STATUSES = frozenset({RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.AWAITING_APPROVAL})


class ApprovalStatus(StrEnum):
    """Where a person's decision on a tool call is."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"


class Decision(StrEnum):
    """What a person answers to a pending approval."""

    APPROVE = "approve"
    REJECT = "reject"


class ToolPolicy(StrEnum):
    """What happens when the agent calls a tool."""

    AUTO = "auto"
    ASK = "ask"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class User:
    """A person or program that owns sessions.

    ``email`` is None for an account made from a provider that gives no email; such an account
    is found by its identity (provider + subject).
    """

    id: UserId
    email: str | None
    created_at: datetime
    email_verified: bool = False
    """Whether the email is known to be the user's: an operator made the account, or a
    provider verified the address. A self-service registration's email is not."""


@dataclass(frozen=True, slots=True)
class Identity:
    """An OAuth/OIDC provider's account (``provider`` + ``subject``) linked to a user.

    ``provider`` is the provider's configured name; ``email`` is what the provider said at the
    first login, verified or not (only a verified one is ever a user's email).
    """

    id: IdentityId
    user_id: UserId
    provider: str
    subject: str
    email: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A long-lived credential; only its hash is stored and ``prefix`` identifies it."""

    id: ApiKeyId
    user_id: UserId
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class AccessToken:
    """An opaque login token (only its hash is stored); valid until it expires or is revoked."""

    id: AccessTokenId
    user_id: UserId
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None

    def is_valid(self, *, at: datetime) -> bool:
        """True when the token is neither revoked nor expired at this time."""
        return self.revoked_at is None and at < self.expires_at


class RuleMatcher(StrEnum):
    """How a rule's condition compares an argument with its value."""

    EQUALS = "equals"
    PREFIX = "prefix"
    GLOB = "glob"
    REGEX = "regex"


@dataclass(frozen=True, slots=True)
class RuleCondition:
    """One condition of a rule: the tool call's ``argument`` compared by ``matcher``."""

    argument: str
    matcher: RuleMatcher
    value: str


@dataclass(frozen=True, slots=True)
class ToolRule:
    """A policy for the calls whose arguments meet every condition of ``when``."""

    when: tuple[RuleCondition, ...]
    policy: ToolPolicy


@dataclass(frozen=True, slots=True)
class ToolSetting:
    """One tool an agent may call, its policy, and argument rules that come before it (the
    first rule that matches a call decides; else the policy)."""

    name: str
    policy: ToolPolicy
    rules: tuple[ToolRule, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The stored and API form: ``{name, policy, rules?}``."""
        data: dict[str, Any] = {"name": self.name, "policy": self.policy.value}
        if self.rules:
            data["rules"] = [
                {
                    "when": {c.argument: {c.matcher.value: c.value} for c in rule.when},
                    "policy": rule.policy.value,
                }
                for rule in self.rules
            ]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ToolSetting:
        """Back from ``to_json``'s form (as stored, or as the API took it)."""
        return cls(
            name=str(data["name"]),
            policy=ToolPolicy(data["policy"]),
            rules=tuple(
                ToolRule(
                    when=tuple(
                        RuleCondition(argument, RuleMatcher(matcher), str(value))
                        for argument, condition in rule["when"].items()
                        for matcher, value in condition.items()
                    ),
                    policy=ToolPolicy(rule["policy"]),
                )
                for rule in data.get("rules") or ()
            ),
        )


@dataclass(frozen=True, slots=True)
class Agent:
    """A reusable profile: model, instructions, tools and their policies."""

    id: AgentId
    owner_id: UserId | None
    name: str
    model: str
    instructions: str
    tools: tuple[ToolSetting, ...]
    is_default: bool
    created_at: datetime
    updated_at: datetime


DEFAULT_AGENT_TOOLS: tuple[ToolSetting, ...] = (
    ToolSetting("list_files", ToolPolicy.AUTO),
    ToolSetting("read_file", ToolPolicy.AUTO),
    ToolSetting("write_file", ToolPolicy.ASK),
    ToolSetting("shell", ToolPolicy.ASK),
)
DEFAULT_AGENT_NAME = "default"
DEFAULT_AGENT_INSTRUCTIONS = (
    "You are a helpful assistant working in a private workspace folder. "
    "Use the tools to inspect and change files when asked."
)

TITLE_MAX_LENGTH = 200


@dataclass(frozen=True, slots=True)
class Session:
    """A conversation owned by one user and driven by one agent."""

    id: SessionId
    owner_id: UserId
    agent_id: AgentId
    title: str
    status: SessionStatus
    created_at: datetime
    updated_at: datetime
    active_run_id: RunId | None = field(default=None, compare=False)
    """Its queued, running or waiting run, as read with it (None: none, or not read)."""

    def edited(self, *, title: str | None, status: SessionStatus | None, at: datetime) -> Session:
        """This session with a new title and/or status."""
        return replace(
            self,
            title=self.title if title is None else clean_title(title),
            status=self.status if status is None else status,
            updated_at=at,
        )


def clean_title(title: str) -> str:
    """A title stripped of surrounding space, or InvalidInput if it is too long."""
    title = title.strip()
    if len(title) > TITLE_MAX_LENGTH:
        raise InvalidInput(f"title is longer than {TITLE_MAX_LENGTH} characters")
    return title


@dataclass(frozen=True, slots=True)
class Message:
    """One message of a conversation, ordered by ``seq`` within its session."""

    id: MessageId
    session_id: SessionId
    seq: int
    role: MessageRole
    content: str
    run_id: RunId | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Run:
    """One agent turn started by a user message."""

    id: RunId
    session_id: SessionId
    status: RunStatus
    attempt: int
    error: str | None
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class Lease:
    """An executor's hold on a running run; every write of the run is fenced by it."""

    owner: str
    attempt: int


@dataclass(frozen=True, slots=True)
class ClaimedRun:
    """What an executor gets when it claims a run: enough to carry out the turn."""

    run: Run
    lease: Lease
    history_seq: int | None
    """How far the run's stored checkpoint reaches in the session's model messages (None:
    no checkpoint yet, the run starts from the user's message)."""
    last_seq: int
    checkpoint_seq: int
    retries: int = 0
    """How often the run was taken over after its process stopped or let it go."""


@dataclass(frozen=True, slots=True)
class TurnContext:
    """The session side of a run: its agent, its workspace and the message that started it."""

    agent: Agent
    workspace: str | None
    prompt: str
    history_length: int
    """How many model messages the session has stored: what a run's first attempt continues."""
    history_tail: RunId | None = None
    """The run that stored the newest of them: with the length, it tells whether a history
    kept in memory is still the stored one (messages are only added, or a run's removed)."""


POLICY_ASK = "policy ask"
"""Why a call waits for a person when its tool's policy is ``ask``."""
OUTCOME_UNKNOWN = (
    "outcome unknown: the server stopped while this call was running, so it may or may not "
    "have taken effect; approve to run it again, reject to tell the model it did not run"
)
"""Why a call waits for a person again: an attempt stopped inside it (SPEC invariant 6)."""

NOT_STARTED = (
    "not started: the server stopped before this call ran (another call of the same reply "
    "was running); approve to run it, reject to tell the model it did not run"
)
"""Why a call of a reply cut off by a crash asks: it never reached its tool."""


@dataclass(frozen=True, slots=True)
class Approval:
    """A tool call waiting for a person's decision."""

    id: ApprovalId
    run_id: RunId
    session_id: SessionId
    tool: str
    arguments: JSONObject
    status: ApprovalStatus
    decided_by: UserId | None
    decided_at: datetime | None
    reason: str | None
    expires_at: datetime
    created_at: datetime = field(compare=False)
    tool_call_id: str = field(default="", compare=False)
    decided_arguments: JSONObject | None = None
    """The arguments as a person approved them, when edited (``arguments``: as proposed)."""
    asked_because: str = POLICY_ASK

    @property
    def arguments_to_use(self) -> JSONObject:
        """What the tool runs with if approved: the edited arguments, else the proposed."""
        return self.arguments if self.decided_arguments is None else self.decided_arguments

    def decide(
        self,
        decision: Decision,
        *,
        by: UserId,
        at: datetime,
        reason: str | None = None,
        arguments: JSONObject | None = None,
    ) -> Approval:
        """This approval decided by a person; AlreadyDecided unless it is still pending."""
        if self.status is not ApprovalStatus.PENDING:
            raise AlreadyDecided(
                f"approval {self.id} is already {self.status.value}",
                detail={"approval_id": str(self.id), "status": self.status.value},
            )
        if at >= self.expires_at:
            raise AlreadyDecided(
                f"approval {self.id} has expired",
                detail={"approval_id": str(self.id), "status": ApprovalStatus.EXPIRED.value},
            )
        if decision is Decision.REJECT and arguments is not None:
            raise InvalidInput("arguments can only be given when approving")
        return replace(
            self,
            status=ApprovalStatus.APPROVED
            if decision is Decision.APPROVE
            else ApprovalStatus.REJECTED,
            decided_by=by,
            decided_at=at,
            reason=reason,
            decided_arguments=arguments,
        )


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list and the cursor for the next (None at the end)."""

    items: list[T]
    next_cursor: str | None


EMAIL_MAX_LENGTH = 320


def normalise_email(email: str) -> str:
    """The canonical (trimmed, lower-case) form of an email, or InvalidInput if it is not one."""
    email = email.strip().lower()
    local, at, domain = email.rpartition("@")
    if (
        not at
        or not local
        or "." not in domain
        or domain.startswith(".")
        or domain.endswith(".")
        or any(char.isspace() for char in email)
        or len(email) > EMAIL_MAX_LENGTH
    ):
        raise InvalidInput("email is not a valid email address")
    return email


def encode_cursor(value: str) -> str:
    """An opaque page cursor for a position."""
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The position inside a cursor, or InvalidInput if it was not made by encode_cursor."""
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("cursor is not valid; use next_cursor from a previous page") from None
