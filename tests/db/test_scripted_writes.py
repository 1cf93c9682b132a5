"""A turn's hot writes: on PostgreSQL one statement each, on SQLite one script each
(``db/sqlite_script.py``: its statements, BEGIN IMMEDIATE and COMMIT in one hand-off to the
driver's thread). Either way each is all or nothing, and what it answers is what it stored.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from countersign.db import sqlite_driver
from countersign.domain.errors import Conflict, LeaseLost
from countersign.domain.events import AssistantReply, EventType, NewEvent, RunBatch
from countersign.domain.models import Lease, MessageId, MessageRole, Run, RunId, RunStatus
from countersign.services import ServiceDeps
from tests.conftest import Account
from tests.db.test_lock_order import new_session, running_run


@pytest.fixture
def hand_offs() -> Iterator[list[str]]:
    """The name of every call handed to an SQLite connection's thread while the test runs
    (seen where the driver hands statements and scripts over, and where aiosqlite queues
    the rest)."""
    seen: list[str] = []
    queue = aiosqlite.Connection._execute
    run = sqlite_driver.Connection.run

    def name(function: Any) -> str:
        return str(getattr(getattr(function, "func", function), "__name__", "?"))

    async def queued(self: Any, function: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(name(function))
        return await queue(self, function, *args, **kwargs)

    async def ran(self: Any, function: Any) -> Any:
        seen.append(name(function))
        return await run(self, function)

    aiosqlite.Connection._execute = queued  # type: ignore[method-assign]
    sqlite_driver.Connection.run = ran  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        aiosqlite.Connection._execute = queue  # type: ignore[method-assign]
        sqlite_driver.Connection.run = run  # type: ignore[method-assign]


# --- The driver -------------------------------------------------------------------------


@pytest.fixture
async def connection(tmp_path: Path) -> Any:
    connection = await sqlite_driver.connect(str(tmp_path / "t.db"), isolation_level=None)
    cursor = connection.cursor()
    await cursor.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    try:
        yield connection
    finally:
        await connection.close()


async def rows(connection: Any) -> list[tuple[Any, ...]]:
    cursor = connection.cursor()
    await cursor.execute("SELECT id, v FROM t ORDER BY id")
    return list(await cursor.fetchall())


@pytest.mark.backends("sqlite")
async def test_a_script_is_its_own_transaction_and_answers_each_statements_rows(
    connection: Any,
) -> None:
    answered = await connection.run_script(
        [
            ("INSERT INTO t (id, v) VALUES (?, ?)", [(1, "a"), (2, "b")], True),
            ("UPDATE t SET v = v || '!' WHERE id = ? RETURNING id, v", (2,), False),
            ("SELECT count(*) FROM t", (), False),
        ],
        own_transaction=True,
    )
    assert answered == [[], [(2, "b!")], [(2,)]]
    assert not connection.in_transaction
    assert await rows(connection) == [(1, "a"), (2, "b!")]


@pytest.mark.backends("sqlite")
async def test_a_script_that_fails_midway_leaves_nothing_and_the_connection_usable(
    connection: Any,
) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        await connection.run_script(
            [
                ("INSERT INTO t (id, v) VALUES (?, ?)", (1, "written first"), False),
                ("INSERT INTO t (id, v) VALUES (?, ?)", (1, "the same id"), False),
            ],
            own_transaction=True,
        )
    assert not connection.in_transaction
    assert await rows(connection) == []
    await connection.run_script(
        [("INSERT INTO t (id, v) VALUES (?, ?)", (1, "after"), False)], own_transaction=True
    )
    assert await rows(connection) == [(1, "after")]


@pytest.mark.backends("sqlite")
async def test_a_script_inside_a_transaction_belongs_to_it(connection: Any) -> None:
    cursor = connection.cursor()
    await cursor.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="within a transaction"):
        await connection.run_script([("SELECT 1", (), False)], own_transaction=True)
    await connection.run_script(
        [("INSERT INTO t (id, v) VALUES (?, ?)", (1, "x"), False)], own_transaction=False
    )
    assert connection.in_transaction  # not committed by the script
    await connection.rollback()
    assert await rows(connection) == []


# --- The repository's writes, on both databases -----------------------------------------


def turn_end(run_id: RunId, session_id: Any, lease: Lease, *, history_after: int) -> RunBatch:
    """A turn's last write as the executor makes it: its last events, the run's end, a model
    message."""
    return RunBatch(
        run_id=run_id,
        session_id=session_id,
        lease=lease,
        events=[
            NewEvent(EventType.TEXT_DELTA, {"text": "hel"}),
            NewEvent(EventType.MESSAGE_COMPLETED, {"content": "hello"}),
            NewEvent(EventType.RUN_FINISHED, {"status": RunStatus.SUCCEEDED.value}),
        ],
        values={
            "status": RunStatus.SUCCEEDED.value,
            "history_seq": history_after + 1,
            "owner": None,
            "lease_expires_at": None,
        },
        messages=[{"kind": "response", "parts": [{"part_kind": "text", "content": "hello"}]}],
        messages_after=history_after,
    )


async def stored(services: ServiceDeps, run_id: RunId, session_id: Any) -> tuple[Any, ...]:
    """The run, its events, the session's messages and its model history."""
    async with services.uow_factory(write=False) as uow:
        run = await uow.runs.get(run_id, session_id=session_id)
        events = await uow.runs.events(run_id, after_seq=0, limit=100)
        messages = await uow.messages.list(session_id, after_seq=0, limit=100)
        history = await uow.history.load(session_id, upto=100)
    return run, events, messages, history


async def test_a_turns_end_stores_the_reply_and_its_seq_in_message_completed(
    services: ServiceDeps, make_account: Any
) -> None:
    account: Account = await make_account()
    session_id = await new_session(services, account)
    run_id, lease = await running_run(services, session_id)
    async with services.uow_factory(one_statement=True) as uow:
        answered = await uow.runs.write(
            turn_end(run_id, session_id, lease, history_after=0),
            at=services.clock.now(),
            reply=AssistantReply(message_id=MessageId(services.new_id()), content="hello"),
        )
        await uow.commit()
    run, events, messages, history = await stored(services, run_id, session_id)
    assert run is not None
    assert run.status is RunStatus.SUCCEEDED
    assert [(m.role, m.content) for m in messages] == [(MessageRole.ASSISTANT, "hello")]
    assert events == answered  # what the write answered is what it stored
    assert [event.seq for event in events] == [1, 2, 3]
    completed = events[1]
    assert completed.type is EventType.MESSAGE_COMPLETED
    assert completed.data["seq"] == messages[0].seq
    assert len(history) == 1


async def test_a_write_that_fails_midway_leaves_nothing(
    services: ServiceDeps, make_account: Any
) -> None:
    """The reply and the events come before the model message; a model message whose place
    is taken fails the write, and what came before it must go too."""
    account: Account = await make_account()
    session_id = await new_session(services, account)
    run_id, lease = await running_run(services, session_id)
    first = turn_end(run_id, session_id, lease, history_after=0)
    checkpoint = RunBatch(
        run_id=run_id,
        session_id=session_id,
        lease=lease,
        events=[NewEvent(EventType.TEXT_DELTA, {"text": "x"})],
        values={"history_seq": 1},
        checkpoint_after=1,
        messages=first.messages,
        messages_after=0,
    )
    async with services.uow_factory(one_statement=True) as uow:
        await uow.runs.write(checkpoint, at=services.clock.now())
        await uow.commit()
    before = await stored(services, run_id, session_id)

    async def end_the_turn() -> None:
        async with services.uow_factory(one_statement=True) as uow:
            await uow.runs.write(
                first,  # its model message goes where the checkpoint's is
                at=services.clock.now(),
                reply=AssistantReply(message_id=MessageId(services.new_id()), content="hello"),
            )
            await uow.commit()

    with pytest.raises(Conflict):
        await end_the_turn()
    assert await stored(services, run_id, session_id) == before


async def test_a_group_write_skips_the_batch_whose_lease_is_gone_and_writes_the_rest(
    services: ServiceDeps, make_account: Any
) -> None:
    account: Account = await make_account()
    held_session = await new_session(services, account)
    lost_session = await new_session(services, account)
    held_run, held_lease = await running_run(services, held_session)
    lost_run, lost_lease = await running_run(services, lost_session)
    stale = Lease(owner=lost_lease.owner, attempt=lost_lease.attempt + 1)
    before = await stored(services, lost_run, lost_session)

    async with services.uow_factory(one_statement=True) as uow:
        answered = await uow.runs.append_many(
            [
                turn_end(lost_run, lost_session, stale, history_after=0),
                turn_end(held_run, held_session, held_lease, history_after=0),
            ],
            at=services.clock.now(),
        )
        await uow.commit()
    assert isinstance(answered[0], LeaseLost)
    assert not isinstance(answered[1], LeaseLost)
    assert await stored(services, lost_run, lost_session) == before
    run, events, _messages, history = await stored(services, held_run, held_session)
    assert run is not None
    assert run.status is RunStatus.SUCCEEDED
    assert events == answered[1]
    assert len(history) == 1


# --- A run's start on SQLite: one hand-off -----------------------------------------------


def new_run(services: ServiceDeps, session_id: Any) -> Run:
    return Run(
        id=RunId(services.new_id()),
        session_id=session_id,
        status=RunStatus.QUEUED,
        attempt=0,
        error=None,
        created_at=services.clock.now(),
        finished_at=None,
    )


@pytest.mark.backends("sqlite")
async def test_a_start_is_one_hand_off_and_writes_nothing_to_someone_elses_session(
    services: ServiceDeps, make_account: Any, hand_offs: list[str]
) -> None:
    owner: Account = await make_account()
    stranger: Account = await make_account()
    session_id = await new_session(services, owner)

    async def start(actor: Account) -> Any:
        run = new_run(services, session_id)
        async with services.uow_factory(one_statement=True) as uow:
            hand_offs.clear()
            found = await uow.runs.start(
                run,
                owner=actor.user.id,
                prompt="hi",
                message_id=MessageId(services.new_id()),
                lease_owner=None,
                lease_until=None,
            )
            await uow.commit()
        return run, found, list(hand_offs)

    run, found, calls = await start(stranger)
    assert found is None
    assert calls == ["_script"]  # BEGIN IMMEDIATE, the statements and COMMIT: one hand-off
    assert (await stored(services, run.id, session_id))[:3] == (None, [], [])

    run, found, calls = await start(owner)
    assert calls == ["_script"]
    assert found is not None
    _session, context, message = found
    assert (message.seq, message.content, context.history_length) == (1, "hi", 0)
    stored_run, _events, messages, _history = await stored(services, run.id, session_id)
    assert stored_run is not None
    assert stored_run.status is RunStatus.QUEUED
    assert messages == [message]

    # A second start while this one is queued: the active-run index refuses it (Conflict), and its
    # message (inserted after the run) is not left behind.
    with pytest.raises(Conflict):
        await start(owner)
    assert (await stored(services, run.id, session_id))[2] == [message]


@pytest.mark.backends("sqlite")
async def test_a_one_statement_unit_of_work_refuses_a_second_script(
    services: ServiceDeps, make_account: Any
) -> None:
    """On SQLite the script is such a unit of work's whole transaction: a second one would
    be a second transaction, so it is refused before it is sent."""
    account: Account = await make_account()
    session_id = await new_session(services, account)
    run_id, lease = await running_run(services, session_id)
    first = turn_end(run_id, session_id, lease, history_after=0)

    async def write_twice() -> None:
        async with services.uow_factory(one_statement=True) as uow:
            await uow.runs.write(first, at=services.clock.now())
            await uow.runs.write(first, at=services.clock.now())

    with pytest.raises(RuntimeError, match="one script"):
        await write_twice()
    run, events, _messages, _history = await stored(services, run_id, session_id)
    assert run is not None
    assert len(events) == len(first.events)  # the first script, and only it
