"""The owner of every background loop: restarts a loop that failed, and says when one is gone.

A loop is a coroutine function that runs until it fails. When it raises, the supervisor logs
the exception with its traceback and starts it again after a back-off that doubles up to a
ceiling (and starts over once the loop has run well for a while). A loop may also report
that it is doing its work (``Loop.working()``); one that has not done so for longer than its
``stale_after`` counts as stuck, and one whose last round failed counts as failing until a
round goes well. ``problems()`` names loops that ended for good, fail or are stuck, and
``/health/ready`` answers 503 with them: a server whose executor is dead must not look ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

FIRST_BACKOFF_SECONDS = 0.1
MAX_BACKOFF_SECONDS = 5.0
HEALTHY_RUN_SECONDS = 30.0
"""A loop that ran this long before failing starts again at the first back-off."""


class Shutdown:
    """What the process's stop signals asked for, set by ``countersign serve``'s signal handler.

    The first SIGTERM (or SIGINT) asks for a graceful stop: claim nothing more, let the runs in
    progress finish within the grace. A second one makes it urgent: hand every run back now.
    Plain flags, set in the signal handler and read by the executor.
    """

    def __init__(self) -> None:
        self.requested = False
        self.urgent = False
        self.requested_at: float | None = None
        """When the first signal came (``time.monotonic()``): the grace counts from then."""

    def signal(self) -> None:
        """A stop signal arrived: the first asks for a graceful stop, the next for an urgent one."""
        if self.requested:
            self.urgent = True
        else:
            self.requested_at = time.monotonic()
        self.requested = True


@dataclass(slots=True)
class Loop:
    """One supervised loop and what the supervisor knows of it."""

    name: str
    body: Callable[[Loop], Awaitable[None]]
    stale_after: float | None
    """Seconds without ``working()`` after which the loop counts as stuck (None: never)."""
    task: asyncio.Task[None] | None = None
    last_working: float = field(default_factory=time.monotonic)
    failures: int = 0
    last_error: str | None = None

    def working(self) -> None:
        """Record that the loop has just done a round of its work."""
        self.last_working = time.monotonic()
        self.last_error = None


class Supervisor:
    """Runs named loops in tasks, restarts them when they fail, and reports their health."""

    def __init__(
        self,
        *,
        first_backoff: float = FIRST_BACKOFF_SECONDS,
        max_backoff: float = MAX_BACKOFF_SECONDS,
    ) -> None:
        self._loops: dict[str, Loop] = {}
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self._stopping = False

    def start(
        self,
        name: str,
        body: Callable[[Loop], Awaitable[None]],
        *,
        stale_after: float | None = None,
    ) -> Loop:
        """Run ``body(loop)`` in a task of its own, again whenever it fails."""
        if name in self._loops:
            raise ValueError(f"a loop named {name!r} is already supervised")
        loop = Loop(name=name, body=body, stale_after=stale_after)
        loop.task = asyncio.create_task(self._supervise(loop), name=name)
        self._loops[name] = loop
        return loop

    async def _supervise(self, loop: Loop) -> None:
        backoff = self._first_backoff
        while True:
            started = time.monotonic()
            try:
                await loop.body(loop)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                loop.failures += 1
                loop.last_error = f"it failed with {type(error).__name__}"
                logger.exception("background loop %r failed; starting it again", loop.name)
            else:
                logger.error("background loop %r returned; starting it again", loop.name)
            if time.monotonic() - started >= HEALTHY_RUN_SECONDS:
                backoff = self._first_backoff
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    def problems(self) -> list[str]:
        """One sentence per loop that ended for good or has not worked for too long."""
        found: list[str] = []
        now = time.monotonic()
        for loop in self._loops.values():
            if loop.task is not None and loop.task.done():
                found.append(f"the background loop {loop.name!r} has stopped")
            elif loop.last_error is not None:
                # Until its next good round: e.g. the database came back, but the executor
                # has not claimed anything since.
                found.append(f"the background loop {loop.name!r} is failing: {loop.last_error}")
            elif loop.stale_after is not None and now - loop.last_working > loop.stale_after:
                since = now - loop.last_working
                found.append(
                    f"the background loop {loop.name!r} has not done its work for {since:.0f} s"
                )
        return found

    def loop(self, name: str) -> Loop | None:
        """The supervised loop of that name, if any."""
        return self._loops.get(name)

    async def stop_loop(self, name: str) -> None:
        """Cancel one loop and wait (a bounded time) for it to end."""
        loop = self._loops.pop(name, None)
        if loop is not None:
            await _cancel([loop])

    async def stop(self) -> None:
        """Cancel every loop and wait (a bounded time) for them to end."""
        self._stopping = True
        loops, self._loops = list(self._loops.values()), {}
        await _cancel(loops)


STOP_SECONDS = 5.0
"""How long stopping waits for cancelled loops (one stuck in a driver must not hang it)."""


async def _cancel(loops: list[Loop]) -> None:
    tasks = {loop.task: loop.name for loop in loops if loop.task is not None}
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _done, stuck = await asyncio.wait(tasks, timeout=STOP_SECONDS)
    for task in stuck:
        logger.warning("background loop %r did not stop within %s s", tasks[task], STOP_SECONDS)
