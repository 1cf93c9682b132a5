"""aiosqlite with one hand-off to its thread per statement.

aiosqlite runs each sqlite3 call in its connection's own thread; SQLAlchemy's adapter asks it
for a cursor, executes, fetches and closes the cursor: four hand-offs for one statement, each
a queue put, a thread wake-up and an event-loop wake-up (measured: 54 hand-offs for one
turn, two in three of them for cursors). Here a cursor is only a holder: ``execute`` makes a
sqlite3 cursor, runs the statement, fetches its rows and closes it in one hand-off, and the
rest answers from what that brought back. A transaction's ``BEGIN`` goes with its first
statement (the transaction, and a writer's lock, still start before that statement runs; a
transaction that runs nothing sends nothing). The sqlite3 connection, its thread and its
errors are aiosqlite's own; SQLAlchemy's adapter is unchanged around it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import aiosqlite

T = TypeVar("T")
_Outcome = tuple[Any, list[Any], int, int | None]
"""A statement's description, rows, rowcount and lastrowid."""


_BEGINS = frozenset({"BEGIN", "BEGIN DEFERRED", "BEGIN IMMEDIATE", "BEGIN EXCLUSIVE"})


def _run(
    connection: sqlite3.Connection,
    sql: str,
    parameters: Any,
    *,
    many: bool = False,
    begin: str | None = None,
) -> _Outcome:
    """One statement, start to end (after ``begin``, if a transaction starts with it), in the
    connection's thread."""
    cursor = connection.cursor()
    try:
        if begin is not None:
            cursor.execute(begin)
        if many:
            cursor.executemany(sql, parameters)
        elif parameters is None:
            cursor.execute(sql)
        else:
            cursor.execute(sql, parameters)
        description = cursor.description
        rows = cursor.fetchall() if description else []
        return description, rows, cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


Statement = tuple[str, Any, bool]
"""A statement of a script: its SQL, its parameters, and whether they are many rows."""


def _script(
    connection: sqlite3.Connection,
    statements: Sequence[Statement],
    *,
    begin: str | None,
    commit: bool,
) -> list[list[Any]]:
    """Statements one after the other (after ``begin``), and ``COMMIT`` if ``commit``, in the
    connection's thread: the rows each returned. On an error a transaction this began is
    rolled back before the error goes on."""
    cursor = connection.cursor()
    try:
        if begin is not None:
            cursor.execute(begin)
        try:
            rows: list[list[Any]] = []
            for sql, parameters, many in statements:
                if many:
                    cursor.executemany(sql, parameters)
                else:
                    cursor.execute(sql, parameters)
                rows.append(cursor.fetchall() if cursor.description else [])
            if commit:
                cursor.execute("COMMIT")
            return rows
        except BaseException:
            if commit and connection.in_transaction:
                connection.rollback()
            raise
    finally:
        cursor.close()


class Cursor:
    """The cursor interface SQLAlchemy's aiosqlite adapter uses, without a cursor of its own
    in the driver's thread between statements."""

    arraysize = 1

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        self._rows: list[Any] = []

    async def __aenter__(self) -> Cursor:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def _call(self, function: Callable[[], _Outcome]) -> Cursor:
        outcome = await self._connection.run(function)
        self.description, self._rows, self.rowcount, self.lastrowid = outcome
        return self

    async def execute(self, sql: str, parameters: Any = None) -> Cursor:
        connection = self._connection
        if not parameters and sql.strip().upper() in _BEGINS:
            connection.begin_later(sql)
            self.description, self._rows, self.rowcount, self.lastrowid = None, [], -1, None
            return self
        begin = connection.take_begin()
        return await self._call(partial(_run, connection._conn, sql, parameters, begin=begin))

    async def executemany(self, sql: str, parameters: Sequence[Any]) -> Cursor:
        connection = self._connection
        begin = connection.take_begin()
        return await self._call(
            partial(_run, connection._conn, sql, parameters, many=True, begin=begin)
        )

    async def fetchall(self) -> list[Any]:
        rows, self._rows = self._rows, []
        return rows

    async def fetchone(self) -> Any:
        return self._rows.pop(0) if self._rows else None

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        count = self.arraysize if size is None else size
        rows, self._rows = self._rows[:count], self._rows[count:]
        return rows

    async def close(self) -> None:
        self._rows = []


class Connection(aiosqlite.Connection):
    """An aiosqlite connection whose cursors cost no hand-off of their own."""

    _begin: str | None = None
    """A ``BEGIN`` not sent yet: it goes with the next statement."""
    _in_flight = 0
    """Hand-offs sent and not answered yet."""

    def cursor(self) -> Cursor:  # type: ignore[override]
        return Cursor(self)

    def begin_later(self, begin: str) -> None:
        """Start a transaction with the next statement (refused, as sqlite3 refuses it,
        inside a transaction: one shared by two users would otherwise mix their work)."""
        if self._begin is not None or self._in_flight or self.in_transaction:
            raise sqlite3.OperationalError("cannot start a transaction within a transaction")
        self._begin = begin

    def take_begin(self) -> str | None:
        """The ``BEGIN`` the next statement must send first, if any."""
        begin, self._begin = self._begin, None
        return begin

    async def run(self, function: Callable[[], T]) -> T:
        """``function()`` in the connection's thread: one hand-off.

        Once queued it runs, even if the caller is cancelled meanwhile: it stays in flight
        until the thread has run it, so that a commit or rollback asked for in between is
        not skipped as "nothing to do" but queued behind it (a cancelled statement may be
        the one that opens the transaction)."""
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        answer: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._in_flight += 1
        answer.add_done_callback(self._answered)
        self._tx.put_nowait((answer, function))
        return await asyncio.shield(answer)

    def _answered(self, answer: asyncio.Future[Any]) -> None:
        self._in_flight -= 1
        if not answer.cancelled():
            answer.exception()  # retrieved here too: its caller may be gone

    async def run_script(
        self, statements: Sequence[Statement], *, own_transaction: bool
    ) -> list[list[Any]]:
        """Several statements in one hand-off: the rows each returned.

        ``own_transaction``: they are a transaction by themselves (``BEGIN IMMEDIATE`` before
        them, ``COMMIT`` after, a rollback on an error); otherwise they belong to the
        transaction under way (its ``BEGIN``, if not sent yet, goes first).
        """
        if own_transaction:
            if self._begin is not None or self._in_flight or self.in_transaction:
                raise sqlite3.OperationalError("cannot start a transaction within a transaction")
            begin: str | None = "BEGIN IMMEDIATE"
        else:
            begin = self.take_begin()
        return await self.run(
            partial(_script, self._conn, statements, begin=begin, commit=own_transaction)
        )

    def _idle(self) -> bool:
        """Nothing to commit or roll back: no transaction, and no statement under way that
        may be opening one (the state is then read in this thread without a race)."""
        return not self._in_flight and (self._connection is None or not self.in_transaction)

    async def commit(self) -> None:
        # sqlite3 does nothing outside a transaction: nor does this, without a hand-off.
        self._begin = None
        if not self._idle():
            await super().commit()

    async def rollback(self) -> None:
        # The pool rolls back every connection it gets back, even one that began nothing.
        self._begin = None
        if not self._idle():
            await super().rollback()

    async def close(self) -> None:
        self._begin = None
        await super().close()


def connect(database: str, **kwargs: Any) -> Connection:
    """Open (once awaited) a connection to ``database``; ``kwargs`` go to ``sqlite3.connect``."""
    connection = Connection(partial(sqlite3.connect, database, **kwargs), iter_chunk_size=64)
    connection._thread.daemon = True  # as SQLAlchemy sets it: exit never waits
    return connection
