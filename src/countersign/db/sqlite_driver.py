"""aiosqlite with one hand-off to its thread per statement.

aiosqlite runs each sqlite3 call in its connection's own thread; SQLAlchemy's adapter asks it
for a cursor, executes, fetches and closes the cursor: four hand-offs for one statement, each
a queue put, a thread wake-up and an event-loop wake-up (measured: 54 hand-offs for one
turn, two in three of them for cursors). Here a cursor is only a holder: ``execute`` makes a
sqlite3 cursor, runs the statement, fetches its rows and closes it in one hand-off, and the
rest answers from what that brought back. The sqlite3 connection, its thread and its errors
are aiosqlite's own; SQLAlchemy's adapter is unchanged around it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import aiosqlite

T = TypeVar("T")
_Outcome = tuple[Any, list[Any], int, int | None]
"""A statement's description, rows, rowcount and lastrowid."""


def _run(
    connection: sqlite3.Connection, sql: str, parameters: Any, *, many: bool = False
) -> _Outcome:
    """One statement, start to end, in the connection's thread."""
    cursor = connection.cursor()
    try:
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
        return await self._call(partial(_run, self._connection._conn, sql, parameters))

    async def executemany(self, sql: str, parameters: Sequence[Any]) -> Cursor:
        return await self._call(partial(_run, self._connection._conn, sql, parameters, many=True))

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

    def cursor(self) -> Cursor:  # type: ignore[override]
        return Cursor(self)

    async def run(self, function: Callable[[], T]) -> T:
        """``function()`` in the connection's thread: one hand-off."""
        result: T = await self._execute(function)  # type: ignore[no-untyped-call]
        return result

    async def commit(self) -> None:
        # sqlite3 does nothing outside a transaction: nor does this, without a hand-off.
        if self._connection is not None and self._connection.in_transaction:
            await super().commit()

    async def rollback(self) -> None:
        # The pool rolls back every connection it gets back, even one that began nothing.
        if self._connection is not None and self._connection.in_transaction:
            await super().rollback()


def connect(database: str, **kwargs: Any) -> Connection:
    """Open (once awaited) a connection to ``database``; ``kwargs`` go to ``sqlite3.connect``."""
    connection = Connection(partial(sqlite3.connect, database, **kwargs), iter_chunk_size=64)
    connection._thread.daemon = True  # as SQLAlchemy sets it: exit never waits
    return connection
