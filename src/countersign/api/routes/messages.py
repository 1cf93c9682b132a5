"""``/sessions/{id}/messages``: a conversation's history."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from countersign.api.deps import AuthenticatedRoute, CurrentUser, Services
from countersign.api.routes import API_PREFIX
from countersign.api.routes.sessions import NOT_FOUND, Cursor, Limit
from countersign.api.schemas import API_ERRORS, MessageOut, Page
from countersign.domain.models import SessionId
from countersign.services import sessions

router = APIRouter(
    prefix=f"{API_PREFIX}/sessions/{{session_id}}/messages",
    tags=["messages"],
    responses=API_ERRORS,
    route_class=AuthenticatedRoute,
)


@router.get("", responses=NOT_FOUND)
async def list_messages(
    session_id: uuid.UUID,
    user: CurrentUser,
    services: Services,
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Page[MessageOut]:
    """The session's messages, oldest first."""
    page = await sessions.list_messages(
        services, actor=user.id, session_id=SessionId(session_id), cursor=cursor, limit=limit
    )
    return Page[MessageOut](
        items=[MessageOut.model_validate(item) for item in page.items],
        next_cursor=page.next_cursor,
    )
