"""Repositories: one per aggregate. Rows in, frozen domain objects out; they never commit.

Every write that must hit a row checks the row count and raises NotFound when it hit none,
so that a write can never be a silent no-op. ``translate_error`` is the one place where
driver errors become domain errors.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, and_, delete, func, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncSession

from countersign.db.tables import (
    AgentRow,
    ApiKeyRow,
    ApprovalRow,
    IdempotencyKeyRow,
    MessageRow,
    SessionRow,
    UserRow,
)
from countersign.domain.errors import (
    AlreadyExists,
    Conflict,
    CountersignError,
    NotFound,
    Unavailable,
)
from countersign.domain.models import (
    Agent,
    AgentId,
    ApiKey,
    ApiKeyId,
    Approval,
    ApprovalId,
    ApprovalStatus,
    JSONObject,
    Message,
    MessageId,
    MessageRole,
    RunId,
    Session,
    SessionId,
    SessionStatus,
    ToolPolicy,
    ToolSetting,
    User,
    UserId,
)


def translate_error(exc: SQLAlchemyError | OSError) -> CountersignError | SQLAlchemyError:
    """The domain error for a driver error (an unknown one is returned as it is)."""
    if isinstance(exc, IntegrityError):
        return Conflict("the request conflicts with data that already exists")
    if isinstance(exc, PoolTimeoutError):
        return Unavailable("the database has no free connection right now; try again")
    if isinstance(exc, OSError):
        return Unavailable("the database cannot be reached right now; try again")
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return Unavailable("the connection to the database was lost; try again")
        text = str(exc.orig).lower()
        if "database is locked" in text or "database table is locked" in text:
            return Unavailable("the database is busy; try again")
        if isinstance(exc.orig, OSError) or "connection" in text:
            return Unavailable("the database cannot be reached right now; try again")
    return exc


def _rowcount(result: Any) -> int:
    assert isinstance(result, CursorResult)
    return result.rowcount


class UserRepository:
    """Users and their password hashes."""

    def __init__(self, db_session: AsyncSession) -> None:
        self._db = db_session

    async def add(self, user: User, *, password_hash: str | None) -> None:
        """Insert a user; AlreadyExists if the email is taken."""
        self._db.add(
            UserRow(
                id=user.id,
                email=user.email,
                password_hash=password_hash,
                created_at=user.created_at,
            )
        )
        try:
            await self._db.flush()
        except IntegrityError:
            raise AlreadyExists("a user with this email already exists") from None

    async def get(self, user_id: UserId) -> User | None:
        """The user with this id, or None."""
        row = await self._db.get(UserRow, user_id)
        return None if row is None else _user(row)

    async def get_by_email(self, email: str) -> User | None:
        """The user with this (normalised) email, or None."""
        row = await self._db.scalar(select(UserRow).where(UserRow.email == email))
        return None if row is None else _user(row)


class ApiKeyRepository:
    """API keys; only their hashes are stored."""

    def __init__(self, db_session: AsyncSession) -> None:
        self._db = db_session

    async def add(self, key: ApiKey, *, key_hash: str) -> None:
        """Insert an API key."""
        self._db.add(
            ApiKeyRow(
                id=key.id,
                user_id=key.user_id,
                name=key.name,
                prefix=key.prefix,
                key_hash=key_hash,
                created_at=key.created_at,
                last_used_at=None,
            )
        )
        await self._db.flush()

    async def find_by_prefix(self, prefix: str) -> tuple[ApiKey, str] | None:
        """The key with this prefix and its stored hash, or None."""
        row = await self._db.scalar(select(ApiKeyRow).where(ApiKeyRow.prefix == prefix))
        return None if row is None else (_api_key(row), row.key_hash)

    async def mark_used(self, key_id: ApiKeyId, *, at: datetime) -> None:
        """Record that the key was just used."""
        await self._db.execute(
            update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(last_used_at=at)
        )


class AgentRepository:
    """Agent profiles, including the server's default agent."""

    def __init__(self, db_session: AsyncSession) -> None:
        self._db = db_session

    async def get_default(self) -> Agent | None:
        """The server's default agent, or None before it is made."""
        row = await self._db.scalar(select(AgentRow).where(AgentRow.is_default.is_(True)))
        return None if row is None else _agent(row)

    async def get_usable(self, agent_id: AgentId, *, by: UserId) -> Agent | None:
        """The agent if ``by`` may use it (theirs, or the default), else None."""
        row = await self._db.scalar(
            select(AgentRow).where(
                AgentRow.id == agent_id,
                or_(AgentRow.owner_id == by, AgentRow.is_default.is_(True)),
            )
        )
        return None if row is None else _agent(row)

    async def add(self, agent: Agent) -> None:
        """Insert an agent; AlreadyExists if it is a second default."""
        self._db.add(
            AgentRow(
                id=agent.id,
                owner_id=agent.owner_id,
                name=agent.name,
                model=agent.model,
                instructions=agent.instructions,
                tools=_tools_json(agent.tools),
                is_default=agent.is_default,
                created_at=agent.created_at,
                updated_at=agent.updated_at,
            )
        )
        try:
            await self._db.flush()
        except IntegrityError:
            raise AlreadyExists("the agent already exists") from None

    async def update(self, agent: Agent) -> None:
        """Store new values for an existing agent; NotFound if it is gone."""
        result = await self._db.execute(
            update(AgentRow)
            .where(AgentRow.id == agent.id)
            .values(
                name=agent.name,
                model=agent.model,
                instructions=agent.instructions,
                tools=_tools_json(agent.tools),
                updated_at=agent.updated_at,
            )
        )
        _expect_one(result, "agent")


class SessionRepository:
    """Conversations; every read is scoped to the owner."""

    def __init__(self, db_session: AsyncSession) -> None:
        self._db = db_session

    async def add(self, session: Session) -> None:
        """Insert a session."""
        self._db.add(
            SessionRow(
                id=session.id,
                owner_id=session.owner_id,
                agent_id=session.agent_id,
                title=session.title,
                status=session.status.value,
                created_at=session.created_at,
                updated_at=session.updated_at,
            )
        )
        await self._db.flush()

    async def get_owned(self, session_id: SessionId, *, owner: UserId) -> Session | None:
        """The session if it exists and belongs to ``owner``, else None."""
        row = await self._db.scalar(
            select(SessionRow).where(SessionRow.id == session_id, SessionRow.owner_id == owner)
        )
        return None if row is None else _session(row)

    async def list_owned(
        self, *, owner: UserId, before: uuid.UUID | None, limit: int
    ) -> list[Session]:
        """Up to ``limit`` of the owner's sessions, newest first, older than ``before``."""
        query = select(SessionRow).where(SessionRow.owner_id == owner)
        if before is not None:
            query = query.where(SessionRow.id < before)
        rows = await self._db.scalars(query.order_by(SessionRow.id.desc()).limit(limit))
        return [_session(row) for row in rows]

    async def update(self, session: Session) -> None:
        """Store the session's title, status and update time; NotFound if it is gone."""
        result = await self._db.execute(
            update(SessionRow)
            .where(SessionRow.id == session.id, SessionRow.owner_id == session.owner_id)
            .values(title=session.title, status=session.status.value, updated_at=session.updated_at)
        )
        _expect_one(result, "session")

    async def delete_owned(self, session_id: SessionId, *, owner: UserId) -> None:
        """Delete the session and everything in it; NotFound if missing or not the owner's."""
        result = await self._db.execute(
            delete(SessionRow).where(SessionRow.id == session_id, SessionRow.owner_id == owner)
        )
        _expect_one(result, "session")

    async def count_for_owner(self, owner: UserId) -> int:
        """How many sessions the owner has."""
        count = await self._db.scalar(
            select(func.count()).select_from(SessionRow).where(SessionRow.owner_id == owner)
        )
        return int(count or 0)


class MessageRepository:
    """The ordered messages of a session."""

    def __init__(self, db_session: AsyncSession) -> None:
        self._db = db_session

    async def list(self, session_id: SessionId, *, after_seq: int, limit: int) -> list[Message]:
        """Up to ``limit`` messages with ``seq`` above ``after_seq``, oldest first."""
        rows = await self._db.scalars(
            select(MessageRow)
            .where(MessageRow.session_id == session_id, MessageRow.seq > after_seq)
            .order_by(MessageRow.seq)
            .limit(limit)
        )
        return [_message(row) for row in rows]


class ApprovalRepository:
    """Tool calls waiting for, or given, a person's decision."""

    def __init__(self, db_session: AsyncSession) -> None:
        self._db = db_session

    async def list_pending(
        self, session_id: SessionId, *, now: datetime, after: uuid.UUID | None, limit: int
    ) -> list[Approval]:
        """Up to ``limit`` unexpired pending approvals of the session, oldest first."""
        conditions = [
            ApprovalRow.session_id == session_id,
            ApprovalRow.status == ApprovalStatus.PENDING.value,
            ApprovalRow.expires_at > now,
        ]
        if after is not None:
            conditions.append(ApprovalRow.id > after)
        rows = await self._db.scalars(
            select(ApprovalRow).where(and_(*conditions)).order_by(ApprovalRow.id).limit(limit)
        )
        return [_approval(row) for row in rows]


class IdempotencyRepository:
    """First responses stored under an Idempotency-Key."""

    def __init__(self, db_session: AsyncSession) -> None:
        self._db = db_session

    async def get(self, *, user_id: UserId, scope: str, key: str) -> tuple[str, JSONObject] | None:
        """The stored (request hash, response) for this key, or None."""
        row = await self._db.scalar(
            select(IdempotencyKeyRow).where(
                IdempotencyKeyRow.user_id == user_id,
                IdempotencyKeyRow.scope == scope,
                IdempotencyKeyRow.key == key,
            )
        )
        return None if row is None else (row.request_hash, dict(row.response))

    async def add(
        self,
        *,
        user_id: UserId,
        scope: str,
        key: str,
        request_hash: str,
        response: JSONObject,
        at: datetime,
        new_id: uuid.UUID,
    ) -> None:
        """Store the first response for a key; Conflict if a concurrent request stored one."""
        self._db.add(
            IdempotencyKeyRow(
                id=new_id,
                user_id=user_id,
                scope=scope,
                key=key,
                request_hash=request_hash,
                response=response,
                created_at=at,
            )
        )
        try:
            await self._db.flush()
        except IntegrityError:
            raise Conflict(
                "a request with this Idempotency-Key is being processed; retry shortly"
            ) from None


def _expect_one(result: Any, noun: str) -> None:
    if _rowcount(result) == 0:
        raise NotFound(f"{noun} not found")


def _tools_json(tools: tuple[ToolSetting, ...]) -> list[Any]:
    return [{"name": tool.name, "policy": tool.policy.value} for tool in tools]


def _user(row: UserRow) -> User:
    return User(id=UserId(row.id), email=row.email, created_at=row.created_at)


def _api_key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        id=ApiKeyId(row.id),
        user_id=UserId(row.user_id),
        name=row.name,
        prefix=row.prefix,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
    )


def _agent(row: AgentRow) -> Agent:
    return Agent(
        id=AgentId(row.id),
        owner_id=None if row.owner_id is None else UserId(row.owner_id),
        name=row.name,
        model=row.model,
        instructions=row.instructions,
        tools=tuple(
            ToolSetting(name=str(item["name"]), policy=ToolPolicy(item["policy"]))
            for item in row.tools
        ),
        is_default=row.is_default,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _session(row: SessionRow) -> Session:
    return Session(
        id=SessionId(row.id),
        owner_id=UserId(row.owner_id),
        agent_id=AgentId(row.agent_id),
        title=row.title,
        status=SessionStatus(row.status),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _message(row: MessageRow) -> Message:
    return Message(
        id=MessageId(row.id),
        session_id=SessionId(row.session_id),
        seq=row.seq,
        role=MessageRole(row.role),
        content=row.content,
        run_id=None if row.run_id is None else RunId(row.run_id),
        created_at=row.created_at,
    )


def _approval(row: ApprovalRow) -> Approval:
    return Approval(
        id=ApprovalId(row.id),
        run_id=RunId(row.run_id),
        session_id=SessionId(row.session_id),
        tool=row.tool,
        arguments=dict(row.arguments),
        status=ApprovalStatus(row.status),
        decided_by=None if row.decided_by is None else UserId(row.decided_by),
        decided_at=row.decided_at,
        reason=row.reason,
        expires_at=row.expires_at,
        created_at=row.created_at,
    )
