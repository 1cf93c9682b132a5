"""Retention: what is kept of old runs, and for how long.

A finished run's ``text.delta`` events are only its reply in pieces: once the run has ended,
its ``message.completed`` event (and the stored message) hold the whole text. ``prune`` removes
the deltas of runs that ended before a cutoff, a batch of runs per transaction, and keeps
everything else: messages, tool calls and results, approvals, run records. A replay of a
pruned run then gives its ``message.completed`` without the deltas before it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from countersign.domain.models import RunId
from countersign.services import ServiceDeps

logger = logging.getLogger(__name__)

BATCH_RUNS = 500
"""Runs whose deltas one transaction removes (bounded locks, bounded memory)."""


@dataclass(frozen=True, slots=True)
class PruneReport:
    """What a prune removed, and the event log's size before and after."""

    runs: int
    """Finished runs looked at (ended before the cutoff)."""
    deltas: int
    """``text.delta`` events removed."""
    events_before: int
    events_after: int
    bytes_before: int | None
    """The event log's size on disk (PostgreSQL: the table with its indexes), or the whole
    database file's used pages (SQLite); None when the database cannot say."""
    bytes_after: int | None


async def prune(deps: ServiceDeps, *, before: datetime) -> PruneReport:
    """Remove the text deltas of runs that ended before ``before``."""
    async with deps.uow_factory(write=False) as uow:
        events_before, bytes_before = await uow.runs.event_storage()
    runs = deltas = 0
    after: RunId | None = None
    while True:
        async with deps.uow_factory() as uow:
            batch = await uow.runs.ended_before(before, after=after, limit=BATCH_RUNS)
            if not batch:
                break
            deltas += await uow.runs.delete_text_deltas(batch)
            await uow.commit()
        runs += len(batch)
        after = batch[-1]
    async with deps.uow_factory(write=False) as uow:
        events_after, bytes_after = await uow.runs.event_storage()
    report = PruneReport(runs, deltas, events_before, events_after, bytes_before, bytes_after)
    logger.info("pruned %d text deltas of %d finished runs", deltas, runs, extra={"deltas": deltas})
    return report


async def prune_older_than(deps: ServiceDeps, age: timedelta) -> PruneReport:
    """``prune`` of the runs that ended more than ``age`` ago."""
    return await prune(deps, before=deps.clock.now() - age)
