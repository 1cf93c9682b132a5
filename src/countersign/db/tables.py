"""The tables: declarative ``*Row`` classes. The only module that knows columns.

Ids are ``Uuid`` (native ``uuid`` on PostgreSQL, ``CHAR(32)`` on SQLite) with no server
default: the application makes them, so no database extension is ever needed.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp that always comes back in UTC (SQLite forgets zones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a timezone-aware column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


Json = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    """Base of every ``*Row``; carries the naming convention so migrations are stable."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        uuid.UUID: Uuid(),
        datetime: UtcDateTime(),
        dict[str, Any]: Json,
        list[Any]: Json,
    }


class UserRow(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    email: Mapped[str | None] = mapped_column(String(320))
    """Stored normalised (lower case); unique. None for an account a provider made without one."""
    password_hash: Mapped[str | None] = mapped_column(String(255))
    email_verified: Mapped[bool] = mapped_column(default=False)
    """Whether the email is known to be the user's (an operator made the account, or a
    provider verified it); only then may a provider login link to this account."""
    created_at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("email"),)


class IdentityRow(Base):
    """An OAuth/OIDC provider + subject linked to a user."""

    __tablename__ = "identities"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    provider: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(255))
    email: Mapped[str | None] = mapped_column(String(320))
    created_at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("provider", "subject"),)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime]
    last_used_at: Mapped[datetime | None]

    __table_args__ = (UniqueConstraint("prefix"),)


class AccessTokenRow(Base):
    """An opaque login token; only its SHA-256 hash is stored."""

    __tablename__ = "access_tokens"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]

    __table_args__ = (UniqueConstraint("token_hash"),)


class AgentRow(Base):
    __tablename__ = "agents"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    owner_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    """None for the server's default agent."""
    name: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(200))
    instructions: Mapped[str] = mapped_column(Text)
    tools: Mapped[list[Any]]
    """``[{"name": ..., "policy": "auto|ask|deny"}, ...]``"""
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (
        # At most one default agent per database.
        Index(
            "uq_agents_default",
            "is_default",
            unique=True,
            sqlite_where=text("is_default"),
            postgresql_where=text("is_default"),
        ),
    )


class SessionRow(Base):
    __tablename__ = "sessions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id", ondelete="RESTRICT"))
    title: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    workspace: Mapped[str | None] = mapped_column(String(500))
    """The session's workspace folder, once made."""

    __table_args__ = (
        # Listing a user's sessions newest first pages on (owner_id, id).
        Index("ix_sessions_owner_id_id", "owner_id", "id"),
        Index("ix_sessions_agent_id", "agent_id"),
    )


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    session_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    owner: Mapped[str | None] = mapped_column(String(100))
    """The executor holding the run's lease."""
    lease_expires_at: Mapped[datetime | None]
    retries: Mapped[int] = mapped_column(Integer, default=0)
    """How often the run was claimed again after its process stopped or let it go (not
    counting resumptions after a decision): at most ``COUNTERSIGN_RUN_MAX_ATTEMPTS`` tries."""
    handbacks: Mapped[int] = mapped_column(Integer, default=0)
    """How often a stopping process handed the run back: the first
    ``COUNTERSIGN_RUN_MAX_ATTEMPTS`` are not retries, later ones are."""
    history_seq: Mapped[int | None] = mapped_column(Integer)
    """How far the run's stored checkpoint reaches: the session's model messages up to this
    ``seq`` (None: nothing stored yet, a retry starts from the user's message)."""
    last_seq: Mapped[int] = mapped_column(Integer)
    """The seq of the run's newest event; appending bumps it (fenced by owner and attempt)."""
    checkpoint_seq: Mapped[int] = mapped_column(Integer)
    """``last_seq`` when the checkpoint was stored: tool calls after it are not in it."""
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_runs_session_id", "session_id"),
        Index("ix_runs_status_created_at", "status", "created_at"),
        Index("ix_runs_updated_at", "updated_at"),
        # At most one active run per session.
        Index(
            "uq_runs_active_session",
            "session_id",
            unique=True,
            sqlite_where=text("status IN ('queued', 'running', 'awaiting_approval')"),
            postgresql_where=text("status IN ('queued', 'running', 'awaiting_approval')"),
        ),
    )


class ModelMessageRow(Base):
    """One message of the agent's conversation as the model sees it (pydantic-ai JSON).

    Stored once, when it happens: a session's ``seq`` 1..n is its whole model history, so a
    turn writes only its own new messages, whatever the session's length. Messages of a run
    that failed or was cancelled are deleted with that outcome (they are always the newest).
    """

    __tablename__ = "model_messages"

    session_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    data: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


class MessageRow(Base):
    __tablename__ = "messages"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    session_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    run_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("runs.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("session_id", "seq"),)


class EventRow(Base):
    """The run's append-only stream log; ``seq`` is the SSE ``id:``."""

    __tablename__ = "events"

    run_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer)
    data: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


class ApprovalRow(Base):
    __tablename__ = "approvals"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    session_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    tool_call_id: Mapped[str] = mapped_column(String(200))
    tool: Mapped[str] = mapped_column(String(200))
    arguments: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16))
    decided_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    decided_at: Mapped[datetime | None]
    reason: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[datetime]
    created_at: Mapped[datetime]
    decided_arguments: Mapped[dict[str, Any] | None]
    """The arguments as approved, when a person edited them (``arguments``: as proposed)."""
    asked_because: Mapped[str] = mapped_column(String(200))

    __table_args__ = (
        Index("ix_approvals_session_id_status", "session_id", "status"),
        Index("ix_approvals_status_id", "status", "id"),
    )


class IdempotencyKeyRow(Base):
    """The first response to a request sent with an ``Idempotency-Key``."""

    __tablename__ = "idempotency_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    scope: Mapped[str] = mapped_column(String(200))
    """What the key was used for, e.g. ``POST /sessions``."""
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    response: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("user_id", "scope", "key"),)
