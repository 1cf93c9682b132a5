"""Wake-ups between the parts of a server: "run X has news" and "there is work to claim".

A wake-up carries no payload: whoever wakes reads the database, which is the only source of
truth. So a lost wake-up costs latency, never correctness, and every waiter also polls on a
timeout (a crashed process sends nothing). ``LocalBroker`` fans out inside one process.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from countersign.domain.models import RunId


class Subscription:
    """Wake-ups for one run, for one follower (an SSE stream)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Mark that the run has news."""
        self._event.set()

    async def wait(self, within: float) -> bool:
        """Wait up to ``within`` seconds for news; True if there was news."""
        try:
            await asyncio.wait_for(self._event.wait(), within)
        except TimeoutError:
            return False
        finally:
            self._event.clear()
        return True


class LocalBroker:
    """In-process wake-ups for run followers and for the executor."""

    def __init__(self) -> None:
        self._followers: defaultdict[RunId, set[Subscription]] = defaultdict(set)
        self._work = asyncio.Event()

    def run_changed(self, run_id: RunId) -> None:
        """Tell the run's followers that it has new events or a new status."""
        for subscription in self._followers.get(run_id, ()):
            subscription.notify()

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

    @asynccontextmanager
    async def follow(self, run_id: RunId) -> AsyncIterator[Subscription]:
        """Subscribe to a run's wake-ups for the duration of the block."""
        subscription = Subscription()
        self._followers[run_id].add(subscription)
        try:
            yield subscription
        finally:
            followers = self._followers[run_id]
            followers.discard(subscription)
            if not followers:
                del self._followers[run_id]
