"""Wake-ups across processes: PostgresBroker's LISTEN/NOTIFY on a real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from countersign.broker import PostgresBroker
from countersign.config import normalise_database_url
from countersign.domain.models import RunId, new_id
from tests.support.databases import TestDatabase

pytestmark = pytest.mark.backends("postgres")


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
        here.run_changed(run_id)
        assert await follower.wait(10) is True
        assert await bystander.wait(0.3) is False


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
        here.run_changed(run_id)
        assert await follower.wait(5) is True
        # The NOTIFY comes back to this process too; it must not wake the follower again.
        assert await follower.wait(0.5) is False
