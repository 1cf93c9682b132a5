"""Request and response bodies: ``<Noun>Create``, ``<Noun>Update``, ``<Noun>Out``, ``Page``."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Generic, Self, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from countersign.domain.models import (
    TITLE_MAX_LENGTH,
    ApprovalStatus,
    Decision,
    MessageRole,
    RunStatus,
    SessionStatus,
)

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
    422: {"model": ErrorBody, "description": "Invalid input"},
}
"""Errors every authenticated operation may answer, documented with the one envelope."""


class UserOut(Out):
    """A user."""

    id: uuid.UUID
    email: str
    created_at: datetime


class SessionCreate(Strict):
    """A new session; without ``agent_id`` it uses the server's default agent."""

    agent_id: uuid.UUID | None = None
    title: Text | None = Field(default=None, max_length=TITLE_MAX_LENGTH)


class SessionUpdate(Strict):
    """New values for a session; at least one field."""

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
    run_id: uuid.UUID
    tool: str
    arguments: dict[str, Any]
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
    arguments: dict[str, Any] | None = None
