"""The engine and session factory, built from Settings.

SQLite: every connection gets ``foreign_keys=ON``, WAL and a ``busy_timeout``; the driver's
own transaction handling is switched off so that a writing unit of work can start with
``BEGIN IMMEDIATE`` (a deferred transaction that reads and then writes can fail with
"database is locked" at once, without waiting). PostgreSQL: a sized pool with a statement
timeout, and no pre-ping (a dead connection is found when it is used). Neither engine puts
statement parameters into error texts.
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, ExceptionContext, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool

from countersign.config import Settings
from countersign.db import sqlite_driver
from countersign.db.errors import sqlite_code_of

IMMEDIATE = "countersign_immediate"
"""Execution option: start this connection's transaction with BEGIN IMMEDIATE (SQLite)."""
NO_TRANSACTION = "countersign_no_transaction"
"""Execution option: emit no BEGIN (SQLite): each statement is its own transaction."""


def create_engine(settings: Settings, *, pool_size: int | None = None) -> AsyncEngine:
    """An AsyncEngine for the configured database."""
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url, settings)
    return _postgres_engine(url, settings, pool_size=pool_size)


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """The factory units of work draw their ``db_session`` from."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


def safe_url(settings_or_url: Settings | str) -> str:
    """The database URL with its password hidden, for messages and logs."""
    raw = settings_or_url if isinstance(settings_or_url, str) else settings_or_url.database_url
    return make_url(raw).render_as_string(hide_password=True)


def parsed_url(settings: Settings) -> URL:
    """The configured database URL, parsed."""
    return make_url(settings.database_url)


STALE_SQLITE_CODES = ("SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN")
"""SQLite errors after which a connection is not used again (it may have opened read-only)."""


def _sqlite_engine(url: URL, settings: Settings) -> AsyncEngine:
    # The file and options SQLAlchemy would open, opened with one thread hand-off per
    # statement (``sqlite_driver``) instead of aiosqlite's four.
    args, options = url.get_dialect()().create_connect_args(url)
    options["timeout"] = settings.sqlite_busy_timeout_ms / 1000
    engine = create_async_engine(
        url,
        async_creator=lambda: sqlite_driver.connect(*args, **options),
        pool_pre_ping=False,
        # An error's text (logged, and shown by nothing) never carries the values of a
        # statement: hashes, emails, message content.
        hide_parameters=True,
    )
    busy_timeout = settings.sqlite_busy_timeout_ms

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Take transaction control away from the driver: SQLAlchemy's "begin" event below
        # emits BEGIN itself, so that writers can ask for BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout)}")
            # A read-only file cannot switch journal mode; `db check` reports it.
            with contextlib.suppress(sqlite3.OperationalError):
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "handle_error")
    def _on_error(context: ExceptionContext) -> None:
        # A connection opened while the file could not be written (read-only, a disk error)
        # stays read-only for good: treated as lost, the pool opens new ones, so the server
        # writes again as soon as the file can be written, without a restart.
        error = context.sqlalchemy_exception
        if isinstance(error, DBAPIError) and (sqlite_code_of(error) or "").startswith(
            STALE_SQLITE_CODES
        ):
            context.is_disconnect = True

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        options = connection.get_execution_options()
        if options.get(NO_TRANSACTION, False):
            return  # the driver is in autocommit mode: each statement stands alone
        connection.exec_driver_sql("BEGIN IMMEDIATE" if options.get(IMMEDIATE, False) else "BEGIN")

    return engine


def _postgres_engine(url: URL, settings: Settings, *, pool_size: int | None) -> AsyncEngine:
    server_settings = {"application_name": "countersign"}
    if settings.db_statement_timeout_ms:
        server_settings["statement_timeout"] = str(settings.db_statement_timeout_ms)
    return create_async_engine(
        url,
        pool_size=pool_size or settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout,
        # No liveness round trip per checkout: a connection found dead when used raises a
        # "connection lost" error, which invalidates the whole pool (so the others are not
        # tried one by one) and is Unavailable: the request answers 503, the executor retries.
        pool_pre_ping=False,
        pool_recycle=1800,
        hide_parameters=True,
        connect_args={
            "server_settings": server_settings,
            "timeout": settings.db_connect_timeout,
        },
    )


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """How the connection pool is used right now."""

    size: int
    checked_out: int
    overflow: int
    checked_in: int


def pool_status(engine: AsyncEngine) -> PoolStatus:
    """The pool's size, connections in use, overflow and idle connections."""
    pool = engine.pool
    if isinstance(pool, QueuePool):
        return PoolStatus(
            size=pool.size(),
            checked_out=pool.checkedout(),
            overflow=max(pool.overflow(), 0),
            checked_in=pool.checkedin(),
        )
    return PoolStatus(size=0, checked_out=0, overflow=0, checked_in=0)
