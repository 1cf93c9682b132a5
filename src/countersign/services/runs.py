"""Runs: a user message starts one; read it, read its events, cancel it.

Starting a run only writes (the message and a ``queued`` run, in one unit of work) and wakes
the executor; the turn itself happens in ``services/executor.py``, never in the request.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import datetime

from countersign.db.uow import UnitOfWork
from countersign.domain.errors import Conflict, InvalidInput, NotFound, RunActive, Unavailable
from countersign.domain.events import EventType, NewEvent, RunEvent
from countersign.domain.models import (
    JSONObject,
    Lease,
    Message,
    MessageId,
    MessageRole,
    Run,
    RunId,
    RunStatus,
    SessionId,
    TurnContext,
    UserId,
)
from countersign.services import ServiceDeps
from countersign.services.idempotency import IdempotentRequest, remember_response, stored_response
from countersign.services.sessions import SESSION_NOT_FOUND

RUN_NOT_FOUND = "run not found"
CONTENT_MAX_LENGTH = 100_000
EVENTS_PAGE = 500


@dataclass(frozen=True, slots=True)
class StartedRun:
    """The stored user message and the queued run it started."""

    message: Message
    run: Run
    replayed: bool = False
    """An earlier request's start, answered again for the same Idempotency-Key."""
    handed_off: bool = False
    """Claimed for this process's executor at once (no executor needs waking)."""


async def start_run(
    deps: ServiceDeps,
    *,
    actor: UserId,
    session_id: SessionId,
    content: str,
    idempotency: IdempotentRequest | None = None,
) -> StartedRun:
    """Store the user's message and a queued run; RunActive if the session has one going."""
    if not content.strip():
        raise InvalidInput("content must not be empty")
    if len(content) > CONTENT_MAX_LENGTH:
        raise InvalidInput(f"content is longer than {CONTENT_MAX_LENGTH} characters")
    for attempt in (1, 2):
        try:
            started = await _start_run(
                deps, actor=actor, session_id=session_id, content=content, idempotency=idempotency
            )
            break
        except RunActive:
            raise
        except Conflict:
            # A concurrent message won the race for the session's one active run (or for the
            # Idempotency-Key): answer as if this request had come second, which it did.
            async with deps.uow_factory(write=False) as uow:
                if idempotency is not None:
                    response = await stored_response(uow, user_id=actor, request=idempotency)
                    if response is not None:
                        return started_from_json(response)
                await _refuse_if_active(uow, session_id)
            if attempt == 2:
                raise
            # No run is going: this start met the end of the session's previous turn, whose
            # reply took the message number it had picked (on PostgreSQL the start is one
            # statement, and its one snapshot predates that reply). It wrote nothing: again.
    if not started.replayed:
        deps.broker.data_changed()
    if not started.handed_off and not started.replayed:
        deps.broker.work_available()
    return started


async def _start_run(
    deps: ServiceDeps,
    *,
    actor: UserId,
    session_id: SessionId,
    content: str,
    idempotency: IdempotentRequest | None,
) -> StartedRun:
    executor = deps.executor
    lease: Lease | None = None
    handed: tuple[Run, TurnContext] | None = None
    pending_hand_off: tuple[Run, TurnContext] | None = None
    # Whether the one statement of a start was sent and its answer has not come back: if it
    # is cut off now, the run may be stored (claimed by us) or not.
    unanswered: Run | None = None
    outcome_unknown = False
    lease_until: datetime | None = None
    try:
        # Without an Idempotency-Key the start is one statement (PostgreSQL: one round trip).
        async with deps.uow_factory(one_statement=idempotency is None) as uow:
            if idempotency is not None:
                response = await stored_response(uow, user_id=actor, request=idempotency)
                if response is not None:
                    return started_from_json(response)
            now = deps.clock.now()
            # With a free slot in this process's executor the run is claimed right here, in
            # this transaction, and handed over in memory: no claim, no read-back, no poll.
            lease = None if executor is None else executor.reserve(now=now)
            lease_until = None if executor is None or lease is None else executor.lease_until(now)
            run = Run(
                id=RunId(deps.new_id()),
                session_id=session_id,
                status=RunStatus.QUEUED if lease is None else RunStatus.RUNNING,
                attempt=0 if lease is None else lease.attempt,
                error=None,
                created_at=now,
                finished_at=None,
            )
            # The session (and what the turn needs if this process's executor takes it at
            # once), the run and the message. No look for
            # an active run first: the unique index on a session's active run refuses the
            # insert (Conflict), and start_run then says which run is active.
            unanswered = run if idempotency is None else None
            found = await uow.runs.start(
                run,
                owner=actor,
                prompt=content,
                message_id=MessageId(deps.new_id()),
                lease_owner=None if lease is None else lease.owner,
                lease_until=lease_until,
            )
            unanswered = None
            if found is None:
                raise NotFound(SESSION_NOT_FOUND)
            _session, start, message = found
            context = None if lease is None else start
            started = StartedRun(message=message, run=run, handed_off=lease is not None)
            if idempotency is not None:
                await remember_response(
                    uow, deps, user_id=actor, request=idempotency, response=started_to_json(started)
                )
            if context is not None:
                pending_hand_off = (run, context)
            await uow.commit()
            handed = pending_hand_off
    except (Unavailable, asyncio.CancelledError):
        # The COMMIT's outcome is unknown (the connection went, or this request was cancelled
        # while it ran): hand the run over as if it committed. If it did not, the turn's
        # first write is fenced by a lease that never was, and stops it.
        handed = pending_hand_off
        outcome_unknown = unanswered is not None
        raise
    except Conflict:
        raise  # refused by the database: nothing was written
    except Exception:
        # Anything else after the start was sent (on SQLite its script commits before its
        # rows are read back): stored or not, it is found out as above.
        outcome_unknown = unanswered is not None
        raise
    finally:
        # Whatever happens after the commit (even this request being cancelled), a run
        # committed as ours is handed over; a reserved slot is never lost.
        if executor is not None and lease is not None:
            if handed is not None:
                executor.hand_off(handed[0], lease=lease, context=handed[1])
            elif outcome_unknown and unanswered is not None and lease_until is not None:
                executor.adopt(unanswered, lease=lease, until=lease_until)
            else:
                executor.unreserve()
    return started


async def _refuse_if_active(uow: UnitOfWork, session_id: SessionId) -> None:
    active = await uow.runs.get_active(session_id)
    if active is None:
        return
    pending = await uow.approvals.pending_of_run(active.id)
    detail: JSONObject = {
        "run_id": str(active.id),
        "status": active.status.value,
        "approval_id": None if pending is None else str(pending.id),
    }
    message = f"the session already has an active run ({active.id}, {active.status.value})"
    if pending is not None:
        message += f" waiting for approval {pending.id}"
    raise RunActive(message, detail=detail)


async def get_run(deps: ServiceDeps, *, actor: UserId, session_id: SessionId, run_id: RunId) -> Run:
    """One run of the actor's session."""
    async with deps.uow_factory(write=False, transaction=False) as uow:  # one statement
        return await _owned_run(uow, actor=actor, session_id=session_id, run_id=run_id)


async def _owned_run(
    uow: UnitOfWork, *, actor: UserId, session_id: SessionId, run_id: RunId
) -> Run:
    """The run, read with its session's owner in one statement; NotFound of the session
    (missing or someone else's) or else of the run, as two reads would answer."""
    run = await uow.runs.get_owned(run_id, session_id=session_id, owner=actor)
    if run is None:
        if await uow.sessions.get_owned(session_id, owner=actor) is None:
            raise NotFound(SESSION_NOT_FOUND)
        raise NotFound(RUN_NOT_FOUND)
    return run


async def read_events(
    deps: ServiceDeps, *, run_id: RunId, after_seq: int, limit: int = EVENTS_PAGE
) -> tuple[list[RunEvent], RunStatus]:
    """Events of a run after ``after_seq`` (already access-checked) and the run's status.

    No transaction: the events read may go past the status read, which only means the
    stream gets them sooner.
    """
    async with deps.uow_factory(write=False, transaction=False) as uow:
        found = await uow.runs.status_and_seq(run_id)
        if found is None:
            raise NotFound(RUN_NOT_FOUND)
        status, last_seq = found
        if last_seq <= after_seq:
            return [], status
        return await uow.runs.events(run_id, after_seq=after_seq, limit=limit), status


async def cancel_run(
    deps: ServiceDeps, *, actor: UserId, session_id: SessionId, run_id: RunId
) -> Run:
    """Cancel a run that has not ended; Conflict if it has."""
    async with deps.uow_factory() as uow:
        run = await _owned_run(uow, actor=actor, session_id=session_id, run_id=run_id)
        if not run.status.is_active:
            raise Conflict(f"run {run.id} has already ended ({run.status.value})")
        now = deps.clock.now()
        reason = "cancelled by the user"
        # The run first (this UPDATE locks it), then its approvals: the one lock order that
        # decisions and expiries take too (RunRepository.lock), so none of them deadlock.
        await uow.runs.append(
            run.id,
            [NewEvent(EventType.RUN_FAILED, {"reason": reason, "status": "cancelled"})],
            at=now,
            expect=(RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.AWAITING_APPROVAL),
            values={
                "status": RunStatus.CANCELLED.value,
                "error": reason,
                "finished_at": now,
                "owner": None,
                "lease_expires_at": None,
            },
        )
        await uow.approvals.expire_pending_of_run(run.id, reason="the run was cancelled", at=now)
        # The session's history goes on from its last successful turn.
        await uow.history.discard_run(run.id)
        cancelled = await uow.runs.get(run.id, session_id=session_id)
        await uow.commit()
    deps.broker.run_changed(run.id)
    deps.broker.data_changed()
    assert cancelled is not None
    return cancelled


def started_to_json(started: StartedRun) -> JSONObject:
    """The stored form of a start, for Idempotency-Key replays."""
    message, run = started.message, started.run
    return {
        "message": {
            "id": str(message.id),
            "session_id": str(message.session_id),
            "seq": message.seq,
            "content": message.content,
            "created_at": message.created_at.isoformat(),
        },
        "run": {
            "id": str(run.id),
            "created_at": run.created_at.isoformat(),
            "status": run.status.value,
            "attempt": run.attempt,
        },
    }


def started_from_json(data: JSONObject) -> StartedRun:
    """A start back from its stored form (the run as it was then: queued, or running when
    this process's executor took it at once)."""
    message, run = data["message"], data["run"]
    run_id = RunId(uuid.UUID(run["id"]))
    session_id = SessionId(uuid.UUID(message["session_id"]))
    return StartedRun(
        message=Message(
            id=MessageId(uuid.UUID(message["id"])),
            session_id=session_id,
            seq=message["seq"],
            role=MessageRole.USER,
            content=message["content"],
            run_id=run_id,
            created_at=datetime.fromisoformat(message["created_at"]),
        ),
        run=Run(
            id=run_id,
            session_id=session_id,
            status=RunStatus(run.get("status", RunStatus.QUEUED.value)),
            attempt=int(run.get("attempt", 0)),
            error=None,
            created_at=datetime.fromisoformat(run["created_at"]),
            finished_at=None,
        ),
        replayed=True,
    )
