"""A unit of work's statements on SQLite in one hand-off to the driver's thread.

PostgreSQL writes each of a turn's hot units of work (its start, an event batch, its end) as
one statement with data-modifying CTEs. SQLite has none: there a unit of work is ``BEGIN
IMMEDIATE``, several statements and ``COMMIT``, and through SQLAlchemy each is a hand-off to
aiosqlite's thread (a queue put, a thread wake-up, an event-loop wake-up) and a pass through
SQLAlchemy's execution (cache look-up, parameters, result). A *script* sends them all at
once instead: Core statements, compiled by SQLAlchemy once per process with their
parameters' and columns' type processors, run one after the other in the driver's thread.

In a unit of work opened with ``one_statement=True`` the script is the whole transaction
(``BEGIN IMMEDIATE`` ... ``COMMIT`` in that one hand-off); in any other it runs inside the
unit of work's transaction. Errors come back as SQLAlchemy's, as they would from
``execute``, so the unit of work translates them as usual.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import ClauseElement

from countersign.db.engine import NO_TRANSACTION, STALE_SQLITE_CODES
from countersign.db.sqlite_driver import Connection, Statement

_Processor = Callable[[Any], Any] | None
_REQUIRED = object()
"""A parameter with neither a value given nor a default."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """A statement compiled for SQLite: its SQL, its parameters in order (with each one's
    type processing and value if none is given) and its columns' type processing."""

    statement: ClauseElement
    sql: str
    binds: tuple[tuple[str, _Processor, Any], ...]
    columns: tuple[_Processor, ...]

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """The positional parameters for ``values`` (by bind name), processed by their types
        as SQLAlchemy processes them (``None`` included); a parameter without a value of its
        own or a default is refused, as SQLAlchemy refuses it."""
        out = []
        for name, process, default in self.binds:
            value = values.get(name, default)
            if value is _REQUIRED:
                raise ArgumentError(f"a value is required for the parameter {name!r}")
            out.append(value if process is None else process(value))
        return tuple(out)

    def rows(self, raw: Iterable[Any]) -> list[tuple[Any, ...]]:
        """Rows as they came from sqlite3, with each column's type processing applied."""
        columns = self.columns
        return [
            tuple(
                value if process is None or value is None else process(value)
                for process, value in zip(columns, row, strict=True)
            )
            for row in raw
        ]


_prepared: dict[int, Prepared] = {}


def prepare(statement: Any, dialect: Dialect) -> Prepared:
    """``statement`` compiled once per process (it must live as long: a module constant, or
    built by a cached function)."""
    found = _prepared.get(id(statement))
    if found is not None and found.statement is statement:
        return found
    compiled: Any = statement.compile(dialect=dialect)
    binds = []
    for name in compiled.positiontup:
        bind = compiled.binds[name]
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        binds.append((name, process, _REQUIRED if bind.required else bind.effective_value))
    # A SELECT's columns, or what an INSERT / UPDATE / DELETE returns (nothing without
    # RETURNING).
    columns = tuple(
        column.type.dialect_impl(dialect).result_processor(dialect, None)
        for column in statement.exported_columns
    )
    found = Prepared(statement, compiled.string, tuple(binds), columns)
    _prepared[id(statement)] = found
    return found


_SCRIPT_SENT = "countersign_script_sent"
"""``AsyncSession.info`` key: a unit of work's script, its own transaction, was sent."""


@dataclass(frozen=True, slots=True)
class Step:
    """One statement of a script with its parameters (one row of them, or many)."""

    statement: Any
    values: Mapping[str, Any] | list[dict[str, Any]]


async def run_script(db_session: AsyncSession, steps: list[Step]) -> list[list[tuple[Any, ...]]]:
    """The steps in one hand-off; the rows each returned (type-processed)."""
    connection = await db_session.connection()
    dialect = connection.dialect
    options = (
        connection.sync_connection.get_execution_options() if connection.sync_connection else {}
    )
    own_transaction = bool(options.get(NO_TRANSACTION, False))
    if own_transaction:
        # The script is the unit of work's whole transaction: a second would be another.
        if db_session.info.get(_SCRIPT_SENT):
            raise RuntimeError("a one-statement unit of work sends one script, not two")
        db_session.info[_SCRIPT_SENT] = True
    prepared: list[Prepared] = []
    statements: list[Statement] = []
    for step in steps:
        found = prepare(step.statement, dialect)
        prepared.append(found)
        if isinstance(step.values, list):
            statements.append((found.sql, [found.parameters(row) for row in step.values], True))
        else:
            statements.append((found.sql, found.parameters(step.values), False))
    raw = await connection.get_raw_connection()
    driver = raw.driver_connection
    if not isinstance(driver, Connection):
        raise TypeError("a script needs Countersign's SQLite driver")
    try:
        results = await driver.run_script(statements, own_transaction=own_transaction)
    except sqlite3.Error as error:
        if (getattr(error, "sqlite_errorname", "") or "").startswith(STALE_SQLITE_CODES):
            # As the engine's error hook does for a statement: the connection may have
            # opened read-only; the pool opens a new one.
            await connection.invalidate()
        wrapped = DBAPIError.instance(
            "(a script of several statements)",
            None,
            error,
            sqlite3.Error,
            hide_parameters=True,
            dialect=dialect,
        )
        raise wrapped from error
    return [found.rows(rows) for found, rows in zip(prepared, results, strict=True)]
