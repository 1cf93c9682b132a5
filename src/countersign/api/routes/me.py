"""``/me``: who the caller is, and the live feed of changes to the caller's data."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from countersign.api.deps import AuthenticatedRoute, CurrentUser, Services, request_credential
from countersign.api.routes import API_PREFIX
from countersign.api.routes.runs import event_stream
from countersign.api.schemas import API_ERRORS, UserOut
from countersign.domain.errors import CountersignError, Unauthenticated
from countersign.domain.models import UserId
from countersign.services.accounts import authenticate
from countersign.services.feed import FeedHub, feed_events

router = APIRouter(
    prefix=API_PREFIX, tags=["auth"], responses=API_ERRORS, route_class=AuthenticatedRoute
)


@router.get("/me")
async def me(user: CurrentUser) -> UserOut:
    """The authenticated user."""
    return UserOut.model_validate(user)


FEED_STREAM = event_stream(
    ["approval.required", "approval.resolved", "run.status", "session.changed"],
    "Server-Sent Events: `event:` the change, `data:` JSON.",
)


@router.get(
    "/me/events", response_class=EventSourceResponse, responses=FEED_STREAM, tags=["events"]
)
async def my_events(request: Request, user: CurrentUser, services: Services) -> EventSourceResponse:
    """A live SSE feed of changes to your data across all your sessions (no replay: read the
    state you show, having opened this feed first, then follow it). Events:
    `approval.required` and `approval.resolved` (the approval's fields with `session_id`),
    `run.status` (`{session_id, run_id, status}`), `session.changed` (`{session_id}`, also
    when it was deleted); comment lines while idle. The feed ends if its client falls far
    behind, and once the credential that opened it is no longer valid (checked again every
    `COUNTERSIGN_FEED_RECHECK_SECONDS`); open it again and read the state again."""
    hub: FeedHub = request.app.state.feeds
    credential = request_credential(request)

    async def still_valid() -> bool:
        try:
            caller = await authenticate(services, credential=credential)
        except Unauthenticated:
            return False
        except CountersignError:
            return True  # the database is away for a moment: the feed just waits
        return caller.user.id == user.id

    return EventSourceResponse(
        _sse(hub, user.id, still_valid, services.settings.feed_recheck_seconds),
        ping=services.settings.sse_heartbeat_seconds,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _sse(
    hub: FeedHub, user_id: UserId, still_valid: Callable[[], Awaitable[bool]], every: float
) -> AsyncIterator[ServerSentEvent]:
    async for event in feed_events(hub, user_id, still_valid=still_valid, recheck_every=every):
        yield ServerSentEvent(data=json.dumps(event.data), event=event.event)
