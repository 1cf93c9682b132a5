"""``/sessions/{id}/pending-approvals`` and ``/sessions/{id}/approvals/{id}``: tool calls that
wait for a person, and deciding them."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from countersign.api.deps import AuthenticatedRoute, CurrentUser, Services
from countersign.api.routes import API_PREFIX
from countersign.api.routes.sessions import NOT_FOUND, Cursor, Limit
from countersign.api.schemas import API_ERRORS, ApprovalDecision, ApprovalOut, ErrorBody, Page
from countersign.domain.models import ApprovalId, SessionId
from countersign.services import approvals, sessions

router = APIRouter(
    prefix=f"{API_PREFIX}/sessions/{{session_id}}",
    tags=["approvals"],
    responses=API_ERRORS,
    route_class=AuthenticatedRoute,
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
) -> ApprovalOut:
    """Approve (optionally with edited `arguments`) or reject a pending tool call; the run
    resumes. 409 if it was already decided or has expired."""
    decided = await approvals.decide_approval(
        services,
        actor=user.id,
        session_id=SessionId(session_id),
        approval_id=ApprovalId(approval_id),
        decision=body.decision,
        reason=body.reason,
        arguments=body.arguments,
    )
    return ApprovalOut.model_validate(decided)
