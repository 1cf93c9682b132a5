"""What event streams follow: one look at the database per process, not one per stream.

A stream waits on its broker subscription and never polls. Wake-ups can still be missed: the
process that wrote an event died before its NOTIFY went out, the LISTEN connection was down,
or a run's events were written before its stream subscribed. So once a second this process
reads the newest event seq of every run it has followers for (one statement per
``SWEEP_CHUNK`` runs, however many streams follow them) and the broker wakes the followers
of runs that moved on without telling them.
"""

from __future__ import annotations

import asyncio

from countersign.domain.errors import CountersignError
from countersign.services import ServiceDeps
from countersign.supervisor import Loop

SWEEP_CHUNK = 500
FOLLOW_LOOP = "stream follower"
GONE = 2**62
"""The newest seq given for a run no longer in the database: past anything a stream saw."""


async def sweep_followed_runs(deps: ServiceDeps) -> int:
    """Wake the followers of runs with news they were not handed; returns how many runs."""
    followed = deps.broker.followed_runs()
    woken = 0
    for start in range(0, len(followed), SWEEP_CHUNK):
        chunk = followed[start : start + SWEEP_CHUNK]
        async with deps.uow_factory(write=False, transaction=False) as uow:  # one statement
            newest = await uow.runs.newest_seqs(chunk)
        # A run that is gone (its session was deleted) wakes its followers too: they read,
        # find it missing and end their streams.
        gone = {run_id: GONE for run_id in chunk if run_id not in newest}
        woken += deps.broker.found_in_database({**newest, **gone})
    return woken


async def follow_loop(deps: ServiceDeps, loop: Loop, *, every: float) -> None:
    """Sweep every ``every`` seconds, for as long as the server runs."""
    while True:
        try:
            await sweep_followed_runs(deps)
            loop.working()
        except CountersignError as error:
            loop.last_error = error.message  # the database is away; streams just wait longer
        await asyncio.sleep(every)
