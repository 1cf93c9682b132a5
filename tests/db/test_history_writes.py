"""A run's write that replaces the end of its session's model history (a checkpoint or a
turn's end after pydantic-ai rewrote the request the history ended with).

On PostgreSQL such a write is one statement (``fits_one_statement``); on SQLite it is a
transaction. Both must leave the same history, and a write whose lease is gone must leave it
as it was.
"""

from __future__ import annotations

from typing import Any

import pytest

from countersign.db.repositories import fits_one_statement
from countersign.domain.errors import LeaseLost
from countersign.domain.events import EventType, NewEvent, RunBatch
from countersign.domain.models import Lease, RunId, SessionId
from countersign.services import ServiceDeps
from tests.db.test_lock_order import new_session, running_run


def message(text: str) -> dict[str, Any]:
    return {"kind": "request", "parts": [{"part_kind": "user-prompt", "content": text}]}


def replacing(
    run_id: RunId, session_id: SessionId, lease: Lease, after: int, texts: list[str]
) -> RunBatch:
    """A checkpoint that stores ``texts`` as the session's messages after ``after``, replacing
    whatever held those places and everything past them."""
    return RunBatch(
        run_id=run_id,
        session_id=session_id,
        lease=lease,
        events=[NewEvent(EventType.TEXT_DELTA, {"text": "x"})],
        values={"history_seq": after + len(texts)},
        checkpoint_after=1,
        messages=[message(text) for text in texts],
        messages_after=after,
        truncate=True,
    )


async def write(services: ServiceDeps, batch: RunBatch) -> None:
    assert fits_one_statement(batch)  # one statement on PostgreSQL
    async with services.uow_factory(one_statement=True) as uow:
        await uow.runs.write(batch, at=services.clock.now())
        await uow.commit()


async def history(services: ServiceDeps, session_id: SessionId) -> list[str]:
    async with services.uow_factory(write=False) as uow:
        stored = await uow.history.load(session_id, upto=100)
    return [item["parts"][0]["content"] for item in stored]


@pytest.fixture
async def held(services: ServiceDeps, make_account: object) -> tuple[SessionId, RunId, Lease]:
    """A new session and a run of it held by a process (the test plays it)."""
    account = await make_account()  # type: ignore[operator]
    session_id = await new_session(services, account)
    run_id, lease = await running_run(services, session_id)
    return session_id, run_id, lease


async def test_a_write_that_replaces_the_history_end_leaves_exactly_the_new_end(
    services: ServiceDeps, held: tuple[SessionId, RunId, Lease]
) -> None:
    session_id, run_id, lease = held
    await write(services, replacing(run_id, session_id, lease, 0, ["a", "b", "c"]))
    assert await history(services, session_id) == ["a", "b", "c"]
    # Fewer than were there: the rest goes.
    await write(services, replacing(run_id, session_id, lease, 1, ["B"]))
    assert await history(services, session_id) == ["a", "B"]
    # More than were there: overwritten, then added to.
    await write(services, replacing(run_id, session_id, lease, 1, ["b2", "c2", "d2"]))
    assert await history(services, session_id) == ["a", "b2", "c2", "d2"]
    # Nothing new: only cut.
    await write(services, replacing(run_id, session_id, lease, 2, []))
    assert await history(services, session_id) == ["a", "b2"]

    async with services.uow_factory(write=False) as uow:
        events = await uow.runs.events(run_id, after_seq=0, limit=10)
    assert [event.seq for event in events] == [1, 2, 3, 4]


@pytest.mark.parametrize("lease_of", ["another owner", "an earlier attempt"])
async def test_a_replacing_write_whose_lease_is_gone_changes_nothing(
    services: ServiceDeps, held: tuple[SessionId, RunId, Lease], lease_of: str
) -> None:
    session_id, run_id, lease = held
    await write(services, replacing(run_id, session_id, lease, 0, ["a", "b", "c"]))

    stale = (
        Lease(owner="someone else", attempt=lease.attempt)
        if lease_of == "another owner"
        else Lease(owner=lease.owner, attempt=lease.attempt + 1)
    )
    with pytest.raises(LeaseLost):
        await write(services, replacing(run_id, session_id, stale, 1, ["X"]))
    assert await history(services, session_id) == ["a", "b", "c"]
    async with services.uow_factory(write=False) as uow:
        assert len(await uow.runs.events(run_id, after_seq=0, limit=10)) == 1
