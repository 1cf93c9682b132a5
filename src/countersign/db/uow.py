"""UnitOfWork: one ``db_session``, one transaction, and the repositories that share it.

``async with uow_factory() as uow: ...; await uow.commit()`` — leaving the block without a
commit rolls back, and the session is closed either way, so no ORM row outlives the block.
Driver errors that escape the block are translated into domain errors here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Self

from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from countersign.db.engine import IMMEDIATE, NO_TRANSACTION
from countersign.db.errors import translate_error
from countersign.db.repositories import (
    AccessTokenRepository,
    AgentRepository,
    ApiKeyRepository,
    ApprovalRepository,
    IdempotencyRepository,
    IdentityRepository,
    MessageRepository,
    ModelMessageRepository,
    RunRepository,
    SessionRepository,
    UserRepository,
)
from countersign.domain.errors import Unavailable

logger = logging.getLogger(__name__)

UnitOfWorkFactory = Callable[..., "UnitOfWork"]


class UnitOfWork:
    """One transaction and its repositories. Commit explicitly; anything else rolls back."""

    users: UserRepository
    api_keys: ApiKeyRepository
    identities: IdentityRepository
    access_tokens: AccessTokenRepository
    agents: AgentRepository
    sessions: SessionRepository
    messages: MessageRepository
    runs: RunRepository
    history: ModelMessageRepository
    approvals: ApprovalRepository
    idempotency: IdempotencyRepository

    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        *,
        is_sqlite: bool,
        write: bool,
        transaction: bool = True,
        one_statement: bool = False,
        writer_lock: WriterLock | None = None,
    ) -> None:
        self._session_factory = session_factory
        self._is_sqlite = is_sqlite
        self._write = write
        # One statement is a transaction by itself on PostgreSQL (autocommit: no BEGIN and
        # no COMMIT, two round trips fewer); on SQLite one script (db/sqlite_script.py) is,
        # its BEGIN IMMEDIATE and COMMIT sent with it. This process's SQLite writers still
        # queue for the writer lock first.
        self._transaction = (transaction or write) and not one_statement
        self._writer_lock = writer_lock if is_sqlite and write else None
        self._db_session: AsyncSession | None = None

    async def __aenter__(self) -> Self:
        if self._writer_lock is not None:
            await self._writer_lock.acquire()
        try:
            return await self._begin()
        except BaseException:
            if self._writer_lock is not None:
                self._writer_lock.release()
            raise

    async def _begin(self) -> Self:
        db_session = self._session_factory()
        self._db_session = db_session
        try:
            # Begin now, so that a SQLite writer takes its lock up front (BEGIN IMMEDIATE,
            # sent with the first statement: db/sqlite_driver.py) and waits for it under
            # busy_timeout instead of failing halfway through.
            options: dict[str, object] = {IMMEDIATE: self._is_sqlite and self._write}
            if not self._transaction:
                # A read of one statement needs no transaction: no BEGIN and no ROLLBACK,
                # two round trips fewer.
                if self._is_sqlite:
                    options[NO_TRANSACTION] = True
                else:
                    options["isolation_level"] = "AUTOCOMMIT"
            await db_session.connection(execution_options=options)
        except BaseException as exc:
            await db_session.close()
            self._db_session = None
            if isinstance(exc, SQLAlchemyError | OSError):
                raise translate_error(exc) from exc
            raise
        self.users = UserRepository(db_session)
        self.api_keys = ApiKeyRepository(db_session)
        self.identities = IdentityRepository(db_session)
        self.access_tokens = AccessTokenRepository(db_session)
        self.agents = AgentRepository(db_session)
        self.sessions = SessionRepository(db_session)
        self.messages = MessageRepository(db_session)
        self.runs = RunRepository(db_session)
        self.history = ModelMessageRepository(db_session)
        self.approvals = ApprovalRepository(db_session)
        self.idempotency = IdempotencyRepository(db_session)
        return self

    async def commit(self) -> None:
        """Commit the transaction; on failure roll back explicitly and raise a domain error."""
        db_session = self._require_session()
        try:
            await db_session.commit()
        except (DBAPIError, PoolTimeoutError, OSError) as exc:
            await db_session.rollback()
            raise translate_error(exc) from exc

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        db_session = self._require_session()
        self._db_session = None
        if isinstance(exc, asyncio.CancelledError):
            # Cancelled (a shutdown, a lost lease, a client gone), maybe in mid-statement, and
            # maybe cancelled again while cleaning up (a cancel scope cancels every await):
            # the cleanup runs to its end in a task of its own, whatever befalls this one.
            cleanup = asyncio.ensure_future(self._clean_up(db_session))
            cleanup.add_done_callback(_retrieve)
            # Its errors are the cleanup task's to report: the cancel goes on as it is.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(cleanup)
            return
        rollback_error = await self._clean_up(db_session)
        if isinstance(exc, SQLAlchemyError | OSError):
            translated = translate_error(exc)
            if translated is not exc:
                raise translated from exc
            # An error nobody expected: it goes on as it is (the caller logs it).
        if exc is None and rollback_error is not None:
            raise translate_error(rollback_error) from rollback_error

    async def _clean_up(self, db_session: AsyncSession) -> SQLAlchemyError | OSError | None:
        """Roll back (a no-op after commit; otherwise it undoes everything this unit of work
        wrote), close, let the writer lock go; the rollback's error, if it failed."""
        rollback_error: SQLAlchemyError | OSError | None = None
        try:
            await db_session.rollback()
        except (SQLAlchemyError, OSError) as error:
            rollback_error = error  # e.g. the connection died; the pool discards it
        finally:
            await db_session.close()
            if self._writer_lock is not None:
                self._writer_lock.release()
        return rollback_error

    def _require_session(self) -> AsyncSession:
        if self._db_session is None:
            raise RuntimeError("the unit of work is not open")
        return self._db_session


class WriterLock:
    """SQLite's one writer, queued fairly inside the process.

    SQLite lets one transaction write at a time. Left to ``busy_timeout``, waiting writers
    poll with back-off and the unlucky ones time out under load ("database is locked");
    queued here first-come first-served, each waits only for the writers before it. The
    wait is still bounded: past ``wait_seconds`` the unit of work fails with Unavailable.
    """

    def __init__(self, *, wait_seconds: float) -> None:
        self._lock = asyncio.Lock()
        self._wait_seconds = wait_seconds

    async def acquire(self) -> None:
        """Wait for this process's turn to write."""
        try:
            async with asyncio.timeout(self._wait_seconds):
                await self._lock.acquire()
        except TimeoutError:
            raise Unavailable("the database is busy; try again") from None

    def release(self) -> None:
        """Let the next writer go."""
        self._lock.release()


def unit_of_work_factory(
    session_factory: async_sessionmaker[AsyncSession],
    *,
    is_sqlite: bool,
    writer_wait_seconds: float = 30.0,
) -> UnitOfWorkFactory:
    """A callable that opens a UnitOfWork; ``write=False`` for read-only work;
    ``one_statement=True`` for work of a single statement (on PostgreSQL it then runs in
    autocommit: the caller must send exactly one statement; on SQLite, one script)."""
    writer_lock = WriterLock(wait_seconds=writer_wait_seconds) if is_sqlite else None

    def open_unit_of_work(
        *, write: bool = True, transaction: bool = True, one_statement: bool = False
    ) -> UnitOfWork:
        return UnitOfWork(
            session_factory,
            is_sqlite=is_sqlite,
            write=write,
            transaction=transaction,
            one_statement=one_statement,
            writer_lock=writer_lock,
        )

    return open_unit_of_work


def _retrieve(cleanup: asyncio.Future[SQLAlchemyError | OSError | None]) -> None:
    """Take a cancelled unit of work's cleanup outcome (so that asyncio does not report it)."""
    if not cleanup.cancelled() and cleanup.exception() is not None:
        logger.info("a cancelled unit of work was closed with an error; its connection is gone")
