"""``/sessions/{id}/messages``: a conversation's history, and sending a message (a run)."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response, status
from sse_starlette import EventSourceResponse

from countersign.api.deps import AuthenticatedRoute, CurrentUser, IdempotencyKey, Services
from countersign.api.routes import API_PREFIX
from countersign.api.routes.runs import EVENT_STREAM
from countersign.api.routes.sessions import NOT_FOUND, Cursor, Limit
from countersign.api.schemas import (
    API_ERRORS,
    ErrorBody,
    MessageCreate,
    MessageOut,
    Page,
    RunOut,
    RunStartedOut,
)
from countersign.api.sse import run_event_stream
from countersign.domain.models import SessionId
from countersign.services import runs, sessions
from countersign.services.idempotency import IdempotentRequest

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
    order: Annotated[
        Literal["asc", "desc"],
        Query(
            description="`asc` (default): oldest first; `desc`: newest first, for paging "
            "a long history upward from its end."
        ),
    ] = "asc",
) -> Page[MessageOut]:
    """The session's messages, oldest first (`order=desc`: newest first)."""
    page = await sessions.list_messages(
        services,
        actor=user.id,
        session_id=SessionId(session_id),
        cursor=cursor,
        limit=limit,
        newest_first=order == "desc",
    )
    return Page[MessageOut](
        items=[MessageOut.model_validate(item) for item in page.items],
        next_cursor=page.next_cursor,
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=RunStartedOut,
    responses={
        **NOT_FOUND,
        **EVENT_STREAM,
        409: {"model": ErrorBody, "description": "The session has an active run"},
    },
)
async def send_message(
    session_id: uuid.UUID,
    body: MessageCreate,
    user: CurrentUser,
    services: Services,
    idempotency_key: IdempotencyKey,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    """Send a message: it starts a run. With `Accept: text/event-stream` the answer is the run's
    event stream; otherwise 202 with the stored message and the queued run."""
    request = (
        None
        if idempotency_key is None
        else IdempotentRequest.of(
            idempotency_key,
            scope=f"POST /sessions/{session_id}/messages",
            body=body.model_dump(mode="json"),
        )
    )
    started = await runs.start_run(
        services,
        actor=user.id,
        session_id=SessionId(session_id),
        content=body.content,
        idempotency=request,
    )
    # The run is named before the first event, so a client whose stream breaks early can
    # resume it (GET .../events with Last-Event-ID).
    location = f"/api/v1/sessions/{started.run.session_id}/runs/{started.run.id}"
    if accept is not None and "text/event-stream" in accept:
        stream: EventSourceResponse = run_event_stream(
            services, started.run.id, new_run=not started.replayed
        )
        stream.headers["Location"] = location
        return stream
    out = RunStartedOut(
        message=MessageOut.model_validate(started.message),
        run=RunOut.model_validate(started.run),
    )
    return Response(
        out.model_dump_json(),
        status_code=status.HTTP_202_ACCEPTED,
        media_type="application/json",
        headers={"Location": location},
    )
