"""Wake-ups between the parts of a server: "run X has news" and "there is work to claim".

The database is the only source of truth. Inside one process a wake-up may hand its followers
the events that were just committed, so that a stream on the same process as the executor
needs no read; a follower that finds a gap (it subscribed late, or too many piled up) reads
the database instead. Across processes a wake-up carries no payload: whoever wakes reads the
database. So a lost wake-up costs latency, never correctness, and every waiter also polls on
a timeout (a crashed process sends nothing). ``LocalBroker`` fans out inside one process;
``PostgresBroker`` adds LISTEN/NOTIFY so that several server processes on one PostgreSQL
database wake each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from countersign.domain.events import RunEvent
from countersign.domain.models import RunId

logger = logging.getLogger(__name__)


MAX_HANDED_EVENTS = 1_000
"""A follower that falls this far behind gets no more events in memory; it reads them."""


class Subscription:
    """Wake-ups for one run, for one follower (an SSE stream), with the events handed over."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._events: list[RunEvent] = []
        self._overflowed = False

    def notify(self, events: Sequence[RunEvent] = ()) -> None:
        """Mark that the run has news; ``events`` are committed ones, in order."""
        if self._overflowed or len(self._events) + len(events) > MAX_HANDED_EVENTS:
            self._overflowed = True
            self._events.clear()
        else:
            self._events.extend(events)
        self._event.set()

    async def next(self, within: float) -> list[RunEvent] | None:
        """Wait up to ``within`` seconds for news.

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

    def run_changed(self, run_id: RunId, events: Sequence[RunEvent] = ()) -> None:
        """Tell the run's followers that it has new events or a new status.

        ``events``: what the caller has just committed, in order, handed to local followers.
        """
        for subscription in self._followers.get(run_id, ()):
            subscription.notify(events)

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


RUNS_CHANNEL = "countersign_runs"
WORK_CHANNEL = "countersign_work"


class PostgresBroker(LocalBroker):
    """LocalBroker plus LISTEN/NOTIFY, so that wake-ups reach every process on the database.

    Notifications carry a run id or nothing, never event payloads: other processes read them.
    If the connection is lost the broker reconnects in the background; meanwhile waiters fall
    back to polling.
    """

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self._dsn = dsn
        self._outbox: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._own_pids: set[int] = set()
        self.connected = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        """Begin listening and sending (in a background task)."""
        self._task = asyncio.create_task(self._keep_connected(), name="postgres broker")

    async def stop(self) -> None:
        """Stop listening and close the connections."""
        self._stopping = True
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        # Waited for, never awaited: a dying connection may end the task with its own error.
        done, _pending = await asyncio.wait({task}, timeout=5)
        if task in done and not task.cancelled() and task.exception() is not None:
            logger.debug("LISTEN/NOTIFY connection ended with: %s", task.exception())

    def run_changed(self, run_id: RunId, events: Sequence[RunEvent] = ()) -> None:
        """Wake the run's followers here and in every other process (there, with no events)."""
        super().run_changed(run_id, events)
        self._outbox.put_nowait((RUNS_CHANNEL, str(run_id)))

    def work_available(self) -> None:
        """Wake the executors here and in every other process."""
        super().work_available()
        self._outbox.put_nowait((WORK_CHANNEL, ""))

    async def _keep_connected(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._serve()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                self.connected.clear()
                if self._stopping:
                    return
                logger.warning("LISTEN/NOTIFY connection lost (%s); polling meanwhile", error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _serve(self) -> None:
        connections: list[Any] = []
        try:
            # Appended one by one, so that a cancel between the two still closes the first.
            connections.append(await asyncpg.connect(self._dsn))
            connections.append(await asyncpg.connect(self._dsn))
            listener, sender = connections
            self._own_pids = {listener.get_server_pid(), sender.get_server_pid()}
            await listener.add_listener(RUNS_CHANNEL, self._received)
            await listener.add_listener(WORK_CHANNEL, self._received)
            self.connected.set()
            while True:
                channel, payload = await self._outbox.get()
                batch = {(channel, payload)}
                while not self._outbox.empty():
                    batch.add(self._outbox.get_nowait())
                await sender.executemany("SELECT pg_notify($1, $2)", sorted(batch))
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
        try:
            run_id = RunId(uuid.UUID(payload))
        except ValueError:
            return
        super().run_changed(run_id)
