"""Conversation sessions: create, list, read, edit and delete; their messages and approvals.

Every read and write is scoped to the acting user: another user's session is NotFound, exactly
like a missing one.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import uuid
from datetime import datetime
from typing import TypeVar

from countersign.db.uow import UnitOfWork
from countersign.domain.errors import Conflict, InvalidInput, NotFound
from countersign.domain.models import (
    AgentId,
    Approval,
    JSONObject,
    Message,
    Page,
    Session,
    SessionId,
    SessionStatus,
    UserId,
    clean_title,
    decode_cursor,
)
from countersign.services import ServiceDeps, page_of, uuid_cursor
from countersign.services.feed import deleted_session_note
from countersign.services.idempotency import (
    IdempotentRequest,
    remember_response,
    stored_response,
    winner_response,
)

T = TypeVar("T")

DEFAULT_TITLE = "New session"
SESSION_NOT_FOUND = "session not found"

logger = logging.getLogger(__name__)


async def create_session(
    deps: ServiceDeps,
    *,
    actor: UserId,
    agent_id: AgentId | None,
    title: str | None,
    idempotency: IdempotentRequest | None = None,
) -> Session:
    """Create a session for ``actor`` with the given (or default) agent."""
    title = DEFAULT_TITLE if title is None else clean_title(title)
    try:
        return await _create_session(
            deps, actor=actor, agent_id=agent_id, title=title, idempotency=idempotency
        )
    except Conflict:
        # A concurrent request with the same key may have won the race: answer with its result.
        response = await winner_response(deps, user_id=actor, request=idempotency)
        if response is None:
            raise
        return session_from_json(response)


async def _create_session(
    deps: ServiceDeps,
    *,
    actor: UserId,
    agent_id: AgentId | None,
    title: str,
    idempotency: IdempotentRequest | None,
) -> Session:
    async with deps.uow_factory() as uow:
        if idempotency is not None:
            response = await stored_response(uow, user_id=actor, request=idempotency)
            if response is not None:
                return session_from_json(response)
        agent = (
            await uow.agents.get_default()
            if agent_id is None
            else await uow.agents.get_usable(agent_id, by=actor)
        )
        if agent is None:
            raise NotFound("agent not found")
        now = deps.clock.now()
        session = Session(
            id=SessionId(deps.new_id()),
            owner_id=actor,
            agent_id=agent.id,
            title=title,
            status=SessionStatus.ACTIVE,
            created_at=now,
            updated_at=now,
        )
        await uow.sessions.add(session)
        if idempotency is not None:
            await remember_response(
                uow, deps, user_id=actor, request=idempotency, response=session_to_json(session)
            )
        await uow.commit()
    deps.broker.data_changed()
    return session


async def list_sessions(
    deps: ServiceDeps,
    *,
    actor: UserId,
    cursor: str | None,
    limit: int,
    title_contains: str | None = None,
) -> Page[Session]:
    """The actor's sessions, newest first, one page at a time; with ``title_contains``, only
    those whose title contains it (any case)."""
    before = uuid_cursor(cursor)
    async with deps.uow_factory(write=False) as uow:
        sessions = await uow.sessions.list_owned(
            owner=actor, before=before, limit=limit + 1, title_contains=title_contains
        )
    return page_of(sessions, limit, lambda session: str(session.id))


async def get_session(deps: ServiceDeps, *, actor: UserId, session_id: SessionId) -> Session:
    """One of the actor's sessions; NotFound if missing or someone else's."""
    async with deps.uow_factory(write=False) as uow:
        return await _owned(uow, session_id, actor)


async def update_session(
    deps: ServiceDeps,
    *,
    actor: UserId,
    session_id: SessionId,
    title: str | None,
    status: SessionStatus | None,
) -> Session:
    """Rename and/or archive a session."""
    async with deps.uow_factory() as uow:
        session = await _owned(uow, session_id, actor)
        edited = session.edited(title=title, status=status, at=deps.clock.now())
        await uow.sessions.update(edited)
        await uow.commit()
    deps.broker.data_changed()
    return edited


async def delete_session(deps: ServiceDeps, *, actor: UserId, session_id: SessionId) -> None:
    """Delete a session with its messages, runs, events and approvals."""
    async with deps.uow_factory() as uow:
        await uow.sessions.delete_owned(session_id, owner=actor)
        await uow.commit()
    deps.broker.data_changed(deleted_session_note(actor, session_id))
    await delete_workspace(deps, session_id)


async def delete_workspace(deps: ServiceDeps, session_id: SessionId) -> None:
    """Remove a deleted session's workspace folder (what its tools wrote), if it has one."""
    folder = deps.settings.workspace_root / str(session_id)
    try:
        await asyncio.to_thread(shutil.rmtree, folder)
    except FileNotFoundError:
        pass
    except OSError as exc:
        # The session is gone already; a folder that cannot go is the operator's to clear.
        logger.warning(
            "the workspace of deleted session %s could not be removed: %s",
            session_id,
            exc.strerror or type(exc).__name__,
        )


async def list_messages(
    deps: ServiceDeps,
    *,
    actor: UserId,
    session_id: SessionId,
    cursor: str | None,
    limit: int,
    newest_first: bool = False,
) -> Page[Message]:
    """A session's messages, oldest first (``newest_first``: from the newest back; the cursor
    then names the message the next page goes on below)."""
    seq = _seq_cursor(cursor)
    async with deps.uow_factory(write=False) as uow:
        await _owned(uow, session_id, actor)
        if newest_first:
            messages = await uow.messages.list_newest(
                session_id, before_seq=seq if cursor is not None else None, limit=limit + 1
            )
        else:
            messages = await uow.messages.list(session_id, after_seq=seq, limit=limit + 1)
    return page_of(messages, limit, lambda message: str(message.seq))


async def list_pending_approvals(
    deps: ServiceDeps, *, actor: UserId, session_id: SessionId, cursor: str | None, limit: int
) -> Page[Approval]:
    """The session's tool calls that wait for a decision, oldest first (maybe none)."""
    after = uuid_cursor(cursor)
    async with deps.uow_factory(write=False) as uow:
        await _owned(uow, session_id, actor)
        approvals = await uow.approvals.list_pending(
            session_id, now=deps.clock.now(), after=after, limit=limit + 1
        )
    return page_of(approvals, limit, lambda approval: str(approval.id))


def session_to_json(session: Session) -> JSONObject:
    """A session as JSON values (for stored idempotent responses)."""
    return {
        "id": str(session.id),
        "owner_id": str(session.owner_id),
        "agent_id": str(session.agent_id),
        "title": session.title,
        "status": session.status.value,
        "created_at": session.created_at.isoformat(),
        "updated_at": session.updated_at.isoformat(),
    }


def session_from_json(data: JSONObject) -> Session:
    """The session stored by ``session_to_json``."""
    return Session(
        id=SessionId(uuid.UUID(data["id"])),
        owner_id=UserId(uuid.UUID(data["owner_id"])),
        agent_id=AgentId(uuid.UUID(data["agent_id"])),
        title=data["title"],
        status=SessionStatus(data["status"]),
        created_at=datetime.fromisoformat(data["created_at"]),
        updated_at=datetime.fromisoformat(data["updated_at"]),
    )


async def _owned(uow: UnitOfWork, session_id: SessionId, actor: UserId) -> Session:
    session = await uow.sessions.get_owned(session_id, owner=actor)
    if session is None:
        raise NotFound(SESSION_NOT_FOUND)
    return session


SEQ_MAX = 2**31 - 1
"""The largest ``seq`` a message can have (the column is a 32-bit integer)."""


def _seq_cursor(cursor: str | None) -> int:
    if cursor is None:
        return 0
    position = decode_cursor(cursor)
    # isdigit() alone admits "²" and other non-ASCII digits; the database takes 32 bits.
    if not (position.isascii() and position.isdigit()) or int(position) > SEQ_MAX:
        raise InvalidInput("cursor is not valid; use next_cursor from a previous page")
    return int(position)
