"""Decisions, cancels and expiries racing on the same runs, through the real app.

A decision, a cancel and an expiry each write a run and its approval in one transaction. They
take their locks in one order (the run, then its approvals), so on PostgreSQL they queue behind
each other instead of deadlocking; on SQLite one writer at a time runs anyway. Whichever comes
first on a run decides what happens to its approval; the others get 409 (or find nothing to do),
never a 5xx, and every run ends instead of staying stuck.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
import pytest

from countersign.domain.models import (
    Approval,
    ApprovalId,
    ApprovalStatus,
    MessageId,
    MessageRole,
    Run,
    RunId,
    RunStatus,
    SessionId,
    SystemClock,
)
from countersign.services import ServiceDeps
from countersign.services.approvals import EXPIRED_REASON, expire_approvals
from tests.api.test_runs import Sse, events, new_session, run_of, send
from tests.conftest import Account

PAIRS = 100
"""Runs waiting at an approval, each raced on at once."""
RACE_BOUND = 60.0
"""The bound on the race itself; without a deadlock it takes a few seconds."""
SETTLE_BOUND = 60.0
"""The bound on getting the runs to their approvals, and on every run ending afterwards."""
EXPIRERS = 4
"""Expiry sweeps racing with the requests, as several server processes would run them."""
ASK = '/tool write_file {"path": "a.txt", "content": "x"}'
CANCELLED_REASON = "the run was cancelled"
ENDED = {"cancelled", "succeeded"}

MakeAccount = Callable[[], Awaitable[Account]]


@dataclass(frozen=True)
class Waiting:
    """A run that waits at its one approval."""

    session_id: str
    run_id: str
    approval_id: str


@dataclass(frozen=True)
class Answers:
    """What the two racing requests on one run got."""

    decide: httpx.Response
    cancel: httpx.Response


class Later:
    """A clock two days ahead: every pending approval is past its time."""

    def now(self) -> datetime:
        return SystemClock().now() + timedelta(days=2)


async def waiting_runs(client: httpx.AsyncClient, account: Account) -> list[Waiting]:
    """PAIRS sessions, each with a run stopped at an approval (asked for by the demo model)."""
    async with asyncio.timeout(SETTLE_BOUND):
        sessions = await asyncio.gather(*(new_session(client, account) for _ in range(PAIRS)))
        started = await asyncio.gather(
            *(send(client, account, session_id, ASK) for session_id in sessions)
        )
        run_ids = [body["run"]["id"] for body in started]
        logs = await asyncio.gather(
            *(
                events(client, account, session_id, run_id)
                for session_id, run_id in zip(sessions, run_ids, strict=True)
            )
        )
    waiting = []
    for session_id, run_id, log in zip(sessions, run_ids, logs, strict=True):
        assert log[-1].event == "approval.required", log
        waiting.append(Waiting(session_id, run_id, log[-1].data["approval_id"]))
    return waiting


async def race(
    client: httpx.AsyncClient,
    account: Account,
    waiting: list[Waiting],
    *,
    expiry: ServiceDeps | None = None,
) -> tuple[list[Answers], list[int | BaseException]]:
    """For every run, a decision (approve) and a cancel sent at the same moment; with
    ``expiry``, EXPIRERS expiry sweeps (on those deps) start at that moment too.

    Bounded by RACE_BOUND; running into the bound fails the test.
    """
    gate = asyncio.Event()

    async def decide(run: Waiting) -> httpx.Response:
        await gate.wait()
        return await client.post(
            f"/api/v1/sessions/{run.session_id}/approvals/{run.approval_id}",
            json={"decision": "approve"},
            headers=account.headers,
        )

    async def cancel(run: Waiting) -> httpx.Response:
        await gate.wait()
        return await client.post(
            f"/api/v1/sessions/{run.session_id}/runs/{run.run_id}/cancel",
            headers=account.headers,
        )

    async def sweep(deps: ServiceDeps) -> int:
        await gate.wait()
        return await expire_approvals(deps, limit=PAIRS)

    # The sweeps first: they read which approvals are due before they expire any.
    sweeps = [] if expiry is None else [asyncio.create_task(sweep(expiry)) for _ in range(EXPIRERS)]
    pairs = []
    for index, run in enumerate(waiting):
        # Alternate which of the two goes first once the gate opens.
        first, second = (decide, cancel) if index % 2 == 0 else (cancel, decide)
        tasks = {
            first.__name__: asyncio.create_task(first(run)),
            second.__name__: asyncio.create_task(second(run)),
        }
        pairs.append(tasks)
    everything = [task for tasks in pairs for task in tasks.values()] + sweeps
    await asyncio.sleep(0)  # every task is at the gate now
    started = time.monotonic()
    try:
        async with asyncio.timeout(RACE_BOUND):
            gate.set()
            await asyncio.wait(everything)
    except TimeoutError:
        for task in everything:
            task.cancel()
        await asyncio.gather(*everything, return_exceptions=True)
        raise AssertionError(
            f"the {RACE_BOUND:g} s bound ended the race, not the requests (a deadlock?)"
        ) from None
    took = time.monotonic() - started
    assert took < RACE_BOUND, f"the race took {took:.1f} s: the bound, not the requests, ended it"
    answers = [Answers(tasks["decide"].result(), tasks["cancel"].result()) for tasks in pairs]
    return answers, [outcome(task) for task in sweeps]


def outcome(task: asyncio.Task[int]) -> int | BaseException:
    """What a finished task returned, or what it raised."""
    error = task.exception()
    return task.result() if error is None else error


def assert_no_server_errors(answers: list[Answers]) -> None:
    """Not one 5xx; the message counts every status pair, for the record."""
    tally = Counter((pair.decide.status_code, pair.cancel.status_code) for pair in answers)
    failing = [
        response
        for pair in answers
        for response in (pair.decide, pair.cancel)
        if response.status_code >= 500
    ]
    decide_5xx = sum(1 for pair in answers if pair.decide.status_code >= 500)
    cancel_5xx = sum(1 for pair in answers if pair.cancel.status_code >= 500)
    bad_pairs = sum(
        1 for pair in answers if max(pair.decide.status_code, pair.cancel.status_code) >= 500
    )
    assert not failing, (
        f"{bad_pairs} of {len(answers)} pairs had a 5xx (decide {decide_5xx}, cancel "
        f"{cancel_5xx}); (decide, cancel) statuses: {dict(tally)}; first: {failing[0].text}"
    )


def assert_no_busy_database(caplog: pytest.LogCaptureFixture) -> None:
    """No statement met "the database is busy" (a deadlock, a serialization failure or a lock
    timeout) anywhere, the executor's own writes included: there a victim is a turn stopped
    and retried, which answers no request with a 5xx but is the same fault."""
    busy = [
        record.getMessage()
        for record in caplog.records
        if "database is busy" in record.getMessage()
    ]
    assert not busy, f"{len(busy)} statement(s) met a busy database: {busy[:3]}"


async def all_ended(
    client: httpx.AsyncClient, account: Account, runs: list[Waiting]
) -> list[dict[str, object]]:
    """Each run once it has ended (polled one request at a time, so that the polling does not
    starve the executor; the caller bounds the wait)."""
    finals: dict[str, dict[str, object]] = {}
    while len(finals) < len(runs):
        for run in runs:
            if run.run_id not in finals:
                found = await run_of(client, account, run.session_id, run.run_id)
                if found["status"] in ENDED or found["status"] == "failed":
                    finals[run.run_id] = found
        await asyncio.sleep(0.05)
    return [finals[run.run_id] for run in runs]


async def stored_approval(services: ServiceDeps, run: Waiting) -> Approval:
    """The run's one approval as stored."""
    async with services.uow_factory(write=False) as uow:
        approvals = await uow.approvals.for_run(RunId(uuid.UUID(run.run_id)))
    assert [str(approval.id) for approval in approvals] == [run.approval_id]
    return approvals[0]


def assert_error_code(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text


async def assert_consistent(
    client: httpx.AsyncClient,
    account: Account,
    services: ServiceDeps,
    run: Waiting,
    answers: Answers,
    final: dict[str, object],
) -> str:
    """The stored approval, the run's log and the answers tell one story; which one it is.

    Whoever came first on the run decided the approval: the decision (approved), the cancel
    (expired, "the run was cancelled") or an expiry sweep (expired, "expired"). The others
    answered 409 or found nothing left to do.
    """
    approval = await stored_approval(services, run)
    log: list[Sse] = await events(client, account, run.session_id, run.run_id)
    names = [event.event for event in log]
    context = f"run {run.run_id}: approval {approval.status.value} ({approval.reason}), run "
    context += f"{final['status']}, answers {answers.decide.status_code}/"
    context += f"{answers.cancel.status_code}, log {names}"
    assert [event.id for event in log] == list(range(1, len(log) + 1)), context
    assert final["status"] in ENDED, context
    # Exactly one end, and nothing after it: an executor that lost the run wrote no more.
    ends = [event for event in log if event.event in ("run.finished", "run.failed")]
    assert ends == [log[-1]], context
    resolved = [event for event in log if event.event == "approval.resolved"]
    assert len(resolved) <= 1, context

    if approval.status is ApprovalStatus.APPROVED:
        winner = "decide"
        assert answers.decide.status_code == 200, context
        assert answers.decide.json()["status"] == "approved", context
        assert approval.decided_by == account.user.id, context
        assert [event.data["status"] for event in resolved] == ["approved"], context
    elif approval.status is ApprovalStatus.EXPIRED and approval.reason == CANCELLED_REASON:
        winner = "cancel"
        assert_error_code(answers.decide, 409, "already_decided")
        assert resolved == [], context
        assert "tool.call" not in names, context
        assert final["status"] == "cancelled", context
    elif approval.status is ApprovalStatus.EXPIRED and approval.reason == EXPIRED_REASON:
        winner = "expiry"
        assert_error_code(answers.decide, 409, "already_decided")
        assert [event.data["status"] for event in resolved] == ["expired"], context
        assert "tool.call" not in names, context
    else:
        raise AssertionError(f"the approval was left {approval.status.value}: {context}")

    if final["status"] == "cancelled":
        # The cancel ended the run; whatever resolved the approval before it is logged first.
        assert answers.cancel.status_code == 200, context
        assert answers.cancel.json()["status"] == "cancelled", context
        assert log[-1].data.get("status") == "cancelled", context
        assert all(event.id < log[-1].id for event in resolved), context
    else:
        # The run went on and finished before the cancel came: nothing left to cancel.
        assert winner != "cancel", context
        assert_error_code(answers.cancel, 409, "conflict")
        assert names[-1] == "run.finished", context
    return winner


async def check_outcomes(
    client: httpx.AsyncClient,
    account: Account,
    services: ServiceDeps,
    waiting: list[Waiting],
    answers: list[Answers],
) -> Counter[str]:
    """Every run ended (bounded) and tells a consistent story; how often each side won."""
    try:
        async with asyncio.timeout(SETTLE_BOUND):
            finals = await all_ended(client, account, waiting)
    except TimeoutError:
        raise AssertionError(
            f"not every run ended within {SETTLE_BOUND:g} s after the race (a run stuck?)"
        ) from None
    winners = Counter[str]()
    for run, pair, final in zip(waiting, answers, finals, strict=True):
        winners[await assert_consistent(client, account, services, run, pair, final)] += 1
    return winners


async def test_a_decision_and_a_cancel_at_once_never_deadlock(
    client: httpx.AsyncClient,
    make_account: MakeAccount,
    services: ServiceDeps,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """100 runs at an approval; each gets an approve and a cancel at the same moment. No 5xx;
    either the decision wins (200, and the cancel 200 or 409) or the cancel (200, and the
    decision 409); every run ends, and its approval, log and answers agree."""
    account = await make_account()
    waiting = await waiting_runs(client, account)

    answers, _ = await race(client, account, waiting)

    assert_no_server_errors(answers)
    for pair in answers:
        statuses = (pair.decide.status_code, pair.cancel.status_code)
        assert statuses in {(200, 200), (200, 409), (409, 200)}, statuses
    winners = await check_outcomes(client, account, services, waiting, answers)
    assert set(winners) <= {"decide", "cancel"}, winners
    assert sum(winners.values()) == PAIRS
    assert_no_busy_database(caplog)


async def test_expiry_sweeps_racing_with_decisions_and_cancels_never_deadlock(
    client: httpx.AsyncClient,
    make_account: MakeAccount,
    services: ServiceDeps,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As above, with expiry sweeps (as if the approvals' time had just run out) starting at
    the same moment. The sweeps never fail; each approval is decided once, by whichever came
    first; no request gets a 5xx; every run ends."""
    account = await make_account()
    waiting = await waiting_runs(client, account)
    later = dataclasses.replace(services, clock=Later())

    answers, swept = await race(client, account, waiting, expiry=later)

    assert_no_server_errors(answers)
    failed_sweeps = [outcome for outcome in swept if isinstance(outcome, BaseException)]
    assert not failed_sweeps, f"{len(failed_sweeps)} of {EXPIRERS} sweeps failed: {failed_sweeps!r}"
    winners = await check_outcomes(client, account, services, waiting, answers)
    assert sum(winners.values()) == PAIRS
    # Each approval was expired by one sweep at most: the sweeps' count is the expiry wins.
    assert sum(outcome for outcome in swept if isinstance(outcome, int)) == winners["expiry"]
    assert_no_busy_database(caplog)


async def run_waiting_at_two(services: ServiceDeps, session_id: str) -> tuple[str, list[str]]:
    """A run of the session stopped at two approvals at once (as a model asking for two tool
    calls in one response leaves it); its id and its approvals' ids."""
    now = services.clock.now()
    session = SessionId(uuid.UUID(session_id))
    run = Run(
        id=RunId(services.new_id()),
        session_id=session,
        status=RunStatus.AWAITING_APPROVAL,
        attempt=1,
        error=None,
        created_at=now,
        finished_at=None,
    )
    approvals = [
        Approval(
            id=ApprovalId(services.new_id()),
            run_id=run.id,
            session_id=session,
            tool="write_file",
            arguments={"path": f"{index}.txt", "content": "x"},
            status=ApprovalStatus.PENDING,
            decided_by=None,
            decided_at=None,
            reason=None,
            expires_at=now + timedelta(hours=1),
            created_at=now,
            tool_call_id=f"call_{index}",
        )
        for index in range(2)
    ]
    async with services.uow_factory() as uow:
        await uow.runs.add(run, at=now)
        await uow.messages.add_next(
            message_id=MessageId(services.new_id()),
            session_id=session,
            role=MessageRole.USER,
            content="two at once",
            run_id=run.id,
            at=now,
        )
        for approval in approvals:
            await uow.approvals.add(approval)
        await uow.commit()
    return str(run.id), [str(approval.id) for approval in approvals]


async def test_both_approvals_of_a_run_decided_at_once_requeue_it(
    client: httpx.AsyncClient, make_account: MakeAccount, services: ServiceDeps
) -> None:
    """A run waiting at two approvals gets both decisions at the same moment (100 such runs).
    Both answer 200, and the run is queued again: the later decision, waiting on the run's
    lock, sees the earlier one as decided, never as still pending (which would leave the run
    awaiting_approval with nothing left to decide, stuck for good)."""
    account = await make_account()
    sessions = await asyncio.gather(*(new_session(client, account) for _ in range(PAIRS)))
    runs = [await run_waiting_at_two(services, session_id) for session_id in sessions]
    gate = asyncio.Event()

    async def decide(session_id: str, approval_id: str) -> httpx.Response:
        await gate.wait()
        return await client.post(
            f"/api/v1/sessions/{session_id}/approvals/{approval_id}",
            json={"decision": "reject", "reason": "not now"},
            headers=account.headers,
        )

    tasks = [
        asyncio.create_task(decide(session_id, approval_id))
        for session_id, (_run_id, approval_ids) in zip(sessions, runs, strict=True)
        for approval_id in approval_ids
    ]
    await asyncio.sleep(0)  # every task is at the gate now
    started = time.monotonic()
    try:
        async with asyncio.timeout(RACE_BOUND):
            gate.set()
            answers = await asyncio.gather(*tasks)
    except TimeoutError:
        raise AssertionError(
            f"the {RACE_BOUND:g} s bound ended the race, not the requests"
        ) from None
    assert time.monotonic() - started < RACE_BOUND
    assert Counter(answer.status_code for answer in answers) == {200: 2 * PAIRS}, [
        answer.text for answer in answers if answer.status_code != 200
    ][:3]

    waiting = [
        Waiting(session_id, run_id, approval_ids[0])
        for session_id, (run_id, approval_ids) in zip(sessions, runs, strict=True)
    ]
    try:
        async with asyncio.timeout(SETTLE_BOUND):
            finals = await all_ended(client, account, waiting)
    except TimeoutError:
        stuck = [
            run.run_id
            for run in waiting
            if (await run_of(client, account, run.session_id, run.run_id))["status"]
            == "awaiting_approval"
        ]
        raise AssertionError(
            f"{len(stuck)} of {PAIRS} runs were left awaiting_approval with both approvals decided"
        ) from None
    assert {final["status"] for final in finals} == {"succeeded"}
    for run in waiting:
        log = await events(client, account, run.session_id, run.run_id)
        assert [event.event for event in log].count("approval.resolved") == 2
