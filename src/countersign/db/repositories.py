"""Repositories: one per aggregate. Rows in, frozen domain objects out; they never commit.

Every write that must hit a row checks the row count and raises NotFound when it hit none,
so that a write can never be a silent no-op. Driver errors become domain errors in one place,
``db/errors.py``.
"""

from __future__ import annotations

import functools
import json
import uuid
from datetime import datetime
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import (
    CursorResult,
    Table,
    and_,
    case,
    delete,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from countersign.db import sqlite_writes
from countersign.db.sqlite_script import Step, run_script
from countersign.db.tables import (
    AccessTokenRow,
    AgentRow,
    ApiKeyRow,
    ApprovalRow,
    Base,
    EventRow,
    IdempotencyKeyRow,
    IdentityRow,
    MessageRow,
    ModelMessageRow,
    RunRow,
    SessionRow,
    UserRow,
)
from countersign.domain.errors import (
    AlreadyDecided,
    AlreadyExists,
    Conflict,
    LeaseLost,
    NotFound,
)
from countersign.domain.events import (
    AssistantReply,
    EventType,
    NewEvent,
    RunBatch,
    RunEvent,
)
from countersign.domain.models import (
    AccessToken,
    AccessTokenId,
    Agent,
    AgentId,
    ApiKey,
    ApiKeyId,
    Approval,
    ApprovalId,
    ApprovalStatus,
    ClaimedRun,
    Identity,
    IdentityId,
    JSONObject,
    Lease,
    Message,
    MessageId,
    MessageRole,
    Run,
    RunId,
    RunStatus,
    Session,
    SessionId,
    SessionStatus,
    ToolSetting,
    TurnContext,
    User,
    UserId,
)
from countersign.domain.text import storable


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
                email_verified=user.email_verified,
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

    async def get_with_password_hash(self, email: str) -> tuple[User, str | None] | None:
        """The user with this (normalised) email and their password hash (None: no password)."""
        row = await self._db.scalar(select(UserRow).where(UserRow.email == email))
        return None if row is None else (_user(row), row.password_hash)


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

    async def find_by_prefix(self, prefix: str) -> tuple[ApiKey, str, User] | None:
        """The key with this prefix, its stored hash and its owner, or None (one statement)."""
        found = (
            await self._db.execute(
                select(ApiKeyRow, UserRow)
                .join(UserRow, UserRow.id == ApiKeyRow.user_id)
                .where(ApiKeyRow.prefix == prefix)
            )
        ).one_or_none()
        if found is None:
            return None
        key, owner = found
        return _api_key(key), key.key_hash, _user(owner)

    async def mark_used(self, key_id: ApiKeyId, *, at: datetime) -> None:
        """Record that the key was just used."""
        await self._db.execute(
            update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(last_used_at=at)
        )

    async def list_owned(
        self, *, owner: UserId, before: uuid.UUID | None, limit: int
    ) -> list[ApiKey]:
        """Up to ``limit`` of the owner's keys, newest first, older than ``before``."""
        query = select(ApiKeyRow).where(ApiKeyRow.user_id == owner)
        if before is not None:
            query = query.where(ApiKeyRow.id < before)
        rows = await self._db.scalars(query.order_by(ApiKeyRow.id.desc()).limit(limit))
        return [_api_key(row) for row in rows]

    async def delete_owned(self, key_id: ApiKeyId, *, owner: UserId) -> None:
        """Delete one of the owner's keys; NotFound if missing or someone else's."""
        result = await self._db.execute(
            delete(ApiKeyRow).where(ApiKeyRow.id == key_id, ApiKeyRow.user_id == owner)
        )
        _expect_one(result, "API key")


class AccessTokenRepository:
    """Login tokens; only their hashes are stored."""

    def __init__(self, db_session: AsyncSession) -> None:
        self._db = db_session

    async def add(self, token: AccessToken, *, token_hash: str) -> None:
        """Insert a token."""
        self._db.add(
            AccessTokenRow(
                id=token.id,
                user_id=token.user_id,
                token_hash=token_hash,
                created_at=token.created_at,
                expires_at=token.expires_at,
                revoked_at=token.revoked_at,
                last_used_at=token.last_used_at,
            )
        )
        await self._db.flush()

    async def find_by_hash(self, token_hash: str) -> AccessToken | None:
        """The token with this hash (revoked or expired ones too), or None."""
        row = await self._db.scalar(
            select(AccessTokenRow).where(AccessTokenRow.token_hash == token_hash)
        )
        return None if row is None else _access_token(row)

    async def revoke(self, token_id: AccessTokenId, *, at: datetime) -> bool:
        """Revoke a token; False if it was already revoked (or is gone)."""
        result = await self._db.execute(
            update(AccessTokenRow)
            .where(AccessTokenRow.id == token_id, AccessTokenRow.revoked_at.is_(None))
            .values(revoked_at=at)
        )
        return _rowcount(result) == 1

    async def mark_used(self, token_id: AccessTokenId, *, at: datetime) -> None:
        """Record that the token was just used."""
        await self._db.execute(
            update(AccessTokenRow).where(AccessTokenRow.id == token_id).values(last_used_at=at)
        )

    async def delete_expired(self, *, user_id: UserId, now: datetime) -> int:
        """Delete the user's tokens that have expired (revoked or not); how many went."""
        result = await self._db.execute(
            delete(AccessTokenRow).where(
                AccessTokenRow.user_id == user_id, AccessTokenRow.expires_at <= now
            )
        )
        return _rowcount(result)


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

    async def list_usable(self, *, by: UserId, before: uuid.UUID | None, limit: int) -> list[Agent]:
        """Up to ``limit`` agents ``by`` may use (theirs and the default), newest first."""
        query = select(AgentRow).where(or_(AgentRow.owner_id == by, AgentRow.is_default.is_(True)))
        if before is not None:
            query = query.where(AgentRow.id < before)
        rows = await self._db.scalars(query.order_by(AgentRow.id.desc()).limit(limit))
        return [_agent(row) for row in rows]

    async def update_owned(self, agent: Agent, *, owner: UserId) -> None:
        """Store new values for one of the owner's agents; NotFound if missing or not theirs."""
        result = await self._db.execute(
            update(AgentRow)
            .where(
                AgentRow.id == agent.id,
                AgentRow.owner_id == owner,
                AgentRow.is_default.is_(False),
            )
            .values(
                name=agent.name,
                model=agent.model,
                instructions=agent.instructions,
                tools=_tools_json(agent.tools),
                updated_at=agent.updated_at,
            )
        )
        _expect_one(result, "agent")

    async def count_sessions(self, agent_id: AgentId) -> int:
        """How many sessions (of anyone, archived included) use the agent."""
        count = await self._db.scalar(
            select(func.count()).select_from(SessionRow).where(SessionRow.agent_id == agent_id)
        )
        return int(count or 0)

    async def delete_owned(self, agent_id: AgentId, *, owner: UserId) -> None:
        """Delete one of the owner's agents; NotFound if not theirs, Conflict if sessions use it."""
        try:
            result = await self._db.execute(
                delete(AgentRow).where(
                    AgentRow.id == agent_id,
                    AgentRow.owner_id == owner,
                    AgentRow.is_default.is_(False),
                )
            )
        except IntegrityError:
            # sessions.agent_id is ON DELETE RESTRICT: a session made since the caller looked.
            raise Conflict(
                "the agent is used by sessions; delete those sessions first",
                detail={"agent_id": str(agent_id)},
            ) from None
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
        found = (
            await self._db.execute(
                select(SessionRow, _ACTIVE_RUN_ID).where(
                    SessionRow.id == session_id, SessionRow.owner_id == owner
                )
            )
        ).first()
        return None if found is None else _session(found[0], active_run_id=found[1])

    async def list_owned(
        self,
        *,
        owner: UserId,
        before: uuid.UUID | None,
        limit: int,
        title_contains: str | None = None,
    ) -> list[Session]:
        """Up to ``limit`` of the owner's sessions, newest first, older than ``before``;
        with ``title_contains``, those whose title contains it (any case)."""
        query = select(SessionRow, _ACTIVE_RUN_ID).where(SessionRow.owner_id == owner)
        if before is not None:
            query = query.where(SessionRow.id < before)
        if title_contains:
            query = query.where(SessionRow.title.icontains(title_contains, autoescape=True))
        rows = await self._db.execute(query.order_by(SessionRow.id.desc()).limit(limit))
        return [_session(row, active_run_id=active) for row, active in rows]

    async def update(self, session: Session) -> None:
        """Store the session's title, status and update time; NotFound if it is gone."""
        result = await self._db.execute(
            update(SessionRow)
            .where(SessionRow.id == session.id, SessionRow.owner_id == session.owner_id)
            .values(title=session.title, status=session.status.value, updated_at=session.updated_at)
        )
        _expect_one(result, "session")

    async def delete_owned(self, session_id: SessionId, *, owner: UserId) -> None:
        """Delete the session and everything in it; NotFound if missing or not the owner's.

        Its runs are locked first (in id order), then the session: the order in which an
        executor's write takes them (its run, then the session its model messages point to),
        so that deleting a session while its run writes waits for that write instead of
        deadlocking with it.
        """
        await self._db.execute(
            select(RunRow.id)
            .where(
                RunRow.session_id.in_(
                    select(SessionRow.id).where(
                        SessionRow.id == session_id, SessionRow.owner_id == owner
                    )
                )
            )
            .order_by(RunRow.id)
            .with_for_update()
        )
        result = await self._db.execute(
            delete(SessionRow).where(SessionRow.id == session_id, SessionRow.owner_id == owner)
        )
        _expect_one(result, "session")

    async def changed_since(
        self, owners: list[UserId], since: datetime
    ) -> list[tuple[UserId, SessionId, datetime]]:
        """The owners' sessions changed since ``since``: owner, session and when."""
        rows = await self._db.execute(
            select(SessionRow.owner_id, SessionRow.id, SessionRow.updated_at).where(
                SessionRow.updated_at > since, SessionRow.owner_id.in_(owners)
            )
        )
        return [(UserId(owner), SessionId(session), at) for owner, session, at in rows]

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

    async def list_newest(
        self, session_id: SessionId, *, before_seq: int | None, limit: int
    ) -> list[Message]:
        """Up to ``limit`` messages with ``seq`` below ``before_seq`` (any, if None), newest
        first."""
        conditions = [MessageRow.session_id == session_id]
        if before_seq is not None:
            conditions.append(MessageRow.seq < before_seq)
        rows = await self._db.scalars(
            select(MessageRow).where(*conditions).order_by(MessageRow.seq.desc()).limit(limit)
        )
        return [_message(row) for row in rows]

    async def list(self, session_id: SessionId, *, after_seq: int, limit: int) -> list[Message]:
        """Up to ``limit`` messages with ``seq`` above ``after_seq``, oldest first."""
        rows = await self._db.scalars(
            select(MessageRow)
            .where(MessageRow.session_id == session_id, MessageRow.seq > after_seq)
            .order_by(MessageRow.seq)
            .limit(limit)
        )
        return [_message(row) for row in rows]

    async def add(self, message: Message) -> None:
        """Insert a message; its ``seq`` must be the session's next (see ``next_seq``)."""
        self._db.add(
            MessageRow(
                id=message.id,
                session_id=message.session_id,
                seq=message.seq,
                role=message.role.value,
                content=message.content,
                run_id=message.run_id,
                created_at=message.created_at,
            )
        )
        await self._db.flush()

    async def add_next(
        self,
        *,
        message_id: MessageId,
        session_id: SessionId,
        role: MessageRole,
        content: str,
        run_id: RunId | None,
        at: datetime,
    ) -> Message:
        """Insert the session's next message (its ``seq`` is the newest + 1) in one statement.

        Two concurrent inserts on one session both pick the same ``seq``; the unique key
        turns the second into a Conflict.
        """
        content = storable(content)  # model text: stored the same on every database
        next_seq = (
            select(func.coalesce(func.max(MessageRow.seq), 0) + 1)
            .where(MessageRow.session_id == session_id)
            .scalar_subquery()
        )
        seq = await self._db.scalar(
            insert(_MESSAGES)  # the Core table: no ORM bulk-insert bookkeeping
            .values(
                id=message_id,
                session_id=session_id,
                seq=next_seq,
                role=role.value,
                content=content,
                run_id=run_id,
                created_at=at,
            )
            .returning(_MESSAGES.c.seq)
        )
        assert seq is not None
        return Message(
            id=message_id,
            session_id=session_id,
            seq=seq,
            role=role,
            content=content,
            run_id=run_id,
            created_at=at,
        )


_RUNS: Table = Base.metadata.tables[RunRow.__tablename__]
"""Hot statements use the Core table, not the ORM class: no ORM bulk bookkeeping."""
_APPROVALS: Table = Base.metadata.tables[ApprovalRow.__tablename__]
_MESSAGES: Table = Base.metadata.tables[MessageRow.__tablename__]
_REPLY_TYPES = [EventType.RUN_STARTED.value, EventType.TEXT_DELTA.value]
_QUESTION_TYPES = [EventType.APPROVAL_REQUIRED.value]
_JOURNAL_TYPES = [EventType.TOOL_CALL.value, EventType.TOOL_RESULT.value]
_INSERT_MODEL_MESSAGE = insert(Base.metadata.tables[ModelMessageRow.__tablename__])
_INSERT_EVENT = insert(Base.metadata.tables[EventRow.__tablename__])
_PG_INSERT_EVENTS = text(
    "INSERT INTO events (run_id, seq, type, attempt, data, created_at) "
    "SELECT * FROM unnest(CAST(:run_ids AS uuid[]), CAST(:seqs AS integer[]), "
    "CAST(:types AS varchar[]), CAST(:attempts AS integer[]), CAST(:datas AS jsonb[]), "
    "CAST(:created AS timestamptz[]))"
)
"""Built once: executed with a list of rows it is an executemany, compiled once per process."""


_PG_SET = {
    "history_seq": "history_seq = CAST(:history_seq AS integer)",
    "status": "status = CAST(:status AS varchar)",
    "error": "error = CAST(:error AS text)",
    "finished_at": "finished_at = CAST(:finished_at AS timestamptz)",
    "owner": "owner = NULL",
    "lease_expires_at": "lease_expires_at = NULL",
}
"""The run values a one-statement write sets (the lease only ever released)."""


@functools.cache
def _pg_write(
    values: frozenset[str], *, checkpoint: bool, reply: bool, history: bool, truncate: bool
) -> Any:
    """A run's batch in one statement on PostgreSQL (``RunRepository.write``): the fenced
    UPDATE of the run, then (only if it matched) the assistant's message, the events, the
    model messages. The sub-statements see one snapshot and commit together.
    Built once for each shape (which values, which parts), so that it sets only what it must.

    With ``truncate`` the model messages replace the session's from ``messages_after`` on:
    those past the new ones are deleted and the new ones overwrite what holds their places
    (sub-statements of one statement cannot be ordered, so none of them may touch a row
    another one touches). The DELETE sees the statement's snapshot, taken before ``bumped``
    may have waited for the run's lock: only the run holding that lock writes the session's
    newest model messages, so nothing it should see can commit in between.
    """
    changes = [
        "last_seq = runs.last_seq + CAST(:count AS integer)",
        "updated_at = CAST(:at AS timestamptz)",
    ]
    if checkpoint:
        changes.append("checkpoint_seq = runs.last_seq + CAST(:checkpoint_after AS integer)")
    changes.extend(_PG_SET[name] for name in sorted(values))
    # Only the constant fragments above go into the text; every value is a bound parameter.
    parts = [
        f"""bumped AS (
    UPDATE runs SET {", ".join(changes)}
    WHERE runs.id = CAST(:run_id AS uuid) AND runs.owner = CAST(:owner AS varchar)
        AND runs.attempt = CAST(:attempt AS integer) AND runs.status = 'running'
    RETURNING runs.last_seq, runs.attempt
)"""  # noqa: S608
    ]
    data = "e.data"
    reply_seq = "CAST(NULL AS integer)"
    if reply:
        parts.append(
            """reply AS (
    INSERT INTO messages (id, session_id, seq, role, content, run_id, created_at)
    SELECT CAST(:message_id AS uuid), CAST(:session_id AS uuid),
        (SELECT coalesce(max(m.seq), 0) + 1 FROM messages AS m
            WHERE m.session_id = CAST(:session_id AS uuid)),
        'assistant', CAST(:content AS text), CAST(:run_id AS uuid), CAST(:at AS timestamptz)
    FROM bumped
    RETURNING messages.seq
)"""
        )
        data = (
            "CASE WHEN e.type = 'message.completed' "
            "THEN e.data || jsonb_build_object('seq', (SELECT reply.seq FROM reply)) "
            "ELSE e.data END"
        )
        reply_seq = "(SELECT reply.seq FROM reply)"
    parts.append(
        f"""written AS (
    INSERT INTO events (run_id, seq, type, attempt, data, created_at)
    SELECT CAST(:run_id AS uuid), bumped.last_seq - CAST(:count AS integer) + e.ord, e.type,
        bumped.attempt, {data}, CAST(:at AS timestamptz)
    FROM bumped, unnest(CAST(:types AS varchar[]), CAST(:datas AS jsonb[])) WITH ORDINALITY
        AS e(type, data, ord)
)"""  # noqa: S608
    )
    if truncate:
        parts.append(
            """cut AS (
    DELETE FROM model_messages
    WHERE model_messages.session_id = CAST(:session_id AS uuid)
        AND model_messages.seq > CAST(:messages_after AS integer) + CAST(:message_count AS integer)
        AND EXISTS (SELECT FROM bumped)
)"""
        )
    if history:
        overwrite = (
            "\n    ON CONFLICT (session_id, seq) DO UPDATE SET run_id = excluded.run_id, "
            "data = excluded.data, created_at = excluded.created_at"
            if truncate
            else ""
        )
        parts.append(
            f"""history AS (
    INSERT INTO model_messages (session_id, seq, run_id, data, created_at)
    SELECT CAST(:session_id AS uuid), CAST(:messages_after AS integer) + h.ord,
        CAST(:run_id AS uuid), h.data, CAST(:at AS timestamptz)
    FROM bumped, unnest(CAST(:messages AS jsonb[])) WITH ORDINALITY AS h(data, ord){overwrite}
)"""  # noqa: S608
        )
    return text(
        "WITH "
        + ",\n".join(parts)
        + f"\nSELECT bumped.last_seq, bumped.attempt, {reply_seq} FROM bumped"
    )


_PG_WRITE_MANY = text(
    """
WITH batch AS (
    SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:owners AS varchar[]),
        CAST(:attempts AS integer[]), CAST(:counts AS integer[]),
        CAST(:checkpoints AS integer[]), CAST(:histories AS integer[]))
        AS b(id, owner, attempt, n, checkpoint_after, history_seq)
), bumped AS (
    UPDATE runs SET
        last_seq = runs.last_seq + batch.n,
        updated_at = CAST(:at AS timestamptz),
        checkpoint_seq = CASE WHEN batch.checkpoint_after IS NULL THEN runs.checkpoint_seq
            ELSE runs.last_seq + batch.checkpoint_after END,
        history_seq = coalesce(batch.history_seq, runs.history_seq)
    FROM batch
    WHERE runs.id = batch.id AND runs.owner = batch.owner AND runs.attempt = batch.attempt
        AND runs.status = 'running'
        -- Locked in id order first, as the lease keeper locks them: the two never deadlock.
        AND runs.id IN (SELECT locked.id FROM runs AS locked
            WHERE locked.id = ANY(CAST(:ids AS uuid[])) ORDER BY locked.id
            FOR NO KEY UPDATE)
    RETURNING runs.id, runs.last_seq, runs.attempt, batch.n
), written AS (
    INSERT INTO events (run_id, seq, type, attempt, data, created_at)
    SELECT e.run_id, bumped.last_seq - bumped.n + e.ord, e.type, bumped.attempt, e.data,
        CAST(:at AS timestamptz)
    FROM unnest(CAST(:event_runs AS uuid[]), CAST(:event_ords AS integer[]),
        CAST(:types AS varchar[]), CAST(:datas AS jsonb[])) AS e(run_id, ord, type, data)
    JOIN bumped ON bumped.id = e.run_id
), history AS (
    INSERT INTO model_messages (session_id, seq, run_id, data, created_at)
    SELECT h.session_id, h.seq, h.run_id, h.data, CAST(:at AS timestamptz)
    FROM unnest(CAST(:message_sessions AS uuid[]), CAST(:message_seqs AS integer[]),
        CAST(:message_runs AS uuid[]), CAST(:messages AS jsonb[]))
        AS h(session_id, seq, run_id, data)
    JOIN bumped ON bumped.id = h.run_id
)
SELECT bumped.id, bumped.last_seq, bumped.attempt FROM bumped
"""
)
"""Several runs' batches in one statement on PostgreSQL (``RunRepository.append_many``):
each run's fenced UPDATE, then the events and model messages of the runs that matched."""


def fits_one_statement_group(batches: list[RunBatch]) -> bool:
    """Whether ``RunRepository.append_many`` writes these batches (of distinct runs, none
    replacing history, none setting run values but a checkpoint's) in one statement."""
    return len({batch.run_id for batch in batches}) == len(batches) and all(
        not batch.truncate and (batch.values or {}).keys() <= {"history_seq"} for batch in batches
    )


ONE_STATEMENT_VALUES = frozenset(
    {"status", "history_seq", "error", "finished_at", "owner", "lease_expires_at"}
)


def fits_one_statement(batch: RunBatch) -> bool:
    """Whether ``RunRepository.write`` writes this batch in one statement on PostgreSQL: run
    values of the kinds a turn's end sets (the lease released as a whole, or not at all)."""
    values = batch.values or {}
    releases = [values.get(key, ...) for key in ("owner", "lease_expires_at")]
    return values.keys() <= ONE_STATEMENT_VALUES and (
        releases == [..., ...] or releases == [None, None]
    )


class RunRepository:
    """Runs, their leases and their event logs.

    Every write an executor makes is fenced: it names the lease (owner and attempt) and the
    ``running`` status, so a process that lost its lease (paused, partitioned) writes nothing.
    """

    def __init__(self, db_session: AsyncSession) -> None:
        self._db = db_session

    async def add(
        self,
        run: Run,
        *,
        at: datetime,
        owner: str | None = None,
        lease_until: datetime | None = None,
    ) -> None:
        """Insert a new run (claimed already when ``owner`` and ``lease_until`` are given);
        Conflict (RunActive upstream) if the session already has one."""
        await self._db.execute(
            insert(RunRow).values(
                id=run.id,
                session_id=run.session_id,
                status=run.status.value,
                attempt=run.attempt,
                error=run.error,
                owner=owner,
                lease_expires_at=lease_until,
                history_seq=None,
                retries=0,
                handbacks=0,
                last_seq=0,
                checkpoint_seq=0,
                created_at=run.created_at,
                updated_at=at,
                finished_at=None,
            )
        )

    async def get_owned(self, run_id: RunId, *, session_id: SessionId, owner: UserId) -> Run | None:
        """The run if it belongs to the session and the session to ``owner`` (one statement)."""
        row = await self._db.scalar(
            select(RunRow)
            .join(SessionRow, SessionRow.id == RunRow.session_id)
            .where(
                RunRow.id == run_id,
                RunRow.session_id == session_id,
                SessionRow.owner_id == owner,
            )
        )
        return None if row is None else _run(row)

    async def get(self, run_id: RunId, *, session_id: SessionId) -> Run | None:
        """The run if it belongs to the session."""
        row = await self._db.scalar(
            select(RunRow).where(RunRow.id == run_id, RunRow.session_id == session_id)
        )
        return None if row is None else _run(row)

    async def lock(self, run_id: RunId) -> RunStatus | None:
        """Lock the run's row until the transaction ends; its status then (None: no such run).

        The one lock order for a run and its approvals is the run first, then its approvals:
        a decision or an expiry takes this lock before it touches the approval, as a cancel's
        UPDATE of the run comes before it expires the approvals, so that two of them queue
        instead of deadlocking. PostgreSQL: ``FOR NO KEY UPDATE``, the lock the run's UPDATE
        takes anyway. SQLite renders no lock clause: its one writer already runs alone.
        """
        status = await self._db.scalar(
            select(RunRow.status).where(RunRow.id == run_id).with_for_update(key_share=True)
        )
        return None if status is None else RunStatus(status)

    async def get_active(self, session_id: SessionId) -> Run | None:
        """The session's run that has not ended, if there is one."""
        row = await self._db.scalar(
            select(RunRow).where(
                RunRow.session_id == session_id,
                RunRow.status.in_([status.value for status in _ACTIVE]),
            )
        )
        return None if row is None else _run(row)

    async def claim(
        self,
        *,
        owner: str,
        now: datetime,
        lease_until: datetime,
        limit: int = 1,
        run_id: RunId | None = None,
    ) -> list[ClaimedRun]:
        """Take up to ``limit`` of the oldest queued runs, or running ones whose lease ran out.

        One statement: the rows are picked with ``FOR UPDATE SKIP LOCKED`` (PostgreSQL), so
        executors in other processes never take the same run. With ``run_id``: that run only,
        if it is queued (a decision's transaction, which holds its row, hands it over).
        """
        waiting = or_(
            RunRow.status == RunStatus.QUEUED.value,
            and_(
                RunRow.status == RunStatus.RUNNING.value,
                RunRow.lease_expires_at < now,
            ),
        )
        if run_id is not None:
            waiting = and_(RunRow.id == run_id, RunRow.status == RunStatus.QUEUED.value)
        claimable = (
            select(RunRow.id)
            .where(waiting)
            .order_by(RunRow.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        rows = (
            await self._db.execute(
                update(RunRow)
                .where(RunRow.id.in_(claimable))
                .values(
                    status=RunStatus.RUNNING.value,
                    owner=owner,
                    attempt=RunRow.attempt + 1,
                    # Taking over a running run (its process stopped or let it go) is a
                    # retry; claiming a queued one (new, or decided) is not.
                    retries=RunRow.retries
                    + case((RunRow.status == RunStatus.RUNNING.value, 1), else_=0),
                    lease_expires_at=lease_until,
                    updated_at=now,
                )
                .returning(
                    RunRow.id,
                    RunRow.session_id,
                    RunRow.attempt,
                    RunRow.retries,
                    RunRow.history_seq,
                    RunRow.last_seq,
                    RunRow.checkpoint_seq,
                    RunRow.created_at,
                )
            )
        ).all()
        claimed = [
            ClaimedRun(
                run=Run(
                    id=RunId(row.id),
                    session_id=SessionId(row.session_id),
                    status=RunStatus.RUNNING,
                    attempt=row.attempt,
                    error=None,
                    created_at=row.created_at,
                    finished_at=None,
                ),
                lease=Lease(owner=owner, attempt=row.attempt),
                history_seq=row.history_seq,
                retries=row.retries,
                last_seq=row.last_seq,
                checkpoint_seq=row.checkpoint_seq,
            )
            for row in rows
        ]
        return sorted(claimed, key=lambda found: found.run.created_at)

    async def changed_since(
        self, owners: list[UserId], since: datetime
    ) -> list[tuple[UserId, SessionId, RunId, RunStatus]]:
        """The owners' runs written since ``since``: owner, session, run and status now."""
        rows = await self._db.execute(
            select(SessionRow.owner_id, RunRow.session_id, RunRow.id, RunRow.status)
            .join(SessionRow, SessionRow.id == RunRow.session_id)
            .where(RunRow.updated_at > since, SessionRow.owner_id.in_(owners))
        )
        return [
            (UserId(owner), SessionId(session), RunId(run), RunStatus(status))
            for owner, session, run, status in rows
        ]

    async def release_lease(
        self, run_id: RunId, lease: Lease, *, at: datetime, free_handbacks: int | None = None
    ) -> None:
        """Let the run go: claimable again at once (still ``running``: the claim that takes
        it over counts a retry). A shutdown letting it go passes ``free_handbacks``: so many
        hand-backs of a run are not retries, later ones are."""
        values: dict[str, Any] = {"owner": None, "lease_expires_at": at}
        if free_handbacks is not None:
            values["handbacks"] = _RUNS.c.handbacks + 1
            # The takeover's +1 makes it even while the run has free hand-backs left.
            values["retries"] = _RUNS.c.retries - case(
                (_RUNS.c.handbacks < free_handbacks, 1), else_=0
            )
        await self._db.execute(update(_RUNS).where(*_fenced(run_id, lease)).values(**values))

    async def extend_leases(
        self, *, owner: str, run_ids: list[RunId], until: datetime
    ) -> set[tuple[RunId, int]]:
        """Push out the leases of these runs that ``owner`` still holds; which it holds, with
        their attempts (one statement per 500 runs)."""
        kept: set[tuple[RunId, int]] = set()
        ordered = sorted(run_ids)
        for start in range(0, len(ordered), 500):
            # Locked in id order, as the event writer locks the runs of a group: two such
            # transactions queue behind each other instead of deadlocking.
            held = (
                select(RunRow.id)
                .where(
                    RunRow.id.in_(ordered[start : start + 500]),
                    RunRow.owner == owner,
                    RunRow.status == RunStatus.RUNNING.value,
                )
                .order_by(RunRow.id)
                .with_for_update(key_share=True)
            )
            rows = await self._db.execute(
                update(RunRow)
                .where(RunRow.id.in_(held))
                .values(lease_expires_at=until)
                .returning(RunRow.id, RunRow.attempt)
            )
            kept.update((RunId(row.id), row.attempt) for row in rows)
        return kept

    async def expire_leases(self, *, now: datetime) -> int:
        """Make every running run claimable now (SQLite start-up: their process is gone)."""
        result = await self._db.execute(
            update(RunRow)
            .where(RunRow.status == RunStatus.RUNNING.value)
            .values(lease_expires_at=now)
        )
        return _rowcount(result)

    async def append(
        self,
        run_id: RunId,
        events: list[NewEvent],
        *,
        at: datetime,
        lease: Lease | None = None,
        expect: tuple[RunStatus, ...] = (),
        values: JSONObject | None = None,
        checkpoint_after: int | None = None,
    ) -> list[RunEvent]:
        """Append events to the run's log with one fenced UPDATE (plus ``values``) and one INSERT.

        ``checkpoint_after``: the history in ``values`` covers the first that many of ``events``
        (and everything before them); a retry starts there.
        With ``lease`` the write is the executor's: LeaseLost unless it still holds the run.
        With ``expect`` it is a person's (a decision, a cancel): NotFound-like Conflict unless
        the run is in one of those states.
        """
        conditions = (
            _fenced(run_id, lease)
            if lease is not None
            else [_RUNS.c.id == run_id, _RUNS.c.status.in_([status.value for status in expect])]
        )
        stored = await self._bump(
            run_id, events, conditions, at=at, values=values, checkpoint_after=checkpoint_after
        )
        if stored is None:
            if lease is not None:
                raise LeaseLost(f"run {run_id} is no longer held by {lease.owner}")
            states = " or ".join(status.value for status in expect)
            raise Conflict(f"run {run_id} is no longer {states}")
        await self._insert_events(stored)
        return stored

    async def append_many(
        self, batches: list[RunBatch], *, at: datetime
    ) -> list[list[RunEvent] | LeaseLost]:
        """The executor's batches of several runs at once, each as in ``append`` under its
        lease (plus its model messages), with one INSERT of all their events; on PostgreSQL,
        batches that ``fits_one_statement_group`` in one statement; on SQLite, one script.

        A run whose lease is gone gets LeaseLost in its place and writes nothing; the others
        are not affected. The runs are written (so locked) in id order, as the lease keeper
        locks them, so that the two never deadlock.
        """
        if self._db.get_bind().dialect.name != "postgresql":
            return await self._write_sqlite(batches, at=at)
        if fits_one_statement_group(batches):
            return await self._write_many_one_statement(batches, at=at)
        results: list[list[RunEvent] | LeaseLost] = [LeaseLost("not written")] * len(batches)
        every: list[RunEvent] = []
        messages: list[dict[str, Any]] = []
        for index in sorted(range(len(batches)), key=lambda position: batches[position].run_id):
            batch = batches[index]
            stored = await self._bump_batch(batch, at=at)
            if stored is None:
                results[index] = _lease_lost(batch)
                continue
            results[index] = stored
            every.extend(stored)
            if batch.truncate:
                await self._db.execute(
                    delete(ModelMessageRow).where(
                        ModelMessageRow.session_id == batch.session_id,
                        ModelMessageRow.seq > batch.messages_after,
                    )
                )
            messages.extend(_batch_message_rows(batch, at=at))
        if messages:
            await self._db.execute(_INSERT_MODEL_MESSAGE, messages)
        await self._insert_events(every)
        return results

    async def _write_many_one_statement(
        self, batches: list[RunBatch], *, at: datetime
    ) -> list[list[RunEvent] | LeaseLost]:
        events = [[(e.type, storable(e.data)) for e in batch.events] for batch in batches]
        params: dict[str, Any] = {
            "at": at,
            "ids": [batch.run_id for batch in batches],
            "owners": [batch.lease.owner for batch in batches],
            "attempts": [batch.lease.attempt for batch in batches],
            "counts": [len(batch.events) for batch in batches],
            "checkpoints": [batch.checkpoint_after for batch in batches],
            "histories": [(batch.values or {}).get("history_seq") for batch in batches],
            "event_runs": [],
            "event_ords": [],
            "types": [],
            "datas": [],
            "message_sessions": [],
            "message_seqs": [],
            "message_runs": [],
            "messages": [],
        }
        for batch, batch_events in zip(batches, events, strict=True):
            for index, (kind, data) in enumerate(batch_events):
                params["event_runs"].append(batch.run_id)
                params["event_ords"].append(index + 1)
                params["types"].append(kind.value)
                params["datas"].append(json.dumps(data))
            for index, message in enumerate(batch.messages):
                params["message_sessions"].append(batch.session_id)
                params["message_seqs"].append(batch.messages_after + index + 1)
                params["message_runs"].append(batch.run_id)
                params["messages"].append(json.dumps(storable(message)))
        bumped = {
            RunId(row.id): (row.last_seq, row.attempt)
            for row in await self._db.execute(_PG_WRITE_MANY, params)
        }
        results: list[list[RunEvent] | LeaseLost] = []
        for batch, batch_events in zip(batches, events, strict=True):
            found = bumped.get(batch.run_id)
            if found is None:
                results.append(_lease_lost(batch))
                continue
            last_seq, run_attempt = found
            results.append(_numbered(batch.run_id, batch_events, last_seq, run_attempt, at))
        return results

    async def write(
        self,
        batch: RunBatch,
        *,
        at: datetime,
        reply: AssistantReply | None = None,
    ) -> list[RunEvent]:
        """One run's batch under its lease (as ``append_many``) and, with ``reply``, the
        assistant's message: the batch's ``message.completed`` event gets its ``seq``.
        LeaseLost (and nothing written) unless the run is still held.

        On PostgreSQL a batch that ``fits_one_statement`` is written by one statement (in
        autocommit: one round trip, its own transaction); anything else takes several, in the
        unit of work's transaction. The run is written first (so locked first), then the rest.
        On SQLite any batch is one script (``sqlite_writes.batch_steps``).
        """
        if self._db.get_bind().dialect.name != "postgresql":
            written = (await self._write_sqlite([batch], at=at, reply=reply))[0]
            if isinstance(written, LeaseLost):
                raise written
            return written
        if fits_one_statement(batch):
            return await self._write_one_statement(batch, at=at, reply=reply)
        stored = await self._bump_batch(batch, at=at)
        if stored is None:
            raise _lease_lost(batch)
        if reply is not None:
            message = await MessageRepository(self._db).add_next(
                message_id=reply.message_id,
                session_id=batch.session_id,
                role=MessageRole.ASSISTANT,
                content=reply.content,
                run_id=batch.run_id,
                at=at,
            )
            stored = [_with_message_seq(event, message.seq) for event in stored]
        await self._insert_events(stored)
        if batch.truncate:
            await self._db.execute(
                delete(ModelMessageRow).where(
                    ModelMessageRow.session_id == batch.session_id,
                    ModelMessageRow.seq > batch.messages_after,
                )
            )
        if batch.messages:
            await self._db.execute(_INSERT_MODEL_MESSAGE, _batch_message_rows(batch, at=at))
        return stored

    async def _write_sqlite(
        self, batches: list[RunBatch], *, at: datetime, reply: AssistantReply | None = None
    ) -> list[list[RunEvent] | LeaseLost]:
        """Batches (and one batch's ``reply``) on SQLite in one script: in one hand-off, and
        in a ``one_statement`` unit of work a transaction by itself. The runs are written in
        id order (a run's own batches in theirs)."""
        order = sorted(range(len(batches)), key=lambda position: batches[position].run_id)
        data = [[storable(event.data) for event in batch.events] for batch in batches]
        steps: list[Step] = []
        ends: dict[int, tuple[int, int | None]] = {}
        for index in order:
            batch_steps, reply_at = sqlite_writes.batch_steps(
                batches[index], data[index], at=at, reply=reply if len(batches) == 1 else None
            )
            first = len(steps)
            steps.extend(batch_steps)
            ends[index] = (len(steps) - 1, None if reply_at is None else first + reply_at)
        results = await run_script(self._db, steps)
        written: list[list[RunEvent] | LeaseLost] = []
        for index, batch in enumerate(batches):
            bump_at, reply_at = ends[index]
            if not results[bump_at]:
                written.append(_lease_lost(batch))
                continue
            last_seq, run_attempt = results[bump_at][0]
            kinds = [event.type for event in batch.events]
            events = list(zip(kinds, data[index], strict=True))
            stored = _numbered(batch.run_id, events, last_seq, run_attempt, at)
            if reply_at is not None:
                message_seq = results[reply_at][0][0]
                stored = [_with_message_seq(event, message_seq) for event in stored]
            written.append(stored)
        return written

    async def _write_one_statement(
        self,
        batch: RunBatch,
        *,
        at: datetime,
        reply: AssistantReply | None,
    ) -> list[RunEvent]:
        values = batch.values or {}
        events = [(event.type, storable(event.data)) for event in batch.events]
        params: dict[str, Any] = {
            "run_id": batch.run_id,
            "owner": batch.lease.owner,
            "attempt": batch.lease.attempt,
            "count": len(events),
            "at": at,
            "types": [kind.value for kind, _data in events],
            "datas": [json.dumps(data) for _kind, data in events],
        }
        if batch.checkpoint_after is not None:
            params["checkpoint_after"] = batch.checkpoint_after
        for name in ("history_seq", "status", "finished_at"):
            if name in values:
                params[name] = values[name]
        if "error" in values:
            params["error"] = None if values["error"] is None else storable(values["error"])
        if reply is not None or batch.messages or batch.truncate:
            params["session_id"] = batch.session_id
        if reply is not None:
            params["message_id"] = reply.message_id
            params["content"] = storable(reply.content)
        if batch.messages or batch.truncate:
            params["messages_after"] = batch.messages_after
        if batch.messages:
            params["messages"] = [json.dumps(storable(message)) for message in batch.messages]
        if batch.truncate:
            params["message_count"] = len(batch.messages)
        statement = _pg_write(
            frozenset(values),
            checkpoint=batch.checkpoint_after is not None,
            reply=reply is not None,
            history=bool(batch.messages),
            truncate=batch.truncate,
        )
        found = (await self._db.execute(statement, params)).one_or_none()
        if found is None:
            raise _lease_lost(batch)
        last_seq, run_attempt, message_seq = found
        stored = _numbered(batch.run_id, events, last_seq, run_attempt, at)
        if message_seq is not None:
            stored = [_with_message_seq(event, message_seq) for event in stored]
        return stored

    async def _bump_batch(self, batch: RunBatch, *, at: datetime) -> list[RunEvent] | None:
        """``_bump`` for an executor's batch, fenced by its lease."""
        return await self._bump(
            batch.run_id,
            batch.events,
            _fenced(batch.run_id, batch.lease),
            at=at,
            values=batch.values,
            checkpoint_after=batch.checkpoint_after,
        )

    async def _bump(
        self,
        run_id: RunId,
        events: list[NewEvent],
        conditions: list[Any],
        *,
        at: datetime,
        values: JSONObject | None,
        checkpoint_after: int | None,
    ) -> list[RunEvent] | None:
        """Move the run's ``last_seq`` on by the events (and set ``values``) if ``conditions``
        hold; the events as they will be stored, or None if the run did not match."""
        changes: JSONObject = {"last_seq": _RUNS.c.last_seq + len(events), "updated_at": at}
        if checkpoint_after is not None:
            changes["checkpoint_seq"] = _RUNS.c.last_seq + checkpoint_after
        # A Core statement on the table: the ORM's bulk-update bookkeeping (evaluating the
        # criteria against loaded objects, of which there are none) costs more than the SQL.
        bumped = (
            await self._db.execute(
                update(_RUNS)
                .where(*conditions)
                .values(**changes, **storable(values or {}))
                .returning(_RUNS.c.last_seq, _RUNS.c.attempt)
            )
        ).one_or_none()
        if bumped is None:
            return None
        last_seq, run_attempt = bumped
        # What streams live is what is stored.
        stored = [(event.type, storable(event.data)) for event in events]
        return _numbered(run_id, stored, last_seq, run_attempt, at)

    async def _insert_events(self, stored: list[RunEvent]) -> None:
        if not stored:
            return
        if self._db.get_bind().dialect.name == "postgresql":
            # One statement whatever the number of rows: the columns go as arrays (an
            # executemany would be one execution per row on the server).
            params: dict[str, Any] = {
                "run_ids": [event.run_id for event in stored],
                "seqs": [event.seq for event in stored],
                "types": [event.type.value for event in stored],
                "attempts": [event.attempt for event in stored],
                "datas": [json.dumps(event.data) for event in stored],
                "created": [event.created_at for event in stored],
            }
            await self._db.execute(_PG_INSERT_EVENTS, params)
            return
        # SQLite: one statement, compiled once and cached, executed with many rows in one
        # call of the driver.
        await self._db.execute(
            _INSERT_EVENT,
            [
                {
                    "run_id": event.run_id,
                    "seq": event.seq,
                    "type": event.type.value,
                    "attempt": event.attempt,
                    "data": event.data,
                    "created_at": event.created_at,
                }
                for event in stored
            ],
        )

    async def events(self, run_id: RunId, *, after_seq: int, limit: int) -> list[RunEvent]:
        """Up to ``limit`` events of the run after ``after_seq``, in order."""
        rows = await self._db.scalars(
            select(EventRow)
            .where(EventRow.run_id == run_id, EventRow.seq > after_seq)
            .order_by(EventRow.seq)
            .limit(limit)
        )
        return [_event(row) for row in rows]

    async def ended_before(
        self, before: datetime, *, after: RunId | None, limit: int
    ) -> list[RunId]:
        """Runs that ended before ``before``, in id order, from after ``after`` on."""
        query = select(RunRow.id).where(
            RunRow.status.not_in([status.value for status in _ACTIVE]),
            RunRow.finished_at < before,
        )
        if after is not None:
            query = query.where(RunRow.id > after)
        ids = await self._db.scalars(query.order_by(RunRow.id).limit(limit))
        return [RunId(run_id) for run_id in ids]

    async def delete_text_deltas(self, run_ids: list[RunId]) -> int:
        """Remove these runs' text.delta events; how many there were."""
        result = await self._db.execute(
            delete(EventRow).where(
                EventRow.run_id.in_(run_ids), EventRow.type == EventType.TEXT_DELTA.value
            )
        )
        return _rowcount(result)

    async def event_storage(self) -> tuple[int, int | None]:
        """The events' row count, and their size on disk: PostgreSQL, the table with its
        indexes and TOAST; SQLite, the database file's pages in use (all tables)."""
        rows = int(await self._db.scalar(select(func.count()).select_from(EventRow)) or 0)
        if self._db.get_bind().dialect.name == "postgresql":
            size = await self._db.scalar(text("SELECT pg_total_relation_size('events')"))
        else:
            pages = await self._db.scalar(text("PRAGMA page_count"))
            free = await self._db.scalar(text("PRAGMA freelist_count"))
            page_size = await self._db.scalar(text("PRAGMA page_size"))
            size = None if None in (pages, free, page_size) else (pages - free) * page_size
        return rows, None if size is None else int(size)

    async def resume_events(self, run_id: RunId, *, journal_after: int) -> list[RunEvent]:
        """What a run's next attempt starts from, in one statement: its text.delta and
        run.started events (its reply so far), approval.required (the order of its
        questions), and the tool.call and tool.result events after ``journal_after`` (the
        journal since its last checkpoint; older results, up to a tool output each, are not
        read)."""
        rows = await self._db.scalars(
            select(EventRow)
            .where(
                EventRow.run_id == run_id,
                or_(
                    EventRow.type.in_(_REPLY_TYPES + _QUESTION_TYPES),
                    and_(EventRow.type.in_(_JOURNAL_TYPES), EventRow.seq > journal_after),
                ),
            )
            .order_by(EventRow.seq)
        )
        return [_event(row) for row in rows]

    async def status_and_seq(self, run_id: RunId) -> tuple[RunStatus, int] | None:
        """The run's status and newest event seq (what a stream follows), or None."""
        row = (
            await self._db.execute(
                select(RunRow.status, RunRow.last_seq).where(RunRow.id == run_id)
            )
        ).one_or_none()
        return None if row is None else (RunStatus(row.status), row.last_seq)

    async def newest_seqs(self, run_ids: list[RunId]) -> dict[RunId, int]:
        """Each of these runs' newest event seq (runs that do not exist are left out)."""
        rows = await self._db.execute(
            select(RunRow.id, RunRow.last_seq).where(RunRow.id.in_(run_ids))
        )
        return {RunId(row.id): row.last_seq for row in rows}

    async def start(
        self,
        run: Run,
        *,
        owner: UserId,
        prompt: str,
        message_id: MessageId,
        lease_owner: str | None,
        lease_until: datetime | None,
    ) -> tuple[Session, TurnContext, Message] | None:
        """Start a run: the owner's session and what its turn needs (agent, workspace,
        history length), the new run (claimed already with ``lease_owner``) and the user's
        message (as ``MessageRepository.add_next``). None, and nothing written, if the
        session is missing or someone else's; Conflict (RunActive upstream) if it has a run
        going.

        On PostgreSQL this is one statement (the inserts are data-modifying CTEs that write
        only if the session is the owner's; in autocommit, one round trip); on SQLite, which
        has no such CTEs, one script (``sqlite_writes.start_steps``: one hand-off, and in a
        ``one_statement`` unit of work a transaction by itself).
        """
        session_id = run.session_id
        content = storable(prompt)
        run_row = {
            "id": run.id,
            "session_id": session_id,
            "status": run.status.value,
            "attempt": run.attempt,
            "error": run.error,
            "owner": lease_owner,
            "lease_expires_at": lease_until,
            "history_seq": None,
            "retries": 0,
            "handbacks": 0,
            "last_seq": 0,
            "checkpoint_seq": 0,
            "created_at": run.created_at,
            "updated_at": run.created_at,
            "finished_at": None,
        }
        message_row = {
            "id": message_id,
            "session_id": session_id,
            "role": MessageRole.USER.value,
            "content": content,
            "run_id": run.id,
            "created_at": run.created_at,
        }
        if self._db.get_bind().dialect.name != "postgresql":
            # One script: the session read first, then the run and the message.
            read = (
                await run_script(
                    self._db, sqlite_writes.start_steps(run_row, message_row, owner=owner)
                )
            )[0]
            if not read:
                return None
            values = read[0]
            sessions, agents = sqlite_writes.SESSION_COLUMNS, sqlite_writes.AGENT_COLUMNS
            session_row = cast(SessionRow, _row_of(SessionRow, values[:sessions]))
            agent_row = cast(AgentRow, _row_of(AgentRow, values[sessions : sessions + agents]))
            length, tail, seq = values[sessions + agents :]
        else:
            found = await self._start_postgres(run_row, message_row, owner=owner)
            if found is None:
                return None
            session_row, agent_row, length, tail, seq = found
        context = TurnContext(
            agent=_agent(agent_row),
            workspace=session_row.workspace,
            prompt=prompt,
            history_length=int(length or 0),
            history_tail=None if tail is None else RunId(tail),
        )
        message = Message(
            id=message_id,
            session_id=session_id,
            seq=int(seq),
            role=MessageRole.USER,
            content=content,
            run_id=run.id,
            created_at=run.created_at,
        )
        return _session(session_row), context, message

    async def _start_postgres(
        self, run_row: dict[str, Any], message_row: dict[str, Any], *, owner: UserId
    ) -> tuple[SessionRow, AgentRow, Any, Any, Any] | None:
        """The start as one statement: the session read, the run and message inserted by
        data-modifying CTEs that write only if the session is the owner's."""
        session_id = run_row["session_id"]
        owned = and_(SessionRow.id == session_id, SessionRow.owner_id == owner)
        is_owned = select(SessionRow.id).where(owned).exists()
        runs = _RUNS
        add_run = (
            insert(runs)
            .from_select(
                list(run_row),
                select(
                    *[literal(value, runs.c[name].type) for name, value in run_row.items()]
                ).where(is_owned),
            )
            .returning(runs.c.id)
            .cte("new_run")
        )
        messages = _MESSAGES
        next_seq = (
            select(func.coalesce(func.max(messages.c.seq), 0) + 1)
            .where(messages.c.session_id == session_id)
            .scalar_subquery()
        )
        add_message = (
            insert(messages)
            .from_select(
                [*message_row, "seq"],
                # From the new run: the run is inserted first (waiting, if another turn of
                # the session is ending, on the one-active-run index), then the message; a
                # turn's end writes its run first too, so the two queue, never deadlock.
                select(
                    *[literal(value, messages.c[name].type) for name, value in message_row.items()],
                    next_seq,
                ).select_from(add_run),
            )
            .returning(messages.c.seq)
            .cte("new_message")
        )
        found = (
            await self._db.execute(
                select(
                    SessionRow,
                    AgentRow,
                    *_history_position(session_id),
                    select(add_message.c.seq).scalar_subquery(),
                )
                .join(AgentRow, AgentRow.id == SessionRow.agent_id)
                .where(owned)
            )
        ).one_or_none()
        if found is None:
            return None
        session_row, agent, length, tail, seq = found[:5]
        return session_row, agent, length, tail, seq

    async def turn_context(self, run_id: RunId, *, session_id: SessionId) -> TurnContext:
        """The agent, workspace, prompt and history length a run's turn needs, in one
        statement (the history itself is read apart, unless this process holds it)."""
        prompt = (
            select(MessageRow.content)
            .where(MessageRow.run_id == run_id, MessageRow.role == MessageRole.USER.value)
            .limit(1)
            .scalar_subquery()
        )
        found = (
            await self._db.execute(
                select(AgentRow, SessionRow.workspace, prompt, *_history_position(session_id))
                .join(SessionRow, SessionRow.agent_id == AgentRow.id)
                .where(SessionRow.id == session_id)
            )
        ).one_or_none()
        if found is None:
            raise NotFound(f"session {session_id} not found")
        agent, workspace, prompt_text, length, tail = found
        return TurnContext(
            agent=_agent(agent),
            workspace=workspace,
            prompt=prompt_text or "",
            history_length=int(length or 0),
            history_tail=None if tail is None else RunId(tail),
        )


class ModelMessageRepository:
    """The agent's conversation as the model sees it: each message stored once, in order.

    A session's messages are ``seq`` 1..n. A run adds its own at the end as its checkpoints
    happen; when a run fails or is cancelled its messages go (they are the newest), so what
    is stored is always the history the next turn continues.
    """

    def __init__(self, db_session: AsyncSession) -> None:
        self._db = db_session

    async def load(self, session_id: SessionId, *, upto: int) -> list[Any]:
        """The session's messages (JSON) with ``seq`` up to ``upto``, in order."""
        if upto <= 0:
            return []
        rows = await self._db.scalars(
            select(ModelMessageRow.data)
            .where(ModelMessageRow.session_id == session_id, ModelMessageRow.seq <= upto)
            .order_by(ModelMessageRow.seq)
        )
        return list(rows)

    async def append(
        self,
        session_id: SessionId,
        run_id: RunId,
        messages: list[Any],
        *,
        after: int,
        at: datetime,
    ) -> None:
        """Store ``messages`` as the session's ``seq`` ``after + 1`` onwards."""
        if not messages:
            return
        await self._db.execute(
            _INSERT_MODEL_MESSAGE,
            _model_message_rows(session_id, run_id, messages, after=after, at=at),
        )

    async def truncate(self, session_id: SessionId, *, after: int) -> None:
        """Delete the session's messages after ``after`` (they are about to be replaced)."""
        await self._db.execute(
            delete(ModelMessageRow).where(
                ModelMessageRow.session_id == session_id, ModelMessageRow.seq > after
            )
        )

    async def discard_run(self, run_id: RunId) -> None:
        """Forget the messages of a run that failed or was cancelled."""
        await self._db.execute(delete(ModelMessageRow).where(ModelMessageRow.run_id == run_id))


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

    async def list_owned(
        self,
        *,
        owner: UserId,
        status: ApprovalStatus | None,
        now: datetime,
        after: uuid.UUID | None,
        limit: int,
    ) -> list[Approval]:
        """Up to ``limit`` of the owner's approvals across sessions, oldest first; with
        ``status``, only those (``pending``: unexpired ones)."""
        conditions = [SessionRow.owner_id == owner]
        if status is not None:
            conditions.append(ApprovalRow.status == status.value)
        if status is ApprovalStatus.PENDING:
            conditions.append(ApprovalRow.expires_at > now)
        if after is not None:
            conditions.append(ApprovalRow.id > after)
        rows = await self._db.scalars(
            select(ApprovalRow)
            .join(SessionRow, SessionRow.id == ApprovalRow.session_id)
            .where(*conditions)
            .order_by(ApprovalRow.id)
            .limit(limit)
        )
        return [_approval(row) for row in rows]

    async def changed_since(
        self, owners: list[UserId], since: datetime
    ) -> list[tuple[UserId, Approval]]:
        """The owners' approvals made or decided since ``since``, with their owner."""
        rows = await self._db.execute(
            select(SessionRow.owner_id, ApprovalRow)
            .join(SessionRow, SessionRow.id == ApprovalRow.session_id)
            .where(
                SessionRow.owner_id.in_(owners),
                or_(ApprovalRow.created_at > since, ApprovalRow.decided_at > since),
            )
            .order_by(ApprovalRow.id)
        )
        return [(UserId(owner), _approval(row)) for owner, row in rows]

    async def add(self, approval: Approval) -> None:
        """Insert a pending approval."""
        self._db.add(
            ApprovalRow(
                id=approval.id,
                run_id=approval.run_id,
                session_id=approval.session_id,
                tool_call_id=storable(approval.tool_call_id),
                tool=storable(approval.tool),
                arguments=storable(approval.arguments),
                status=approval.status.value,
                decided_by=approval.decided_by,
                decided_at=approval.decided_at,
                reason=approval.reason,
                expires_at=approval.expires_at,
                created_at=approval.created_at,
                asked_because=storable(approval.asked_because),
            )
        )
        await self._db.flush()

    async def get(self, approval_id: ApprovalId, *, session_id: SessionId) -> Approval | None:
        """The approval if it belongs to the session (as stored now: read again after a lock)."""
        row = await self._db.scalar(
            select(ApprovalRow)
            .where(ApprovalRow.id == approval_id, ApprovalRow.session_id == session_id)
            .execution_options(populate_existing=True)
        )
        return None if row is None else _approval(row)

    async def save_decision(self, approval: Approval) -> int:
        """Record a decision; how many of the run's other approvals still wait (read in the
        same statement). AlreadyDecided-style Conflict if someone decided first."""
        others = _APPROVALS.alias("others")
        # Named with their table: SQLite's RETURNING renders plain columns unqualified, which
        # inside the subquery would name the alias's own.
        waiting = (
            select(func.count())
            .select_from(others)
            .where(
                others.c.run_id == literal_column("approvals.run_id"),
                others.c.status == ApprovalStatus.PENDING.value,
                others.c.id != literal_column("approvals.id"),
            )
            .scalar_subquery()
        )
        found = await self._db.scalar(
            update(_APPROVALS)
            .where(
                _APPROVALS.c.id == approval.id,
                _APPROVALS.c.status == ApprovalStatus.PENDING.value,
            )
            .values(
                status=approval.status.value,
                decided_by=approval.decided_by,
                decided_at=approval.decided_at,
                reason=approval.reason,
                decided_arguments=approval.decided_arguments,
            )
            .returning(waiting)
        )
        if found is None:
            raise AlreadyDecided(f"approval {approval.id} was decided by another request")
        return int(found)

    async def lock_run_of(
        self, approval_id: ApprovalId, *, session_id: SessionId, owner: UserId
    ) -> bool:
        """Lock the run of the approval, if the approval is the session's and the session is
        ``owner``'s (False otherwise), in one statement: the run first, then its approvals
        (``RunRepository.lock``). Read the approval after this: a cancel, an expiry or another
        decision may have committed while this waited for the lock."""
        run_of = (
            select(ApprovalRow.run_id)
            .join(SessionRow, SessionRow.id == ApprovalRow.session_id)
            .where(
                ApprovalRow.id == approval_id,
                ApprovalRow.session_id == session_id,
                SessionRow.owner_id == owner,
            )
            .scalar_subquery()
        )
        found = await self._db.scalar(
            select(RunRow.id).where(RunRow.id == run_of).with_for_update(key_share=True)
        )
        return found is not None

    async def for_run(
        self, run_id: RunId, *, asked: list[RunEvent] | None = None
    ) -> list[Approval]:
        """Every approval of the run, in the order the run asked for them.

        That order is the run's event log's (each approval has its ``approval.required``
        event), not the ids': ids carry the clock of the process that made them, and two
        processes' clocks may disagree. It matters when a call is asked for again after a
        crash: the later question is the one whose answer counts. ``asked``: the run's
        ``approval.required`` events, when the caller has read them already.
        """
        rows = list(
            await self._db.scalars(
                select(ApprovalRow)
                .where(ApprovalRow.run_id == run_id)
                # As stored now: a decision in this transaction updated the Core table.
                .execution_options(populate_existing=True)
            )
        )
        if asked is None:
            found = await self._db.execute(
                select(EventRow.seq, EventRow.data).where(
                    EventRow.run_id == run_id, EventRow.type == EventType.APPROVAL_REQUIRED.value
                )
            )
            seq_of = {str(data.get("approval_id")): seq for seq, data in found}
        else:
            seq_of = {str(event.data.get("approval_id")): event.seq for event in asked}
        rows.sort(key=lambda row: (seq_of.get(str(row.id), 0), row.id))
        return [_approval(row) for row in rows]

    async def count_pending(self, run_id: RunId) -> int:
        """How many of the run's approvals still wait."""
        count = await self._db.scalar(
            select(func.count())
            .select_from(ApprovalRow)
            .where(ApprovalRow.run_id == run_id, ApprovalRow.status == ApprovalStatus.PENDING.value)
        )
        return int(count or 0)

    async def pending_of_run(self, run_id: RunId) -> Approval | None:
        """The run's oldest pending approval, if any."""
        row = await self._db.scalar(
            select(ApprovalRow)
            .where(ApprovalRow.run_id == run_id, ApprovalRow.status == ApprovalStatus.PENDING.value)
            .order_by(ApprovalRow.id)
            .limit(1)
        )
        return None if row is None else _approval(row)

    async def expire(self, approval_id: ApprovalId, *, reason: str, at: datetime) -> bool:
        """Mark one pending approval expired; False if it was decided meanwhile."""
        result = await self._db.execute(
            update(ApprovalRow)
            .where(
                ApprovalRow.id == approval_id, ApprovalRow.status == ApprovalStatus.PENDING.value
            )
            .values(status=ApprovalStatus.EXPIRED.value, reason=reason, decided_at=at)
        )
        return _rowcount(result) == 1

    async def expire_pending_of_run(self, run_id: RunId, *, reason: str, at: datetime) -> int:
        """Mark every pending approval of the run expired (the run ended without them)."""
        result = await self._db.execute(
            update(ApprovalRow)
            .where(ApprovalRow.run_id == run_id, ApprovalRow.status == ApprovalStatus.PENDING.value)
            .values(status=ApprovalStatus.EXPIRED.value, reason=reason, decided_at=at)
        )
        return _rowcount(result)

    async def expired(self, *, now: datetime, limit: int) -> list[Approval]:
        """Pending approvals whose time ran out."""
        rows = await self._db.scalars(
            select(ApprovalRow)
            .where(
                ApprovalRow.status == ApprovalStatus.PENDING.value, ApprovalRow.expires_at <= now
            )
            .order_by(ApprovalRow.expires_at)
            .limit(limit)
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
    return [tool.to_json() for tool in tools]


def _user(row: UserRow) -> User:
    return User(
        id=UserId(row.id),
        email=row.email,
        created_at=row.created_at,
        email_verified=row.email_verified,
    )


def _access_token(row: AccessTokenRow) -> AccessToken:
    return AccessToken(
        id=AccessTokenId(row.id),
        user_id=UserId(row.user_id),
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )


def _api_key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        id=ApiKeyId(row.id),
        user_id=UserId(row.user_id),
        name=row.name,
        prefix=row.prefix,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
    )


def _row_of(mapped: type[Base], values: tuple[Any, ...]) -> SimpleNamespace:
    """A row read by a script, with the attributes of the ORM class whose columns it has."""
    names = [column.name for column in mapped.__table__.columns]
    return SimpleNamespace(**dict(zip(names, values, strict=True)))


def _agent(row: AgentRow) -> Agent:
    return Agent(
        id=AgentId(row.id),
        owner_id=None if row.owner_id is None else UserId(row.owner_id),
        name=row.name,
        model=row.model,
        instructions=row.instructions,
        tools=tuple(ToolSetting.from_json(item) for item in row.tools),
        is_default=row.is_default,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _session(row: SessionRow, *, active_run_id: uuid.UUID | None = None) -> Session:
    return Session(
        id=SessionId(row.id),
        owner_id=UserId(row.owner_id),
        agent_id=AgentId(row.agent_id),
        title=row.title,
        status=SessionStatus(row.status),
        created_at=row.created_at,
        updated_at=row.updated_at,
        active_run_id=None if active_run_id is None else RunId(active_run_id),
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


_ACTIVE = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.AWAITING_APPROVAL)
_ACTIVE_RUN_ID = (
    select(RunRow.id)
    .where(RunRow.session_id == SessionRow.id, RunRow.status.in_([s.value for s in _ACTIVE]))
    .limit(1)
    .correlate(SessionRow)
    .scalar_subquery()
    .label("active_run_id")
)
"""A session's active run (at most one: a unique index says so), read with the session."""


def _history_position(session_id: SessionId) -> tuple[Any, Any]:
    """Subqueries: the session's number of model messages, and the run that stored the last."""
    length = (
        select(func.coalesce(func.max(ModelMessageRow.seq), 0))
        .where(ModelMessageRow.session_id == session_id)
        .scalar_subquery()
    )
    tail = (
        select(ModelMessageRow.run_id)
        .where(ModelMessageRow.session_id == session_id)
        .order_by(ModelMessageRow.seq.desc())
        .limit(1)
        .scalar_subquery()
    )
    return length, tail


def _model_message_rows(
    session_id: SessionId, run_id: RunId, messages: list[Any], *, after: int, at: datetime
) -> list[dict[str, Any]]:
    return [
        {
            "session_id": session_id,
            "seq": after + index + 1,
            "run_id": run_id,
            "data": storable(message),
            "created_at": at,
        }
        for index, message in enumerate(messages)
    ]


def _batch_message_rows(batch: RunBatch, *, at: datetime) -> list[dict[str, Any]]:
    return _model_message_rows(
        batch.session_id, batch.run_id, batch.messages, after=batch.messages_after, at=at
    )


def _lease_lost(batch: RunBatch) -> LeaseLost:
    return LeaseLost(f"run {batch.run_id} is no longer held by {batch.lease.owner}")


def _numbered(
    run_id: RunId,
    events: list[tuple[EventType, JSONObject]],
    last_seq: int,
    attempt: int,
    at: datetime,
) -> list[RunEvent]:
    """The events as stored, ending at the run's new ``last_seq``, in its ``attempt``."""
    first = last_seq - len(events) + 1
    return [
        RunEvent(
            run_id=run_id, seq=first + index, attempt=attempt, type=kind, data=data, created_at=at
        )
        for index, (kind, data) in enumerate(events)
    ]


def _with_message_seq(event: RunEvent, seq: int) -> RunEvent:
    """A ``message.completed`` event with its message's ``seq`` (others as they are)."""
    if event.type is not EventType.MESSAGE_COMPLETED:
        return event
    return RunEvent(
        run_id=event.run_id,
        seq=event.seq,
        attempt=event.attempt,
        type=event.type,
        data={**event.data, "seq": seq},
        created_at=event.created_at,
    )


def _fenced(run_id: RunId, lease: Lease) -> list[Any]:
    return [
        _RUNS.c.id == run_id,
        _RUNS.c.owner == lease.owner,
        _RUNS.c.attempt == lease.attempt,
        _RUNS.c.status == RunStatus.RUNNING.value,
    ]


def _run(row: RunRow) -> Run:
    return Run(
        id=RunId(row.id),
        session_id=SessionId(row.session_id),
        status=RunStatus(row.status),
        attempt=row.attempt,
        error=row.error,
        created_at=row.created_at,
        finished_at=row.finished_at,
    )


def _event(row: EventRow) -> RunEvent:
    return RunEvent(
        run_id=RunId(row.run_id),
        seq=row.seq,
        attempt=row.attempt,
        type=EventType(row.type),
        data=dict(row.data),
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
        tool_call_id=row.tool_call_id,
        decided_arguments=None if row.decided_arguments is None else dict(row.decided_arguments),
        asked_because=row.asked_because,
    )


# --- identities (OAuth / OpenID Connect) ----------------------------------------------------


class IdentityRepository:
    """Provider identities (provider + subject) and the users they are linked to."""

    def __init__(self, db_session: AsyncSession) -> None:
        self._db = db_session

    async def find_user(self, *, provider: str, subject: str) -> tuple[Identity, User] | None:
        """The identity with this provider and subject, and its user; None if unknown."""
        row = (
            await self._db.execute(
                select(IdentityRow, UserRow)
                .join(UserRow, UserRow.id == IdentityRow.user_id)
                .where(IdentityRow.provider == provider, IdentityRow.subject == subject)
            )
        ).one_or_none()
        return None if row is None else (_identity(row[0]), _user(row[1]))

    async def add(self, identity: Identity) -> None:
        """Link an identity to its user; AlreadyExists if the provider + subject is linked."""
        self._db.add(
            IdentityRow(
                id=identity.id,
                user_id=identity.user_id,
                provider=identity.provider,
                subject=identity.subject,
                email=identity.email,
                created_at=identity.created_at,
            )
        )
        try:
            await self._db.flush()
        except IntegrityError:
            raise AlreadyExists("this provider account is already linked to a user") from None

    async def list_for_user(self, user_id: UserId) -> list[Identity]:
        """The user's identities, oldest first."""
        rows = await self._db.scalars(
            select(IdentityRow).where(IdentityRow.user_id == user_id).order_by(IdentityRow.id)
        )
        return [_identity(row) for row in rows]


def _identity(row: IdentityRow) -> Identity:
    return Identity(
        id=IdentityId(row.id),
        user_id=UserId(row.user_id),
        provider=row.provider,
        subject=row.subject,
        email=row.email,
        created_at=row.created_at,
    )
