"""The one SSE generator: replay a run's stored events after ``Last-Event-ID``, then follow.

Events are read from the database in short read-only units of work, never held in memory
between wake-ups, so a stream resumed anywhere (this process or another) sees exactly the
stored log: no gap, no duplicate. The stream ends after ``run.finished`` or ``run.failed``,
or at an ``approval.required`` while the run still waits for it. A client that goes away
only stops its own stream; the run goes on in the executor.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse, ServerSentEvent

from countersign.domain.events import EventType
from countersign.domain.models import RunId, RunStatus
from countersign.services import ServiceDeps
from countersign.services.runs import EVENTS_PAGE, read_events

HEARTBEAT_SECONDS = 15
FOLLOW_POLL_SECONDS = 1.0
"""Without a wake-up (e.g. the run is carried out by another process), look this often."""


def run_event_stream(
    services: ServiceDeps, run_id: RunId, *, after_seq: int = 0
) -> EventSourceResponse:
    """An SSE response with the run's events after ``after_seq``."""
    return EventSourceResponse(
        _events(services, run_id, after_seq),
        ping=HEARTBEAT_SECONDS,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _events(
    services: ServiceDeps, run_id: RunId, after_seq: int
) -> AsyncIterator[ServerSentEvent]:
    seq = after_seq
    async with services.broker.follow(run_id) as subscription:
        while True:
            events, status = await read_events(services, run_id=run_id, after_seq=seq)
            for event in events:
                yield ServerSentEvent(
                    data=json.dumps(event.payload()), event=event.type.value, id=str(event.seq)
                )
                seq = event.seq
                if event.type in (EventType.RUN_FINISHED, EventType.RUN_FAILED):
                    return
            if len(events) == EVENTS_PAGE:
                continue
            last = events[-1].type if events else None
            if status is RunStatus.AWAITING_APPROVAL and (
                last is EventType.APPROVAL_REQUIRED or not events
            ):
                return
            if not events and not status.is_active:
                return
            await subscription.wait(FOLLOW_POLL_SECONDS)
