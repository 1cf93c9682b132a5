"""Wake-ups across processes: PostgresBroker's LISTEN/NOTIFY on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from countersign.broker import MAX_HANDED_EVENTS, OUTBOX_LIMIT, LocalBroker, PostgresBroker
from countersign.config import normalise_database_url
from countersign.domain.events import EventType, RunEvent
from countersign.domain.models import RunId, new_id
from tests.support.databases import TestDatabase

pytestmark = pytest.mark.backends("postgres")

AT = datetime(2026, 1, 1, tzinfo=UTC)


def stored_event(run_id: RunId, seq: int) -> RunEvent:
    return RunEvent(
        run_id=run_id,
        seq=seq,
        attempt=1,
        type=EventType.TEXT_DELTA,
        data={"text": "x"},
        created_at=AT,
    )


@pytest.fixture
async def brokers(database: TestDatabase) -> AsyncIterator[tuple[PostgresBroker, PostgresBroker]]:
    """Two brokers on one database, as two server processes would have."""
    dsn = normalise_database_url(database.url).replace("+asyncpg", "", 1)
    pair = (PostgresBroker(dsn), PostgresBroker(dsn))
    for broker in pair:
        await broker.start()
    try:
        async with asyncio.timeout(10):
            for broker in pair:
                await broker.connected.wait()
        yield pair
    finally:
        for broker in pair:
            await broker.stop()


async def test_a_run_change_wakes_followers_in_another_process(
    brokers: tuple[PostgresBroker, PostgresBroker],
) -> None:
    here, there = brokers
    run_id, other_run = RunId(new_id()), RunId(new_id())
    async with there.follow(run_id) as follower, there.follow(other_run) as bystander:
        here.run_changed(run_id, [stored_event(run_id, 1)])
        # Across processes the wake-up carries no events: the follower reads the database.
        assert await follower.next(10) == []
        assert await bystander.next(0.3) is None


async def test_work_announced_in_one_process_wakes_the_other(
    brokers: tuple[PostgresBroker, PostgresBroker],
) -> None:
    here, there = brokers
    waiting = asyncio.create_task(there.wait_for_work(30))
    await asyncio.sleep(0.1)
    here.work_available()
    async with asyncio.timeout(10):
        await waiting


async def test_a_process_is_not_woken_twice_by_its_own_notification(
    brokers: tuple[PostgresBroker, PostgresBroker],
) -> None:
    here, _there = brokers
    run_id = RunId(new_id())
    async with here.follow(run_id) as follower:
        here.run_changed(run_id, [stored_event(run_id, 1)])
        assert await follower.next(5) == [stored_event(run_id, 1)]
        # The NOTIFY comes back to this process too; it must not wake the follower again.
        assert await follower.next(0.5) is None


async def test_a_burst_of_wake_ups_reaches_every_follower_in_the_other_process(
    brokers: tuple[PostgresBroker, PostgresBroker],
) -> None:
    """Wake-ups that gather while one is sent go together in one statement: each run's
    followers in the other process are still woken, and work and feed wake-ups with them."""
    here, there = brokers
    await there.wait_for_work(0)  # the wake-ups it gave itself when it connected
    await there.wait_for_changes(0)
    runs = [RunId(new_id()) for _ in range(50)]
    async with contextlib.AsyncExitStack() as stack:
        followers = [await stack.enter_async_context(there.follow(run_id)) for run_id in runs]
        work = asyncio.create_task(there.wait_for_work(30))
        changes = asyncio.create_task(there.wait_for_changes(30))
        await asyncio.sleep(0.1)
        for run_id in runs:
            here.run_changed(run_id)
        here.work_available()
        here.data_changed("a note")
        woken = await asyncio.gather(*(follower.next(10) for follower in followers))
        assert woken == [[] for _ in runs]
        async with asyncio.timeout(10):
            await work
            assert "a note" in await changes


async def test_local_followers_get_the_committed_events_in_order() -> None:
    broker = LocalBroker()
    run_id = RunId(new_id())
    async with broker.follow(run_id) as follower:
        assert await follower.next(0.05) is None
        broker.run_changed(run_id, [stored_event(run_id, 1)])
        broker.run_changed(run_id, [stored_event(run_id, 2), stored_event(run_id, 3)])
        broker.run_changed(run_id)  # a status change with no events
        assert [event.seq for event in await follower.next(1) or []] == [1, 2, 3]
        assert await follower.next(0.05) is None


async def test_a_follower_that_falls_far_behind_is_told_to_read_the_database() -> None:
    broker = LocalBroker()
    run_id = RunId(new_id())
    async with broker.follow(run_id) as follower:
        for seq in range(1, MAX_HANDED_EVENTS + 2):
            broker.run_changed(run_id, [stored_event(run_id, seq)])
        assert await follower.next(1) == []
        broker.run_changed(run_id, [stored_event(run_id, MAX_HANDED_EVENTS + 2)])
        assert [event.seq for event in await follower.next(1) or []] == [MAX_HANDED_EVENTS + 2]


@pytest.mark.backends("postgres")
async def test_wake_ups_piled_up_without_a_connection_stay_bounded_and_still_wake(
    database: TestDatabase,
) -> None:
    """While the broker has no connection, 25,000 wake-ups of distinct runs leave at most
    OUTBOX_LIMIT waiting; once it connects, the other process is still woken."""
    dsn = normalise_database_url(database.url).replace("+asyncpg", "", 1)
    here, there = PostgresBroker(dsn), PostgresBroker(dsn)
    for _ in range(25_000):
        here.run_changed(RunId(new_id()))
    assert len(here._outbox) <= OUTBOX_LIMIT
    await there.start()
    try:
        async with asyncio.timeout(10):
            await there.connected.wait()
        waiting = asyncio.create_task(there.wait_for_work(30))
        await asyncio.sleep(0.1)
        await here.start()  # connects, then sends what waited (a general wake-up among it)
        async with asyncio.timeout(10):
            await waiting
    finally:
        await here.stop()
        await there.stop()
