"""``/sessions/{id}/runs/{run_id}``: one run, its event stream, and cancelling it."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header
from sse_starlette import EventSourceResponse

from countersign.api.deps import AuthenticatedRoute, CurrentUser, Services
from countersign.api.routes import API_PREFIX
from countersign.api.routes.sessions import NOT_FOUND
from countersign.api.schemas import API_ERRORS, ErrorBody, RunOut
from countersign.api.sse import run_event_stream
from countersign.domain.errors import InvalidInput
from countersign.domain.events import EventType
from countersign.domain.models import RunId, SessionId
from countersign.services import runs

router = APIRouter(
    prefix=f"{API_PREFIX}/sessions/{{session_id}}/runs/{{run_id}}",
    tags=["runs"],
    responses=API_ERRORS,
    route_class=AuthenticatedRoute,
)


def event_stream(events: list[str], description: str) -> dict[int | str, dict[str, Any]]:
    """An SSE response: the schema describes one event (its ``event:``, ``data:`` and
    ``id:`` lines), as Server-Sent Events are read one at a time."""
    one_event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"type": "string", "enum": events},
            "data": {"type": "string", "contentMediaType": "application/json"},
            "id": {"type": "string"},
        },
    }
    return {
        200: {"content": {"text/event-stream": {"schema": one_event}}, "description": description}
    }


EVENT_STREAM = event_stream(
    [event.value for event in EventType],
    "Server-Sent Events: `id:` is the event seq, `event:` its type, `data:` JSON with "
    "`run_id` and `seq`.",
)


@router.get("", responses=NOT_FOUND)
async def get_run(
    session_id: uuid.UUID, run_id: uuid.UUID, user: CurrentUser, services: Services
) -> RunOut:
    """One run of your session."""
    run = await runs.get_run(
        services, actor=user.id, session_id=SessionId(session_id), run_id=RunId(run_id)
    )
    return RunOut.model_validate(run)


@router.get("/events", response_class=EventSourceResponse, responses={**NOT_FOUND, **EVENT_STREAM})
async def stream_run_events(
    session_id: uuid.UUID,
    run_id: uuid.UUID,
    user: CurrentUser,
    services: Services,
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", description="Resume after this event seq."),
    ] = None,
) -> EventSourceResponse:
    """The run's events, from the first (or after `Last-Event-ID`), live until it ends or waits."""
    run = await runs.get_run(
        services, actor=user.id, session_id=SessionId(session_id), run_id=RunId(run_id)
    )
    return run_event_stream(services, run.id, after_seq=parse_last_event_id(last_event_id))


@router.post("/cancel", responses={**NOT_FOUND, 409: {"model": ErrorBody}})
async def cancel_run(
    session_id: uuid.UUID, run_id: uuid.UUID, user: CurrentUser, services: Services
) -> RunOut:
    """Cancel a run that has not ended; 409 if it has."""
    run = await runs.cancel_run(
        services, actor=user.id, session_id=SessionId(session_id), run_id=RunId(run_id)
    )
    return RunOut.model_validate(run)


def parse_last_event_id(value: str | None) -> int:
    """The seq in a Last-Event-ID header (0 without one); InvalidInput if it is not a seq."""
    if value is None or not value.strip():
        return 0
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 12:
        raise InvalidInput("Last-Event-ID must be the id of an event of this run (a number)")
    return int(value)
