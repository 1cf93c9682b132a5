"""``/sessions/{id}/pending-approvals`` and ``/sessions/{id}/approvals/{id}``: tool calls that
wait for a person, and deciding them."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from countersign.api.deps import AuthenticatedRoute, CurrentUser, IdempotencyKey, Services
from countersign.api.routes import API_PREFIX
from countersign.api.routes.sessions import NOT_FOUND, Cursor, Limit
from countersign.api.schemas import API_ERRORS, ApprovalDecision, ApprovalOut, ErrorBody, Page
from countersign.domain.models import ApprovalId, ApprovalStatus, SessionId
from countersign.services import approvals, sessions
from countersign.services.idempotency import IdempotentRequest

router = APIRouter(
    prefix=f"{API_PREFIX}/sessions/{{session_id}}",
    tags=["approvals"],
    responses=API_ERRORS,
    route_class=AuthenticatedRoute,
)


inbox = APIRouter(
    prefix=f"{API_PREFIX}/approvals",
    tags=["approvals"],
    responses=API_ERRORS,
    route_class=AuthenticatedRoute,
)


@inbox.get("")
async def list_approvals(
    user: CurrentUser,
    services: Services,
    status: ApprovalStatus | None = None,
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Page[ApprovalOut]:
    """Your approvals across all your sessions, oldest first (`status=pending`: those you can
    still decide). Each names its `session_id`."""
    page = await approvals.list_approvals(
        services, actor=user.id, status=status, cursor=cursor, limit=limit
    )
    return Page[ApprovalOut](
        items=[ApprovalOut.model_validate(item) for item in page.items],
        next_cursor=page.next_cursor,
    )


@router.get("/pending-approvals", responses=NOT_FOUND)
async def list_pending_approvals(
    session_id: uuid.UUID,
    user: CurrentUser,
    services: Services,
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Page[ApprovalOut]:
    """Your session's pending approvals (maybe none); 404 if the session is missing or not yours."""
    page = await sessions.list_pending_approvals(
        services, actor=user.id, session_id=SessionId(session_id), cursor=cursor, limit=limit
    )
    return Page[ApprovalOut](
        items=[ApprovalOut.model_validate(item) for item in page.items],
        next_cursor=page.next_cursor,
    )


@router.get("/approvals/{approval_id}", responses=NOT_FOUND)
async def get_approval(
    session_id: uuid.UUID, approval_id: uuid.UUID, user: CurrentUser, services: Services
) -> ApprovalOut:
    """One approval of your session, pending or decided (who decided, when, why); 404 if it
    is missing or not yours."""
    found = await approvals.get_approval(
        services,
        actor=user.id,
        session_id=SessionId(session_id),
        approval_id=ApprovalId(approval_id),
    )
    return ApprovalOut.model_validate(found)


@router.post(
    "/approvals/{approval_id}",
    responses={**NOT_FOUND, 409: {"model": ErrorBody, "description": "Already decided"}},
)
async def decide_approval(
    session_id: uuid.UUID,
    approval_id: uuid.UUID,
    body: ApprovalDecision,
    user: CurrentUser,
    services: Services,
    idempotency_key: IdempotencyKey,
) -> ApprovalOut:
    """Approve (optionally with edited `arguments`) or reject a pending tool call; the run
    resumes. 409 if it was already decided or has expired. With an `Idempotency-Key`, a
    retry of a decision that was made answers 200 with that decision."""
    request = (
        None
        if idempotency_key is None
        else IdempotentRequest.of(
            idempotency_key,
            scope=f"POST /sessions/{session_id}/approvals/{approval_id}",
            body=body.model_dump(mode="json"),
        )
    )
    decided = await approvals.decide_approval(
        services,
        actor=user.id,
        session_id=SessionId(session_id),
        approval_id=ApprovalId(approval_id),
        decision=body.decision,
        reason=body.reason,
        arguments=body.arguments,
        idempotency=request,
    )
    return ApprovalOut.model_validate(decided)
