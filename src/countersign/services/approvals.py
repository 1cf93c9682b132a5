"""Approvals: a person decides a pending tool call, or its time runs out.

The decision and the run's re-queueing are one transaction, so nothing waits in memory for a
person: any server process can then claim the run and resume it. Like a cancel, a decision or an
expiry locks the run first and its approvals after (``RunRepository.lock``), so that they queue
behind each other on PostgreSQL instead of deadlocking.
"""

from __future__ import annotations

import logging

from countersign.agent.tools import validate_tool_arguments
from countersign.db.uow import UnitOfWork
from countersign.domain.errors import NotFound
from countersign.domain.events import EventType, NewEvent
from countersign.domain.models import (
    Approval,
    ApprovalId,
    ApprovalStatus,
    Decision,
    JSONObject,
    RunStatus,
    SessionId,
    UserId,
)
from countersign.services import ServiceDeps, TakenRun
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
) -> Approval:
    """Record a person's decision on a pending tool call and re-queue its run.

    With a free slot in this process's executor, the re-queued run is claimed for it in the
    decision's own transaction and carried out once that commits (as a new run is).
    """
    taken: TakenRun | None = None
    committed = False
    try:
        async with deps.uow_factory() as uow:
            session = await uow.sessions.get_owned(session_id, owner=actor)
            if session is None:
                raise NotFound(SESSION_NOT_FOUND)
            pending = await _get_under_run_lock(uow, approval_id, session_id=session.id)
            if arguments is not None:
                arguments = validate_tool_arguments(pending.tool, arguments)
            now = deps.clock.now()
            decided = pending.decide(decision, by=actor, at=now, reason=reason, arguments=arguments)
            await uow.approvals.save_decision(decided)
            requeued = await _resolve(uow, deps, decided)
            if requeued and deps.executor is not None:
                taken = await deps.executor.take(uow, decided.run_id, now=now)
            await uow.commit()
            committed = True
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
    if requeued and taken is None:
        deps.broker.work_available()
    return decided


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
        deps.broker.work_available()
    return expired


async def _get_under_run_lock(
    uow: UnitOfWork, approval_id: ApprovalId, *, session_id: SessionId
) -> Approval:
    """The approval as it is once its run's row is locked; NotFound if there is none.

    The run first, then its approval: the one lock order (a cancel takes the same), so a
    decision racing a cancel or an expiry waits for it instead of deadlocking with it.
    """
    found = await uow.approvals.get(approval_id, session_id=session_id)
    if found is not None and found.status is ApprovalStatus.PENDING:
        await uow.runs.lock(found.run_id)
        # Read again: a cancel, an expiry or another decision may have committed meanwhile.
        found = await uow.approvals.get(approval_id, session_id=session_id)
    if found is None:
        raise NotFound(APPROVAL_NOT_FOUND)
    return found


async def _resolve(uow: UnitOfWork, deps: ServiceDeps, decided: Approval) -> bool:
    """Log the decision on the run and re-queue the run once nothing else waits (True)."""
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
                    "arguments": decided.arguments,
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
