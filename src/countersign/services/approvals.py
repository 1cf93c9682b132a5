"""Approvals: a person decides a pending tool call, or its time runs out.

The decision and the run's re-queueing are one transaction, so nothing waits in memory for a
person: any server process can then claim the run and resume it. Like a cancel, a decision or an
expiry locks the run first and its approvals after (``RunRepository.lock``), so that they queue
behind each other on PostgreSQL instead of deadlocking.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime

from countersign.agent.tools import validate_tool_arguments
from countersign.db.uow import UnitOfWork
from countersign.domain.errors import Conflict, NotFound, Unavailable
from countersign.domain.events import EventType, NewEvent
from countersign.domain.models import (
    Approval,
    ApprovalId,
    ApprovalStatus,
    Decision,
    JSONObject,
    Page,
    RunId,
    RunStatus,
    SessionId,
    UserId,
)
from countersign.services import ServiceDeps, TakenRun, page_of, uuid_cursor
from countersign.services.feed import approval_data
from countersign.services.idempotency import (
    IdempotentRequest,
    remember_response,
    stored_response,
    winner_response,
)
from countersign.services.sessions import SESSION_NOT_FOUND

APPROVAL_NOT_FOUND = "approval not found"
REASON_MAX_LENGTH = 2_000
EXPIRED_REASON = "expired"

audit_log = logging.getLogger("countersign.audit")


async def decide_approval(
    deps: ServiceDeps,
    *,
    actor: UserId,
    session_id: SessionId,
    approval_id: ApprovalId,
    decision: Decision,
    reason: str | None = None,
    arguments: JSONObject | None = None,
    idempotency: IdempotentRequest | None = None,
) -> Approval:
    """Record a person's decision on a pending tool call and re-queue its run.

    With an Idempotency-Key, a retry of a decision that was made answers with that decision
    (not 409), and the same key with another body is refused.

    With a free slot in this process's executor, the re-queued run is claimed for it in the
    decision's own transaction and carried out once that commits (as a new run is).
    """
    try:
        return await _decide(
            deps,
            actor=actor,
            session_id=session_id,
            approval_id=approval_id,
            decision=decision,
            reason=reason,
            arguments=arguments,
            idempotency=idempotency,
        )
    except Conflict:
        # A concurrent retry with the same key may have won: answer with its decision.
        response = await winner_response(deps, user_id=actor, request=idempotency)
        if response is None:
            raise
        return approval_from_json(response)


async def _decide(
    deps: ServiceDeps,
    *,
    actor: UserId,
    session_id: SessionId,
    approval_id: ApprovalId,
    decision: Decision,
    reason: str | None,
    arguments: JSONObject | None,
    idempotency: IdempotentRequest | None,
) -> Approval:
    taken: TakenRun | None = None
    committing = committed = False
    try:
        async with deps.uow_factory() as uow:
            if idempotency is not None:
                response = await stored_response(uow, user_id=actor, request=idempotency)
                if response is not None:
                    return approval_from_json(response)
            pending = await _get_under_run_lock(uow, approval_id, session_id, actor=actor)
            if arguments is not None:
                arguments = validate_tool_arguments(pending.tool, arguments)
            now = deps.clock.now()
            decided = pending.decide(decision, by=actor, at=now, reason=reason, arguments=arguments)
            waiting = await uow.approvals.save_decision(decided)
            requeued = await _resolve(uow, deps, decided, waiting=waiting)
            if idempotency is not None:
                await remember_response(
                    uow,
                    deps,
                    user_id=actor,
                    request=idempotency,
                    response=approval_to_json(decided),
                )
            if requeued and deps.executor is not None:
                taken = await deps.executor.take(uow, decided.run_id, now=now)
            committing = True
            await uow.commit()
            committed = True
    except (Unavailable, asyncio.CancelledError):
        # The COMMIT's outcome is unknown (the connection went, or this request was cancelled
        # while it ran): carry the run out as if it committed. If it did not, the turn's first
        # write is fenced by the lease that never was, and stops it before any tool or model.
        committed = committing
        raise
    finally:
        # A run committed as ours is carried out whatever happens next (even this request
        # being cancelled); a slot reserved for a transaction that did not commit is freed.
        if taken is not None:
            if committed:
                taken.start()
            else:
                taken.drop()
    audit_log.info(
        "user %s decided approval %s: %s",
        actor,
        decided.id,
        decided.status.value,
        extra={
            "event": "approval_decided",
            "user_id": str(actor),
            "approval_id": str(decided.id),
            "run_id": str(decided.run_id),
            "decision": decided.status.value,
        },
    )
    deps.broker.run_changed(decided.run_id)
    deps.broker.data_changed()
    if requeued and taken is None:
        deps.broker.work_available()
    return decided


async def get_approval(
    deps: ServiceDeps, *, actor: UserId, session_id: SessionId, approval_id: ApprovalId
) -> Approval:
    """One approval of the actor's session, whatever its state; NotFound otherwise."""
    async with deps.uow_factory(write=False) as uow:
        if await uow.sessions.get_owned(session_id, owner=actor) is None:
            raise NotFound(SESSION_NOT_FOUND)
        found = await uow.approvals.get(approval_id, session_id=session_id)
    if found is None:
        raise NotFound(APPROVAL_NOT_FOUND)
    return found


async def list_approvals(
    deps: ServiceDeps,
    *,
    actor: UserId,
    status: ApprovalStatus | None,
    cursor: str | None,
    limit: int,
) -> Page[Approval]:
    """The actor's approvals across all sessions, oldest first; ``pending`` ones are those a
    person can still decide (not past their time)."""
    after = uuid_cursor(cursor)
    async with deps.uow_factory(write=False, transaction=False) as uow:  # one statement
        found = await uow.approvals.list_owned(
            owner=actor, status=status, now=deps.clock.now(), after=after, limit=limit + 1
        )
    return page_of(found, limit, lambda approval: str(approval.id))


def approval_to_json(approval: Approval) -> JSONObject:
    """An approval as JSON values (for stored idempotent responses)."""
    data = approval_data(approval)
    del data["approval_id"]
    return {
        **data,
        "created_at": approval.created_at.isoformat(),
        "tool_call_id": approval.tool_call_id,
    }


def approval_from_json(data: JSONObject) -> Approval:
    """The approval stored by ``approval_to_json``."""

    def at(value: str | None) -> datetime | None:
        return None if value is None else datetime.fromisoformat(value)

    return Approval(
        id=ApprovalId(uuid.UUID(data["id"])),
        run_id=RunId(uuid.UUID(data["run_id"])),
        session_id=SessionId(uuid.UUID(data["session_id"])),
        tool=data["tool"],
        arguments=data["arguments"],
        decided_arguments=data["decided_arguments"],
        asked_because=data["asked_because"],
        status=ApprovalStatus(data["status"]),
        decided_by=None if data["decided_by"] is None else UserId(uuid.UUID(data["decided_by"])),
        decided_at=at(data["decided_at"]),
        reason=data["reason"],
        expires_at=datetime.fromisoformat(data["expires_at"]),
        created_at=datetime.fromisoformat(data["created_at"]),
        tool_call_id=data["tool_call_id"],
    )


async def expire_approvals(deps: ServiceDeps, *, limit: int = 100) -> int:
    """Expire pending approvals whose time ran out; their runs go on as if rejected."""
    now = deps.clock.now()
    async with deps.uow_factory(write=False) as uow:
        due = await uow.approvals.expired(now=now, limit=limit)
    expired = 0
    for approval in due:
        async with deps.uow_factory() as uow:
            await uow.runs.lock(approval.run_id)  # the run first, then its approval
            if not await uow.approvals.expire(approval.id, reason=EXPIRED_REASON, at=now):
                continue  # decided in the meantime
            decided = await uow.approvals.get(approval.id, session_id=approval.session_id)
            assert decided is not None
            await _resolve(uow, deps, decided)
            await uow.commit()
        expired += 1
        deps.broker.run_changed(approval.run_id)
    if expired:
        deps.broker.data_changed()
        deps.broker.work_available()
    return expired


async def _get_under_run_lock(
    uow: UnitOfWork, approval_id: ApprovalId, session_id: SessionId, *, actor: UserId
) -> Approval:
    """The approval of the actor's session as it is once its run's row is locked; NotFound
    (of the session, else of the approval) if there is none.

    The run first, then its approval: the one lock order (a cancel takes the same), so a
    decision racing a cancel or an expiry waits for it instead of deadlocking with it.
    """
    found = None
    if await uow.approvals.lock_run_of(approval_id, session_id=session_id, owner=actor):
        # Read after the lock: a cancel, an expiry or another decision may have committed.
        found = await uow.approvals.get(approval_id, session_id=session_id)
    if found is None:
        if await uow.sessions.get_owned(session_id, owner=actor) is None:
            raise NotFound(SESSION_NOT_FOUND)
        raise NotFound(APPROVAL_NOT_FOUND)
    return found


async def _resolve(
    uow: UnitOfWork, deps: ServiceDeps, decided: Approval, *, waiting: int | None = None
) -> bool:
    """Log the decision on the run and re-queue the run once nothing else waits (True).
    ``waiting``: how many of the run's other approvals still wait, if known."""
    if waiting is None:
        waiting = await uow.approvals.count_pending(decided.run_id)
    await uow.runs.append(
        decided.run_id,
        [
            NewEvent(
                EventType.APPROVAL_RESOLVED,
                {
                    "approval_id": str(decided.id),
                    "tool": decided.tool,
                    "status": decided.status.value,
                    "arguments": decided.arguments_to_use,
                    "reason": decided.reason,
                    "decided_by": None if decided.decided_by is None else str(decided.decided_by),
                },
            )
        ],
        at=deps.clock.now(),
        expect=(RunStatus.AWAITING_APPROVAL,),
        values=None if waiting else {"status": RunStatus.QUEUED.value},
    )
    return not waiting
