"""Run events: the one format that is stored, published and streamed.

A run's events form an append-only log numbered by ``seq`` (1, 2, ...) within the run; the
SSE ``id:`` is that number. Each event also records the executor ``attempt`` that wrote it,
so a client can drop the partial text of an attempt that died (a new ``run.started`` with a
higher attempt marks the retry).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from countersign.domain.models import JSONObject, Lease, MessageId, RunId, SessionId


class EventType(StrEnum):
    """The SSE ``event:`` names."""

    RUN_STARTED = "run.started"
    TEXT_DELTA = "text.delta"
    TOOL_CALL = "tool.call"
    APPROVAL_REQUIRED = "approval.required"
    APPROVAL_RESOLVED = "approval.resolved"
    TOOL_RESULT = "tool.result"
    MESSAGE_COMPLETED = "message.completed"
    RUN_FINISHED = "run.finished"
    RUN_FAILED = "run.failed"

    @property
    def ends_stream(self) -> bool:
        """True for the events after which a run's event stream closes."""
        return self in _STREAM_ENDERS


_STREAM_ENDERS = frozenset(
    {EventType.RUN_FINISHED, EventType.RUN_FAILED, EventType.APPROVAL_REQUIRED}
)


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event not yet written; its ``seq`` is given when it is appended."""

    type: EventType
    data: JSONObject


@dataclass(frozen=True, slots=True)
class RunBatch:
    """What an executor writes for a run in one go, under its lease: events to append, the
    run's new values, and the model messages its checkpoint adds."""

    run_id: RunId
    session_id: SessionId
    lease: Lease
    events: list[NewEvent]
    values: JSONObject | None = None
    checkpoint_after: int | None = None
    """The checkpoint (``history_seq`` in ``values``) covers the first that many events."""
    messages: list[Any] = field(default_factory=list)
    """Model messages (JSON) to store as the session's ``seq`` ``messages_after + 1`` on."""
    messages_after: int = 0
    truncate: bool = False
    """Delete the session's messages after ``messages_after`` first (they are replaced)."""


@dataclass(frozen=True, slots=True)
class AssistantReply:
    """The assistant's message that a turn's last write stores (``RunRepository.write``)."""

    message_id: MessageId
    content: str


@dataclass(frozen=True, slots=True)
class RunEvent:
    """One stored event of a run's log."""

    run_id: RunId
    seq: int
    attempt: int
    type: EventType
    data: JSONObject
    created_at: datetime

    def payload(self) -> JSONObject:
        """The SSE ``data:`` object: the event's fields plus ``run_id``, ``seq``, ``attempt``
        and ``at`` (when it was recorded, ISO 8601 with its zone)."""
        at = self.created_at
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)  # stored as UTC by every clock the server has
        return {
            **self.data,
            "run_id": str(self.run_id),
            "seq": self.seq,
            "attempt": self.attempt,
            "at": at.isoformat(),
        }


def text_delta(text: str) -> NewEvent:
    """A piece of the assistant's reply."""
    return NewEvent(EventType.TEXT_DELTA, {"text": text})


def assistant_text(
    events: list[RunEvent],
    *,
    resumed_from: int | None = None,
    between: tuple[int, int] | None = None,
) -> str:
    """The reply a run's text deltas add up to, leaving out what retried attempts replaced.

    A ``run.started`` event of a retried attempt carries ``resumed_from_seq``: the deltas of
    earlier attempts after that point were streamed again by the new attempt, so they drop
    out. ``resumed_from`` applies the same rule once more at the end (an attempt starting now).
    ``between`` keeps only the deltas whose seq lies strictly between its two ends.
    """
    kept: list[tuple[int, int, str]] = []
    for event in sorted(events, key=lambda event: event.seq):
        if event.type is EventType.TEXT_DELTA:
            kept.append((event.seq, event.attempt, str(event.data.get("text", ""))))
        elif event.type is EventType.RUN_STARTED:
            cut = int(event.data.get("resumed_from_seq", 0))
            kept = [item for item in kept if item[0] <= cut or item[1] >= event.attempt]
    if resumed_from is not None:
        kept = [item for item in kept if item[0] <= resumed_from]
    if between is not None:
        kept = [item for item in kept if between[0] < item[0] < between[1]]
    return "".join(text for _seq, _attempt, text in kept)
