"""The one event writer of a process: the executor's event batches, group-committed.

Every turn in this process hands its batches (events, plus the run's new values and
checkpoint) to one writer. While a commit is in flight the next batches collect; then they go
together in one transaction: a fenced UPDATE per run and one INSERT of every event (a cached
statement, executed with many rows); on PostgreSQL the group is one statement (autocommit).
Each run's write is still fenced by its lease: a run whose lease is gone gets LeaseLost and
writes nothing, without failing the others. A caller learns that its batch is committed (and
gets the stored events) only after the commit; if the commit fails, every caller of that
group gets the error and keeps its batch.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from countersign.db.repositories import fits_one_statement, fits_one_statement_group
from countersign.domain.errors import CountersignError, LeaseLost, Unavailable
from countersign.domain.events import RunBatch, RunEvent
from countersign.services import ServiceDeps
from countersign.supervisor import Loop

logger = logging.getLogger(__name__)

WRITER_LOOP = "event writer"
STOPPED = "the server is stopping"
MAX_GROUP = 256
"""Batches committed together at most; more wait for the next commit."""


@dataclass(slots=True)
class RunWrite:
    """One run's batch and the future its turn waits on."""

    batch: RunBatch
    done: asyncio.Future[list[RunEvent]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class EventWriter:
    """Group-commits run writes; ``run`` is its loop, owned by the supervisor."""

    def __init__(self, deps: ServiceDeps) -> None:
        self._deps = deps
        self._queue: list[RunWrite] = []
        self._wake = asyncio.Event()
        self._stopped = False

    async def write(self, batch: RunBatch) -> list[RunEvent]:
        """Return once the batch is committed: its events as stored."""
        if self._stopped:
            raise Unavailable(STOPPED)
        pending = RunWrite(batch)
        self._queue.append(pending)
        self._wake.set()
        return await pending.done

    def stop(self) -> None:
        """Refuse new batches and fail the queued ones (the server is stopping)."""
        self._stopped = True
        queued, self._queue = self._queue, []
        for item in queued:
            if not item.done.done():
                item.done.set_exception(Unavailable(STOPPED))

    async def run(self, loop: Loop) -> None:
        """Commit what is queued, group after group, for as long as the server runs."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
                group = [item for item in group if not item.done.done()]  # callers gone
                if group:
                    await self._commit(group)
            loop.working()

    async def _commit(self, group: list[RunWrite]) -> None:
        now = self._deps.clock.now()
        batches = [item.batch for item in group]
        try:
            if len(batches) == 1:
                # The usual case below full load: one run's batch, on PostgreSQL in one
                # statement when it fits (no BEGIN, no COMMIT: one round trip).
                single = batches[0]
                async with self._deps.uow_factory(one_statement=fits_one_statement(single)) as uow:
                    results: list[list[RunEvent] | LeaseLost] = []
                    try:
                        results.append(await uow.runs.write(single, at=now))
                    except LeaseLost as lost:
                        results.append(lost)
                    await uow.commit()
            else:
                one = fits_one_statement_group(batches)  # on PostgreSQL: one statement
                async with self._deps.uow_factory(one_statement=one) as uow:
                    results = await uow.runs.append_many(batches, at=now)
                    await uow.commit()
        except asyncio.CancelledError:
            for item in group:
                item.done.cancel()
            raise
        except Exception as error:
            if len(group) > 1 and not isinstance(error, Unavailable):
                # Something in one batch (not the database being away): write each on its
                # own, so that only the run whose batch it was hears of it.
                for item in group:
                    await self._commit([item])
                return
            if not isinstance(error, CountersignError):
                logger.exception("a batch of run %s could not be written", group[0].batch.run_id)
            for item in group:
                if not item.done.done():
                    item.done.set_exception(_copy(error))
            return
        for item, result in zip(group, results, strict=True):
            if item.done.done():
                continue
            if isinstance(result, CountersignError):
                item.done.set_exception(result)
            else:
                item.done.set_result(result)


def _copy(error: Exception) -> Exception:
    """A fresh exception for each waiter (one instance raised in many tasks would share, and
    grow, one traceback)."""
    if isinstance(error, CountersignError):
        return type(error)(error.message, detail=error.detail)
    return error
