"""Wake-ups between the parts of a server: "run X has news" and "there is work to claim".

The database is the only source of truth. Inside one process a wake-up may hand its followers
the events that were just committed, so that a stream on the same process as the executor
needs no read; a follower that finds a gap (it subscribed late, or too many piled up) reads
the database instead. Across processes a wake-up carries no payload: whoever wakes reads the
database. So a lost wake-up costs latency, never correctness: the executor polls on a
timeout (a crashed process sends nothing), and one sweep per process (``services/follow.py``)
looks up every followed run's newest event once a second and wakes the followers that missed
news (``found_in_database``); a stream itself never polls. ``LocalBroker`` fans out inside
one process; ``PostgresBroker`` adds LISTEN/NOTIFY so that several server processes on one
PostgreSQL database wake each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import weakref
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from countersign.domain.events import RunEvent
from countersign.domain.models import RunId
from countersign.supervisor import Loop, Supervisor

logger = logging.getLogger(__name__)


MAX_NOTES = 10_000
"""Notes for the feeds kept between two looks (more: the oldest are dropped)."""

MAX_HANDED_EVENTS = 1_000
"""A follower that falls this far behind gets no more events in memory; it reads them."""


class Subscription:
    """Wake-ups for one run, for one follower (an SSE stream), with the events handed over."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._events: list[RunEvent] = []
        self._overflowed = False
        self.seen = -1
        """The newest event seq the follower has (its stream sets it; -1: not known yet)."""

    def notify(self, events: Sequence[RunEvent] = ()) -> None:
        """Mark that the run has news; ``events`` are committed ones, in order."""
        if self._overflowed or len(self._events) + len(events) > MAX_HANDED_EVENTS:
            self._overflowed = True
            self._events.clear()
        else:
            self._events.extend(events)
        self._event.set()

    async def next(self, within: float | None) -> list[RunEvent] | None:
        """Wait up to ``within`` seconds (None: as long as it takes) for news.

        The events handed over since the last call (maybe none: then read the database), or
        None when nothing happened.
        """
        if not self._event.is_set():
            try:
                await asyncio.wait_for(self._event.wait(), within)
            except TimeoutError:
                return None
        self._event.clear()
        events, self._events = self._events, []
        if self._overflowed:
            self._overflowed = False
            return []
        return events


class LocalBroker:
    """In-process wake-ups for run followers and for the executor."""

    def __init__(self) -> None:
        # Weak: a subscription whose stream was dropped before it began goes away by itself.
        self._followers: defaultdict[RunId, weakref.WeakSet[Subscription]] = defaultdict(
            weakref.WeakSet
        )
        self._work = asyncio.Event()
        self._changes = asyncio.Event()
        self._notes: deque[str] = deque(maxlen=MAX_NOTES)

    def data_changed(self, note: str = "") -> None:
        """Tell the per-user feeds (``services/feed.py``) that a run, approval or session
        changed; ``note`` says what the database cannot (e.g. a session that was deleted)."""
        if note:
            self._notes.append(note)
        self._changes.set()

    async def wait_for_changes(self, within: float) -> list[str]:
        """Wait up to ``within`` seconds for ``data_changed``; the notes sent since."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changes.wait(), within)
        self._changes.clear()
        notes = list(self._notes)
        self._notes.clear()
        return notes

    def run_changed(self, run_id: RunId, events: Sequence[RunEvent] = ()) -> None:
        """Tell the run's followers that it has new events or a new status.

        ``events``: what the caller has just committed, in order, handed to local followers.
        """
        followers = self._followers.get(run_id)
        if not followers:
            return
        for subscription in list(followers):
            subscription.notify(events)

    def followed_runs(self) -> list[RunId]:
        """The runs that have a follower in this process."""
        return [run_id for run_id, followers in self._followers.items() if followers]

    def found_in_database(self, newest_seqs: dict[RunId, int]) -> int:
        """What a look at the database found: each followed run's newest event seq.

        Followers that have not seen a run's newest event (written by another process whose
        wake-up was lost, or before they subscribed) are woken to read it. Returns how many
        followers that was.
        """
        woken = 0
        for run_id, last_seq in newest_seqs.items():
            for subscription in list(self._followers.get(run_id, ())):
                if subscription.seen < last_seq:
                    subscription.notify()
                    woken += 1
        return woken

    def work_available(self) -> None:
        """Tell the executor that a run may be waiting to be claimed."""
        self._work.set()

    async def wait_for_work(self, within: float) -> None:
        """Return when work was announced, or after ``within`` seconds (the poll)."""
        try:
            await asyncio.wait_for(self._work.wait(), within)
        except TimeoutError:
            pass
        finally:
            self._work.clear()

    def subscribe(self, run_id: RunId) -> Subscription:
        """Subscribe to a run's wake-ups from now on; ``unsubscribe`` when done."""
        subscription = Subscription()
        self._followers[run_id].add(subscription)
        return subscription

    def unsubscribe(self, run_id: RunId, subscription: Subscription) -> None:
        """End a subscription."""
        followers = self._followers.get(run_id)
        if followers is None:
            return
        followers.discard(subscription)
        if not followers:
            del self._followers[run_id]

    @asynccontextmanager
    async def follow(self, run_id: RunId) -> AsyncIterator[Subscription]:
        """Subscribe to a run's wake-ups for the duration of the block."""
        subscription = self.subscribe(run_id)
        try:
            yield subscription
        finally:
            self.unsubscribe(run_id, subscription)


BROKER_LOOP = "postgres broker"
CONNECT_SECONDS = 10.0
RUNS_CHANNEL = "countersign_runs"
WORK_CHANNEL = "countersign_work"
CHANGES_CHANNEL = "countersign_changes"
NOTIFY_GATHER_SECONDS = 0.05
"""At most one send of wake-ups for other processes this often; those of the meantime go
together."""
STOP_FLUSH_SECONDS = 1.0
"""How long a stopping broker waits for its last wake-ups to go out."""
_NOTIFY_MANY = (
    "SELECT count(pg_notify(n.channel, n.payload)) "
    "FROM unnest($1::text[], $2::text[]) AS n(channel, payload)"
)
OUTBOX_LIMIT = 10_000
"""Wake-ups waiting to be sent at most (while the connection is down they pile up)."""


class PostgresBroker(LocalBroker):
    """LocalBroker plus LISTEN/NOTIFY, so that wake-ups reach every process on the database.

    Notifications carry a run id or nothing, never event payloads: other processes read them.
    If the connection is lost the broker reconnects in the background; meanwhile waiters fall
    back to polling.
    """

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self._dsn = dsn
        # A set, not a queue: while the connection is down, a thousand wake-ups of one run
        # are one notification to send, so the outbox stays as small as the runs touched.
        self._outbox: set[tuple[str, str]] = set()
        self._outbox_ready = asyncio.Event()
        self._overflowed = False
        self._loop: Loop | None = None
        self._own_pids: set[int] = set()
        self._last_sent = 0.0
        self._sending = False
        self.connected = asyncio.Event()
        self._stopping = False

    async def start(self, supervisor: Supervisor | None = None) -> None:
        """Begin listening and sending, in a loop the supervisor owns (its own if none)."""
        self._supervisor = supervisor or Supervisor()
        self._loop = self._supervisor.start(BROKER_LOOP, self._keep_connected)

    async def stop(self) -> None:
        """Stop listening and close the connections."""
        self._stopping = True
        loop, self._loop = self._loop, None
        if loop is None or loop.task is None:
            return
        # The wake-ups of the last moment go out before the connection does (bounded).
        self._outbox_ready.set()
        for _ in range(int(STOP_FLUSH_SECONDS / 0.01)):
            if (not self._outbox and not self._sending) or not self.connected.is_set():
                break
            await asyncio.sleep(0.01)
        task = loop.task
        task.cancel()
        # Waited for, never awaited: a dying connection may end the task with its own error.
        done, _pending = await asyncio.wait({task}, timeout=5)
        if task in done and not task.cancelled() and task.exception() is not None:
            logger.debug("LISTEN/NOTIFY connection ended with: %s", task.exception())

    def run_changed(self, run_id: RunId, events: Sequence[RunEvent] = ()) -> None:
        """Wake the run's followers here and in every other process (there, with no events)."""
        super().run_changed(run_id, events)
        self._send(RUNS_CHANNEL, str(run_id))

    def work_available(self) -> None:
        """Wake the executors here and in every other process."""
        super().work_available()
        self._send(WORK_CHANNEL, "")

    def data_changed(self, note: str = "") -> None:
        """Wake the feeds here and in every other process."""
        super().data_changed(note)
        self._send(CHANGES_CHANNEL, note)

    def _send(self, channel: str, payload: str) -> None:
        if len(self._outbox) >= OUTBOX_LIMIT and (channel, payload) not in self._outbox:
            # Bounded (it grows while the connection is down): past the limit, the precise
            # wake-ups give way to the two general ones, and the other processes' sweeps
            # and polls find what changed, as they do after any outage.
            self._outbox = {(WORK_CHANNEL, ""), (CHANGES_CHANNEL, "")}
            if not self._overflowed:
                self._overflowed = True
                logger.warning(
                    "more than %d wake-ups waited to be sent; the other processes will find "
                    "the changes by polling",
                    OUTBOX_LIMIT,
                )
        self._outbox.add((channel, payload))
        self._outbox_ready.set()

    async def _keep_connected(self, loop: Loop) -> None:
        # Connection trouble is expected and retried here; anything else ends this call and
        # the supervisor logs it with its traceback and starts it again.
        delay = 0.5
        while True:
            try:
                await self._serve(loop)
            except (
                OSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                asyncpg.exceptions.InternalClientError,  # a connection cut mid-statement
            ) as error:
                self.connected.clear()
                if self._stopping:
                    return
                logger.warning("LISTEN/NOTIFY connection lost (%s); polling meanwhile", error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _serve(self, loop: Loop) -> None:
        connections: list[Any] = []
        try:
            # Appended one by one, so that a cancel between the two still closes the first.
            connections.append(await asyncpg.connect(self._dsn, timeout=CONNECT_SECONDS))
            connections.append(await asyncpg.connect(self._dsn, timeout=CONNECT_SECONDS))
            listener, sender = connections
            self._own_pids = {listener.get_server_pid(), sender.get_server_pid()}
            await listener.add_listener(RUNS_CHANNEL, self._received)
            await listener.add_listener(WORK_CHANNEL, self._received)
            await listener.add_listener(CHANGES_CHANNEL, self._received)
            self.connected.set()
            loop.working()
            # What changed while there was no connection, the sweep finds (services/follow.py);
            # the executor looks for work now.
            LocalBroker.work_available(self)
            LocalBroker.data_changed(self)
            while True:
                await self._outbox_ready.wait()
                # At most one send per NOTIFY_GATHER_SECONDS, the wake-ups of the meantime
                # together in one statement (at once when the last send is older): a few
                # statements a second however busy the process, and the commit-time lock
                # NOTIFY takes cluster-wide is taken by this connection alone, never by the
                # writes on the hot path.
                wait = self._last_sent + NOTIFY_GATHER_SECONDS - time.monotonic()
                if wait > 0 and not self._stopping:
                    await asyncio.sleep(wait)
                self._outbox_ready.clear()
                batch, self._outbox = self._outbox, set()
                self._overflowed = False
                if not batch:
                    continue
                channels, payloads = zip(*sorted(batch), strict=True)
                self._last_sent = time.monotonic()
                self._sending = True
                try:
                    await sender.fetchval(_NOTIFY_MANY, list(channels), list(payloads))
                except BaseException:
                    self._outbox |= batch  # sent with the next connection
                    self._outbox_ready.set()
                    raise
                finally:
                    self._sending = False
        finally:
            self.connected.clear()
            for connection in connections:
                with contextlib.suppress(Exception):
                    await asyncio.shield(connection.close(timeout=2))

    def _received(self, _connection: object, pid: int, channel: str, payload: str) -> None:
        if pid in self._own_pids:
            return  # our own notification: the local wake-up already happened
        if channel == WORK_CHANNEL:
            super().work_available()
            return
        if channel == CHANGES_CHANNEL:
            super().data_changed(payload)
            return
        try:
            run_id = RunId(uuid.UUID(payload))
        except ValueError:
            return
        super().run_changed(run_id)
