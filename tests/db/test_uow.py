"""The unit of work: one transaction, explicit commit, rollback on any error (invariant 2)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import Connection, event

from countersign.config import Settings
from countersign.db.engine import create_engine, create_session_factory
from countersign.db.uow import UnitOfWorkFactory, unit_of_work_factory
from countersign.domain.errors import Conflict, NotFound
from countersign.domain.models import (
    AgentId,
    Session,
    SessionId,
    SessionStatus,
    SystemClock,
    User,
    UserId,
    new_id,
)
from countersign.services import ServiceDeps
from countersign.services.agents import ensure_default_agent
from tests.conftest import make_settings
from tests.support.databases import TestDatabase


@pytest.fixture
async def uow_factory(database: TestDatabase) -> AsyncIterator[UnitOfWorkFactory]:
    settings = make_settings(database.url)
    engine = create_engine(settings)
    try:
        yield unit_of_work_factory(create_session_factory(engine), is_sqlite=settings.is_sqlite)
    finally:
        await engine.dispose()


async def _user(uow_factory: UnitOfWorkFactory) -> User:
    now = SystemClock().now()
    user = User(id=UserId(new_id()), email=f"{uuid.uuid4().hex}@example.test", created_at=now)
    async with uow_factory() as uow:
        await uow.users.add(user, password_hash=None)
        await uow.commit()
    return user


def _session(owner: UserId, agent_id: AgentId) -> Session:
    now = SystemClock().now()
    return Session(
        id=SessionId(new_id()),
        owner_id=owner,
        agent_id=agent_id,
        title="t",
        status=SessionStatus.ACTIVE,
        created_at=now,
        updated_at=now,
    )


async def _default_agent(uow_factory: UnitOfWorkFactory, settings: Settings) -> AgentId:
    agent = await ensure_default_agent(
        ServiceDeps(uow_factory=uow_factory, clock=SystemClock(), settings=settings)
    )
    return agent.id


async def test_leaving_without_commit_rolls_back(
    uow_factory: UnitOfWorkFactory, database: TestDatabase
) -> None:
    """A unit of work left without commit() writes nothing."""
    user = await _user(uow_factory)
    agent_id = await _default_agent(uow_factory, make_settings(database.url))
    session = _session(user.id, agent_id)
    async with uow_factory() as uow:
        await uow.sessions.add(session)
    async with uow_factory(write=False) as uow:
        assert await uow.sessions.get_owned(session.id, owner=user.id) is None


async def test_error_midway_leaves_no_partial_rows(
    uow_factory: UnitOfWorkFactory, database: TestDatabase
) -> None:
    """A failure after a first write undoes that write and spares others' committed work."""
    user = await _user(uow_factory)
    agent_id = await _default_agent(uow_factory, make_settings(database.url))
    committed = _session(user.id, agent_id)
    async with uow_factory() as uow:
        await uow.sessions.add(committed)
        await uow.commit()

    first = _session(user.id, agent_id)
    broken = _session(user.id, AgentId(new_id()))  # no such agent: a foreign-key violation

    async def write_both() -> None:
        async with uow_factory() as uow:
            await uow.sessions.add(first)
            await uow.sessions.add(broken)
            await uow.commit()

    with pytest.raises(Conflict):
        await write_both()

    async with uow_factory(write=False) as uow:
        assert await uow.sessions.get_owned(first.id, owner=user.id) is None
        assert await uow.sessions.get_owned(broken.id, owner=user.id) is None
        assert await uow.sessions.get_owned(committed.id, owner=user.id) == committed


async def test_write_that_matches_no_row_raises_not_found(
    uow_factory: UnitOfWorkFactory, database: TestDatabase
) -> None:
    """Updating or deleting a row that is not there is NotFound, never a silent no-op."""
    user = await _user(uow_factory)
    agent_id = await _default_agent(uow_factory, make_settings(database.url))
    ghost = _session(user.id, agent_id)
    with pytest.raises(NotFound):
        async with uow_factory() as uow:
            await uow.sessions.update(ghost)
    with pytest.raises(NotFound):
        async with uow_factory() as uow:
            await uow.sessions.delete_owned(ghost.id, owner=user.id)


@pytest.mark.backends("sqlite")
async def test_failed_sqlite_commit_is_rolled_back(backend: str, database: TestDatabase) -> None:
    """A COMMIT that SQLite refuses is rolled back, and the next unit of work works."""
    settings = make_settings(database.url)
    engine = create_engine(settings)

    # Defer foreign-key checks to COMMIT (a real SQLite feature), so the commit itself fails
    # and SQLite leaves the transaction open: only an explicit rollback recovers the connection.
    @event.listens_for(engine.sync_engine, "begin")
    def _defer(connection: Connection) -> None:
        connection.exec_driver_sql("PRAGMA defer_foreign_keys=ON")

    try:
        uow_factory = unit_of_work_factory(create_session_factory(engine), is_sqlite=True)
        user = await _user(uow_factory)
        agent_id = await _default_agent(uow_factory, settings)
        broken = _session(user.id, AgentId(new_id()))
        async with uow_factory() as uow:
            await uow.sessions.add(broken)  # accepted for now: the check waits for COMMIT
            with pytest.raises(Conflict):
                await uow.commit()

        good = _session(user.id, agent_id)
        async with uow_factory() as uow:
            await uow.sessions.add(good)
            await uow.commit()
        async with uow_factory(write=False) as uow:
            assert await uow.sessions.get_owned(good.id, owner=user.id) == good
            assert await uow.sessions.get_owned(broken.id, owner=user.id) is None
    finally:
        await engine.dispose()
