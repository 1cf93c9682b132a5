"""Per-user live feeds (``GET /me/events``): what changed in a user's sessions, runs and
approvals, across sessions and server processes.

A feed is live only: a client reads the state it shows, then follows (it should open the feed
first, so that nothing falls between the two). One ``FeedHub`` per process looks at the
database for every feed it serves at once (three statements per look, however many feeds are
open): on a wake-up from the broker (a change here, or, on PostgreSQL, a NOTIFY from another
process) and at least once a second while any feed is open, so a lost wake-up costs latency,
never an event. Each look reads what was written since a while before the previous one
(``OVERLAP``, 35 s: a transaction may commit well after its timestamp) and sends only what
differs from what was last sent, so an overlap never repeats an event. (When the first feed
of an idle hub opens, its first look may send changes of the half minute before: harmless,
as every event says what something is now.)

What a deletion removes cannot be read; it travels as a note in the wake-up itself
(``session.deleted <owner> <session>``) and becomes a ``session.changed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from countersign.domain.errors import CountersignError
from countersign.domain.models import Approval, ApprovalStatus, SessionId, UserId
from countersign.services import ServiceDeps
from countersign.supervisor import Loop

logger = logging.getLogger(__name__)

FEED_LOOP = "user feeds"
OVERLAP = timedelta(seconds=35)
"""How far before its previous look each look reads again: longer than a transaction can take
to commit after its timestamp (statements are cut at ``COUNTERSIGN_DB_STATEMENT_TIMEOUT_MS``,
30 s by default), so that a late commit is still seen."""
LOOK_EVERY = 1.0
"""The longest wait between two looks while a feed is open (seconds)."""
MIN_GAP = 0.05
"""The shortest wait between two looks: a burst of wake-ups is one look."""
FEED_BACKLOG = 1_000
"""Events a feed may fall behind by; past that it is closed (the client reads and follows
again)."""
DELETED_NOTE = "session.deleted"


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """One event of a user's feed: its SSE name and its data."""

    event: str
    data: dict[str, Any]


class Feed:
    """One client's feed: the events for its user, in order."""

    def __init__(self, user_id: UserId) -> None:
        self.user_id = user_id
        self._queue: asyncio.Queue[FeedEvent | None] = asyncio.Queue(FEED_BACKLOG)
        self.overflowed = False

    def put(self, event: FeedEvent) -> None:
        if self.overflowed:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            self._queue.get_nowait()  # room for the end marker
            self._queue.put_nowait(None)

    async def next(self) -> FeedEvent | None:
        """The next event; None when the feed fell too far behind and must end."""
        return await self._queue.get()


class FeedHub:
    """The feeds this process serves, and the looks at the database that fill them."""

    def __init__(self, deps: ServiceDeps) -> None:
        self.deps = deps
        self._feeds: defaultdict[UserId, set[Feed]] = defaultdict(set)
        self._opened = asyncio.Event()
        self._since: datetime | None = None
        # What was last sent, with when it was last seen (pruned after two overlaps).
        self._runs: dict[uuid.UUID, tuple[str, float]] = {}
        self._approvals: dict[uuid.UUID, tuple[str, float]] = {}
        self._sessions: dict[uuid.UUID, tuple[datetime, float]] = {}

    @contextlib.contextmanager
    def open(self, user_id: UserId) -> Iterator[Feed]:
        """A feed for the user, for the duration of the block."""
        feed = Feed(user_id)
        if self._since is None:
            self._since = self.deps.clock.now()  # the first look reads from here on
        self._feeds[user_id].add(feed)
        self._opened.set()
        try:
            yield feed
        finally:
            feeds = self._feeds.get(user_id)
            if feeds is not None:
                feeds.discard(feed)
                if not feeds:
                    del self._feeds[user_id]

    def feeds_open(self) -> int:
        """How many feeds this process serves."""
        return sum(len(feeds) for feeds in self._feeds.values())

    async def run(self, loop: Loop) -> None:
        """Look whenever told of a change, and every ``LOOK_EVERY`` s while a feed is open."""
        while True:
            if not self._feeds:
                self._since = None  # nobody follows: the next feed starts from its opening
                loop.working()  # nothing to look at is not a failing look
                await self._opened.wait()
                self._opened.clear()
            notes = await self.deps.broker.wait_for_changes(LOOK_EVERY)
            try:
                await self.look(notes)
                loop.working()
            except CountersignError as error:
                loop.last_error = error.message  # the database is away; feeds just wait
            await asyncio.sleep(MIN_GAP)

    async def look(self, notes: Sequence[str] = ()) -> None:
        """Read what changed for the users with open feeds and send it to them."""
        for note in notes:
            self._deleted_session(note)
        owners = list(self._feeds)
        if not owners:
            return
        now = self.deps.clock.now()
        since = (self._since or now) - OVERLAP
        async with self.deps.uow_factory(write=False) as uow:
            sessions = await uow.sessions.changed_since(owners, since)
            runs = await uow.runs.changed_since(owners, since)
            approvals = await uow.approvals.changed_since(owners, since)
        self._since = now
        seen = time.monotonic()
        for owner, session_id, at in sessions:
            last = self._sessions.get(session_id)
            self._sessions[session_id] = (at, seen)
            if last is None or last[0] != at:
                self._send(owner, FeedEvent("session.changed", {"session_id": str(session_id)}))
        for owner, session_id, run_id, status in runs:
            last_status = self._runs.get(run_id)
            self._runs[run_id] = (status.value, seen)
            if last_status is None or last_status[0] != status.value:
                self._send(
                    owner,
                    FeedEvent(
                        "run.status",
                        {
                            "session_id": str(session_id),
                            "run_id": str(run_id),
                            "status": status.value,
                        },
                    ),
                )
        for owner, approval in approvals:
            last_approval = self._approvals.get(approval.id)
            self._approvals[approval.id] = (approval.status.value, seen)
            if last_approval is not None and last_approval[0] == approval.status.value:
                continue
            if approval.status is ApprovalStatus.PENDING:
                self._send(owner, FeedEvent("approval.required", approval_data(approval)))
            else:
                self._send(owner, FeedEvent("approval.resolved", approval_data(approval)))
        self._prune(seen)

    def _deleted_session(self, note: str) -> None:
        kind, _, rest = note.partition(" ")
        if kind != DELETED_NOTE:
            return
        owner, _, session = rest.partition(" ")
        try:
            user_id, session_id = UserId(uuid.UUID(owner)), SessionId(uuid.UUID(session))
        except ValueError:
            return
        self._send(user_id, FeedEvent("session.changed", {"session_id": str(session_id)}))

    def _send(self, owner: UserId, event: FeedEvent) -> None:
        for feed in self._feeds.get(owner, ()):
            feed.put(event)

    def _prune(self, now: float) -> None:
        horizon = now - 2 * OVERLAP.total_seconds() - LOOK_EVERY
        for known in (self._runs, self._approvals, self._sessions):
            for key in [key for key, (_value, seen) in known.items() if seen < horizon]:
                del known[key]


def deleted_session_note(owner: UserId, session_id: SessionId) -> str:
    """The wake-up note that tells feeds a session was deleted."""
    return f"{DELETED_NOTE} {owner} {session_id}"


def approval_data(approval: Approval) -> dict[str, Any]:
    """An approval's fields as the API shows them (``approval.*`` feed events)."""

    def at(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return {
        "id": str(approval.id),
        "approval_id": str(approval.id),
        "session_id": str(approval.session_id),
        "run_id": str(approval.run_id),
        "tool": approval.tool,
        "arguments": approval.arguments,
        "decided_arguments": approval.decided_arguments,
        "asked_because": approval.asked_because,
        "status": approval.status.value,
        "decided_by": None if approval.decided_by is None else str(approval.decided_by),
        "decided_at": at(approval.decided_at),
        "reason": approval.reason,
        "expires_at": at(approval.expires_at),
    }


async def feed_events(
    hub: FeedHub,
    user_id: UserId,
    *,
    still_valid: Callable[[], Awaitable[bool]] | None = None,
    recheck_every: float = 30.0,
) -> AsyncIterator[FeedEvent]:
    """The user's feed events as they come, until the feed falls too far behind, or until
    ``still_valid`` (asked every ``recheck_every`` seconds) says the caller's credential is
    no longer valid."""
    with hub.open(user_id) as feed:
        recheck_at = time.monotonic() + recheck_every
        while True:
            # Checked before reading, so that a feed that always has an event waiting (a busy
            # user, a slow reader) is checked too.
            if time.monotonic() >= recheck_at:
                if still_valid is not None and not await still_valid():
                    logger.info(
                        "a feed of user %s ended: its credential is no longer valid", user_id
                    )
                    return
                recheck_at = time.monotonic() + recheck_every
            try:
                async with asyncio.timeout(max(0.0, recheck_at - time.monotonic())):
                    event = await feed.next()
            except TimeoutError:
                continue
            if event is None:
                logger.info("a feed of user %s fell behind and was closed", user_id)
                return
            yield event
