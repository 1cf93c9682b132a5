"""The SQLite engine's driver (``db.sqlite_driver``): one hand-off per statement, and the same
answers SQLAlchemy got from aiosqlite's own cursors: rows, row counts, errors, transactions."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError

from countersign.db import sqlite_driver
from countersign.db.engine import IMMEDIATE, create_engine
from tests.conftest import make_settings

pytestmark = pytest.mark.backends("sqlite")


@pytest.fixture
async def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'driver.db'}")
    engine = create_engine(settings)
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"))
    try:
        yield engine
    finally:
        await engine.dispose()


async def test_the_engine_opens_its_connections_through_the_driver(engine) -> None:  # type: ignore[no-untyped-def]
    async with engine.connect() as connection:
        raw = await connection.get_raw_connection()
        assert isinstance(raw.driver_connection, sqlite_driver.Connection)


async def test_rows_row_counts_and_returning(engine) -> None:  # type: ignore[no-untyped-def]
    async with engine.begin() as connection:
        inserted = await connection.execute(
            text("INSERT INTO t (id, v) VALUES (:id, :v)"),
            [{"id": n, "v": f"v{n}"} for n in range(1, 6)],
        )
        assert inserted.rowcount == 5
        returned = await connection.execute(
            text("UPDATE t SET v = v || '!' WHERE id > :id RETURNING id, v"), {"id": 3}
        )
        assert sorted(returned.all()) == [(4, "v4!"), (5, "v5!")]
        updated = await connection.execute(text("UPDATE t SET v = 'x' WHERE id <= 2"))
        assert updated.rowcount == 2
        assert (await connection.execute(text("SELECT count(*) FROM t"))).scalar() == 5
        assert (await connection.execute(text("SELECT v FROM t WHERE id = 99"))).first() is None
        result = await connection.execute(text("SELECT id FROM t ORDER BY id"))
        assert result.fetchone() == (1,)
        assert result.fetchmany(2) == [(2,), (3,)]
        assert result.fetchall() == [(4,), (5,)]


async def test_errors_are_the_drivers_and_leave_the_connection_usable(engine) -> None:  # type: ignore[no-untyped-def]
    async with engine.connect() as connection:
        await connection.execute(text("INSERT INTO t (id, v) VALUES (1, 'a')"))
        await connection.commit()
        with pytest.raises(IntegrityError):
            await connection.execute(text("INSERT INTO t (id, v) VALUES (1, 'b')"))
        await connection.rollback()
        with pytest.raises(OperationalError, match="no such table"):
            await connection.execute(text("SELECT * FROM missing"))
        await connection.rollback()
        assert (await connection.execute(text("SELECT v FROM t"))).scalars().all() == ["a"]


async def test_a_rolled_back_transaction_leaves_nothing_and_a_committed_one_stays(engine) -> None:  # type: ignore[no-untyped-def]
    async with engine.connect() as connection:
        await connection.execute(text("INSERT INTO t (id, v) VALUES (1, 'gone')"))
        await connection.rollback()
        await connection.execute(text("INSERT INTO t (id, v) VALUES (2, 'kept')"))
        await connection.commit()
    async with engine.connect() as connection:
        assert (await connection.execute(text("SELECT v FROM t"))).scalars().all() == ["kept"]


async def test_a_writer_waits_for_another_connections_write_lock(engine) -> None:  # type: ignore[no-untyped-def]
    """Two connections, two threads: the second BEGIN IMMEDIATE waits (busy timeout) for the
    first to commit, and then sees its row."""
    async with engine.connect() as first, engine.connect() as second:
        first = await first.execution_options(**{IMMEDIATE: True})
        second = await second.execution_options(**{IMMEDIATE: True})
        await first.execute(text("INSERT INTO t (id, v) VALUES (1, 'first')"))

        async def write_second() -> list[str]:
            await second.execute(text("INSERT INTO t (id, v) VALUES (2, 'second')"))
            rows = (await second.execute(text("SELECT v FROM t ORDER BY id"))).scalars().all()
            await second.commit()
            return list(rows)

        waiting = asyncio.create_task(write_second())
        await asyncio.sleep(0.3)
        assert not waiting.done()  # held by the first writer's lock
        await first.commit()
        assert await asyncio.wait_for(waiting, 10) == ["first", "second"]


async def test_a_second_begin_inside_a_transaction_is_refused(tmp_path: Path) -> None:
    """As sqlite3 refuses it: whether the first BEGIN is still waiting for its statement or
    has run. (A connection shared by two users must fail loudly, not mix their work.)"""
    connection = await sqlite_driver.connect(str(tmp_path / "t.db"), isolation_level=None)
    try:
        cursor = connection.cursor()
        await cursor.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        await cursor.execute("BEGIN")
        with pytest.raises(sqlite3.OperationalError, match="within a transaction"):
            await cursor.execute("BEGIN IMMEDIATE")
        await cursor.execute("INSERT INTO t (id) VALUES (1)")
        assert connection.in_transaction
        with pytest.raises(sqlite3.OperationalError, match="within a transaction"):
            await cursor.execute("BEGIN")
        await connection.rollback()
        await cursor.execute("SELECT count(*) FROM t")
        assert await cursor.fetchall() == [(0,)]
    finally:
        await connection.close()


async def test_a_commit_waits_for_a_statement_still_under_way(tmp_path: Path) -> None:
    """A commit asked for while the transaction's first statement (and its BEGIN) is still
    queued behind other work in the driver's thread is not skipped as "no transaction":
    it runs after that statement and commits it."""
    path = str(tmp_path / "t.db")
    connection = await sqlite_driver.connect(path, isolation_level=None)
    try:
        cursor = connection.cursor()
        await cursor.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        await cursor.execute("BEGIN IMMEDIATE")  # sent with the next statement
        busy = asyncio.create_task(connection.run(lambda: time.sleep(0.3)))
        await asyncio.sleep(0)  # the thread is busy: what follows waits in its queue
        inserting = asyncio.create_task(cursor.execute("INSERT INTO t (id) VALUES (1)"))
        await asyncio.sleep(0)  # handed off, not run yet
        assert not connection.in_transaction
        await connection.commit()
        await inserting
        await busy
        assert not connection.in_transaction
    finally:
        await connection.close()
    other = sqlite3.connect(path)
    try:
        assert other.execute("SELECT id FROM t").fetchall() == [(1,)]
    finally:
        other.close()


async def test_a_statement_whose_caller_was_cancelled_is_still_rolled_back(
    tmp_path: Path,
) -> None:
    """A statement handed over and then given up by its caller (cancelled while its
    ``BEGIN IMMEDIATE`` waited for another connection's write lock) still runs once the lock
    is free, and it opens the transaction: the rollback asked for in between must not be
    skipped as "no transaction", or the connection would go back to the pool in the middle
    of one, holding SQLite's write lock."""
    path = str(tmp_path / "t.db")
    connection = await sqlite_driver.connect(path, isolation_level=None, timeout=10)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        cursor = connection.cursor()
        await cursor.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        await cursor.execute("BEGIN IMMEDIATE")  # sent with the next statement
        inserting = asyncio.create_task(cursor.execute("INSERT INTO t (id) VALUES (1)"))
        await asyncio.sleep(0.2)  # its BEGIN IMMEDIATE waits for the lock
        inserting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await inserting
        rolling_back = asyncio.create_task(connection.rollback())  # as the unit of work does
        await asyncio.sleep(0.1)
        other.rollback()  # the lock is free: the given-up statement runs now
        await asyncio.wait_for(rolling_back, 10)
        await connection.run(lambda: None)  # everything handed over before this has run
        assert not connection.in_transaction
        other.execute("BEGIN IMMEDIATE")  # the write lock is free
        assert other.execute("SELECT id FROM t").fetchall() == []
        other.rollback()
    finally:
        other.close()
        await connection.close()
