"""The one lock order on PostgreSQL: a run's row before its session's, runs in id order.

Each test makes two real transactions meet in the order that used to deadlock (the first
holds what an executor's write holds at that point, the second is started and left waiting),
then lets the first go on: both must finish, neither may be a deadlock's victim.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest

from countersign.domain.errors import LeaseLost
from countersign.domain.events import EventType, NewEvent, RunBatch
from countersign.domain.models import Lease, Run, RunId, RunStatus, SessionId
from countersign.services import ServiceDeps
from countersign.services.sessions import create_session, delete_session
from tests.conftest import Account

pytestmark = pytest.mark.backends("postgres")

OWNER = "lock-order-test"
STEP = 0.3
"""Seconds the second transaction is given to reach its lock and wait."""
BOUND = 20.0


async def running_run(services: ServiceDeps, session_id: SessionId) -> tuple[RunId, Lease]:
    """A run of the session held by a process that is not this one (the test plays it)."""
    now = services.clock.now()
    run = Run(
        id=RunId(services.new_id()),
        session_id=session_id,
        status=RunStatus.RUNNING,
        attempt=1,
        error=None,
        created_at=now,
        finished_at=None,
    )
    async with services.uow_factory() as uow:
        await uow.runs.add(run, at=now, owner=OWNER, lease_until=now + timedelta(hours=1))
        await uow.commit()
    return run.id, Lease(owner=OWNER, attempt=1)


def batch(run_id: RunId, session_id: SessionId, lease: Lease) -> RunBatch:
    """A checkpoint as the executor writes it: an event and a model message."""
    return RunBatch(
        run_id=run_id,
        session_id=session_id,
        lease=lease,
        events=[NewEvent(EventType.TEXT_DELTA, {"text": "x", "attempt": 1})],
        values={"history_seq": 1},
        checkpoint_after=1,
        messages=[{"kind": "request", "parts": [{"part_kind": "user-prompt", "content": "x"}]}],
        messages_after=0,
    )


async def new_session(services: ServiceDeps, account: Account) -> SessionId:
    session = await create_session(services, actor=account.user.id, agent_id=None, title="locks")
    return session.id


async def test_deleting_a_session_waits_for_its_runs_write_instead_of_deadlocking(
    services: ServiceDeps, make_account: object
) -> None:
    account = await make_account()  # type: ignore[operator]
    session_id = await new_session(services, account)
    run_id, lease = await running_run(services, session_id)
    async with asyncio.timeout(BOUND), services.uow_factory() as writer:
        await writer.runs.lock(run_id)  # the executor's write has updated its run
        deleting = asyncio.create_task(
            delete_session(services, actor=account.user.id, session_id=session_id)
        )
        await asyncio.sleep(STEP)
        assert not deleting.done()  # it waits for the run
        # The write goes on to the session its model messages point to, and commits.
        [stored] = await writer.runs.append_many(
            [batch(run_id, session_id, lease)], at=services.clock.now()
        )
        assert not isinstance(stored, Exception), stored
        await writer.commit()
    async with asyncio.timeout(BOUND):
        await deleting  # then the delete goes through
    async with services.uow_factory(write=False) as uow:
        assert await uow.runs.get(run_id, session_id=session_id) is None


async def test_the_event_writer_and_the_lease_keeper_lock_runs_in_one_order(
    services: ServiceDeps, make_account: object
) -> None:
    account = await make_account()  # type: ignore[operator]
    sessions = [await new_session(services, account) for _ in range(2)]
    runs = [await running_run(services, session_id) for session_id in sessions]
    (low, low_lease), (high, high_lease) = sorted(runs, key=lambda pair: uuid.UUID(str(pair[0])))
    low_session, high_session = (
        sessions[runs.index((low, low_lease))],
        sessions[runs.index((high, high_lease))],
    )
    async with asyncio.timeout(BOUND), services.uow_factory() as keeper:
        await keeper.runs.lock(low)  # the lease keeper has locked the lower run

        async def write_group() -> None:
            async with services.uow_factory() as writer:
                # Batches queued in the other order: the higher run's came first.
                results = await writer.runs.append_many(
                    [batch(high, high_session, high_lease), batch(low, low_session, low_lease)],
                    at=services.clock.now(),
                )
                assert not any(isinstance(result, Exception) for result in results), results
                await writer.commit()

        writing = asyncio.create_task(write_group())
        await asyncio.sleep(STEP)
        assert not writing.done()
        kept = await keeper.runs.extend_leases(
            owner=OWNER, run_ids=[high, low], until=services.clock.now() + timedelta(hours=2)
        )
        assert {run for run, _attempt in kept} == {low, high}
        await keeper.commit()
    async with asyncio.timeout(BOUND):
        await writing


async def test_a_group_written_in_one_statement_refuses_only_the_run_whose_lease_is_gone(
    services: ServiceDeps, make_account: object
) -> None:
    """Several runs' batches in the writer's one statement: a run held by another owner (or
    another attempt) gets LeaseLost and nothing of its batch is stored; the others are
    stored with their own numbering and checkpoints."""
    account = await make_account()  # type: ignore[operator]
    sessions = [await new_session(services, account) for _ in range(3)]
    runs = [await running_run(services, session_id) for session_id in sessions]
    (first, lease), (second, _), (third, _) = runs
    async with services.uow_factory() as uow:  # the first run has written before
        await uow.runs.append(
            first,
            [NewEvent(EventType.RUN_STARTED, {})],
            at=services.clock.now(),
            lease=lease,
        )
        await uow.commit()
    async with services.uow_factory(one_statement=True) as uow:
        results = await uow.runs.append_many(
            [
                batch(first, sessions[0], lease),
                batch(second, sessions[1], Lease(owner="someone else", attempt=1)),
                batch(third, sessions[2], Lease(owner=OWNER, attempt=2)),
            ],
            at=services.clock.now(),
        )
        await uow.commit()
    stored, lost, stale = results
    assert not isinstance(stored, Exception)
    assert [e.seq for e in stored] == [2]
    assert isinstance(lost, LeaseLost)
    assert isinstance(stale, LeaseLost)
    async with services.uow_factory(write=False) as uow:
        assert [e.seq for e in await uow.runs.events(first, after_seq=0, limit=10)] == [1, 2]
        assert await uow.runs.status_and_seq(first) == (RunStatus.RUNNING, 2)
        assert await uow.runs.events(second, after_seq=0, limit=10) == []
        assert await uow.runs.events(third, after_seq=0, limit=10) == []
        assert len(await uow.history.load(sessions[0], upto=10)) == 1
        assert await uow.history.load(sessions[1], upto=10) == []
        assert await uow.history.load(sessions[2], upto=10) == []
