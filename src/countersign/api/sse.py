"""The one SSE generator: replay a run's stored events after ``Last-Event-ID``, then follow.

Events come from the database in short read-only units of work, or, when this process's
executor has just committed them, straight from the broker's wake-up; a stream that finds a
gap in what it was handed reads the database. Either way it sends exactly the stored log, in
order: no gap, no duplicate, wherever it is resumed. The stream ends after ``run.finished``
or ``run.failed``, or at an ``approval.required`` while the run still waits for it. A client
that goes away only stops its own stream; the run goes on in the executor.

An idle stream costs nothing: it waits on its subscription and never polls (what it could
miss, the process's one sweep in ``services/follow.py`` finds). A stream that cannot read the
database ends cleanly after its last whole event; the client resumes with ``Last-Event-ID``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse, ServerSentEvent

from countersign.broker import Subscription
from countersign.domain.errors import CountersignError
from countersign.domain.events import EventType, RunEvent
from countersign.domain.models import RunId, RunStatus
from countersign.services import ServiceDeps
from countersign.services.runs import EVENTS_PAGE, read_events

logger = logging.getLogger(__name__)


def run_event_stream(
    services: ServiceDeps, run_id: RunId, *, after_seq: int = 0, new_run: bool = False
) -> EventSourceResponse:
    """An SSE response with the run's events after ``after_seq``.

    ``new_run``: this request committed the run a moment ago, and the executors are told of
    it only now, so it has no events yet and what it gets from now on wakes this subscription:
    the stream starts by waiting, not by reading. (Should an executor that was polling anyway
    have claimed it in that moment, the stream's own poll reads what it missed.)
    """
    subscription = services.broker.subscribe(run_id)
    return EventSourceResponse(
        _events(services, run_id, after_seq, subscription, new_run=new_run),
        ping=services.settings.sse_heartbeat_seconds,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _events(
    services: ServiceDeps,
    run_id: RunId,
    after_seq: int,
    subscription: Subscription,
    *,
    new_run: bool,
) -> AsyncIterator[ServerSentEvent]:
    seq = after_seq
    if new_run:
        subscription.seen = seq  # it has no events yet; the sweep wakes it if that changed
    try:
        handed = await _handed(subscription, seq) if new_run else None
        while True:
            if handed is None:
                try:
                    events, status = await read_events(services, run_id=run_id, after_seq=seq)
                except CountersignError as error:
                    # E.g. the database is away or the pool is exhausted: end after the last
                    # whole event; the client resumes from it with Last-Event-ID.
                    logger.info("stream of run %s ends early: %s", run_id, error.message)
                    return
                except Exception:
                    # A bug: the same clean end, and the traceback in the log.
                    logger.exception("stream of run %s could not read its events", run_id)
                    return
                subscription.seen = max(seq, events[-1].seq if events else seq)
            else:
                events, status = handed, None
            for event in events:
                yield ServerSentEvent(
                    data=json.dumps(event.payload()), event=event.type.value, id=str(event.seq)
                )
                seq = subscription.seen = event.seq
                if event.type in (EventType.RUN_FINISHED, EventType.RUN_FAILED):
                    return
            if status is None:
                # Handed over right after their commit: an approval.required last means the
                # run was waiting for that decision then.
                if events[-1].type is EventType.APPROVAL_REQUIRED:
                    return
            else:
                if len(events) == EVENTS_PAGE:
                    continue
                last = events[-1].type if events else None
                if status is RunStatus.AWAITING_APPROVAL and (
                    last is EventType.APPROVAL_REQUIRED or not events
                ):
                    return
                if not events and not status.is_active:
                    return
            handed = await _handed(subscription, seq)
    finally:
        services.broker.unsubscribe(run_id, subscription)


async def _handed(subscription: Subscription, seq: int) -> list[RunEvent] | None:
    """The events handed over next, if they continue the stream at ``seq``; else None: a
    wake-up from elsewhere (or the sweep) or a gap, and the database must be read."""
    news = await subscription.next(None)
    fresh = [event for event in news or () if event.seq > seq]
    if fresh and all(event.seq == seq + 1 + index for index, event in enumerate(fresh)):
        return fresh
    return None
