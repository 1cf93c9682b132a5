"""``/sessions``: create, list, read, edit and delete conversations."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response, status

from countersign.api.deps import AuthenticatedRoute, CurrentUser, IdempotencyKey, Services
from countersign.api.routes import API_PREFIX
from countersign.api.schemas import (
    API_ERRORS,
    ErrorBody,
    Page,
    SessionCreate,
    SessionOut,
    SessionUpdate,
    Text,
)
from countersign.domain.models import AgentId, SessionId
from countersign.services import sessions
from countersign.services.idempotency import IdempotentRequest

router = APIRouter(
    prefix=f"{API_PREFIX}/sessions",
    tags=["sessions"],
    responses=API_ERRORS,
    route_class=AuthenticatedRoute,
)

Cursor = Annotated[
    str | None, Query(max_length=200, description="`next_cursor` from the previous page.")
]
Limit = Annotated[int, Query(ge=1, le=100, description="Items per page.")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "Missing, or not yours"}
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={**NOT_FOUND, 422: {"model": ErrorBody}},
)
async def create_session(
    body: SessionCreate, user: CurrentUser, services: Services, idempotency_key: IdempotencyKey
) -> SessionOut:
    """Open a conversation. Without `agent_id` it uses the server's default agent."""
    request = (
        None
        if idempotency_key is None
        else IdempotentRequest.of(
            idempotency_key, scope="POST /sessions", body=body.model_dump(mode="json")
        )
    )
    session = await sessions.create_session(
        services,
        actor=user.id,
        agent_id=None if body.agent_id is None else AgentId(body.agent_id),
        title=body.title,
        idempotency=request,
    )
    return SessionOut.model_validate(session)


TitleSearch = Annotated[
    Text | None,
    Query(max_length=200, description="Only sessions whose title contains this (any case)."),
]


@router.get("")
async def list_sessions(
    user: CurrentUser,
    services: Services,
    cursor: Cursor = None,
    limit: Limit = 20,
    q: TitleSearch = None,
) -> Page[SessionOut]:
    """Your sessions, newest first (with `q`, those whose title contains it)."""
    page = await sessions.list_sessions(
        services, actor=user.id, cursor=cursor, limit=limit, title_contains=q
    )
    return Page[SessionOut](
        items=[SessionOut.model_validate(item) for item in page.items],
        next_cursor=page.next_cursor,
    )


@router.get("/{session_id}", responses=NOT_FOUND)
async def get_session(session_id: uuid.UUID, user: CurrentUser, services: Services) -> SessionOut:
    """One session."""
    session = await sessions.get_session(services, actor=user.id, session_id=SessionId(session_id))
    return SessionOut.model_validate(session)


@router.patch("/{session_id}", responses=NOT_FOUND)
async def update_session(
    session_id: uuid.UUID, body: SessionUpdate, user: CurrentUser, services: Services
) -> SessionOut:
    """Rename or archive a session."""
    session = await sessions.update_session(
        services,
        actor=user.id,
        session_id=SessionId(session_id),
        title=body.title,
        status=body.status,
    )
    return SessionOut.model_validate(session)


@router.delete("/{session_id}", status_code=status.HTTP_204_NO_CONTENT, responses=NOT_FOUND)
async def delete_session(session_id: uuid.UUID, user: CurrentUser, services: Services) -> Response:
    """Delete a session and everything in it."""
    await sessions.delete_session(services, actor=user.id, session_id=SessionId(session_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)
