"""Use cases: the only place a unit of work is opened and committed.

Every service function takes ``ServiceDeps`` first and returns plain domain values.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, TypeVar

from countersign.broker import LocalBroker
from countersign.config import Settings
from countersign.db.uow import UnitOfWork, UnitOfWorkFactory
from countersign.domain.errors import InvalidInput
from countersign.domain.models import (
    Clock,
    Lease,
    Page,
    Run,
    RunId,
    TurnContext,
    decode_cursor,
    encode_cursor,
    new_id,
)


class LocalExecutor(Protocol):
    """This process's executor, as a request that starts a run sees it: a run started here
    is claimed for it in the request's own transaction and handed over in memory."""

    def reserve(self, *, now: datetime) -> Lease | None:
        """A lease for a new run if a slot is free (held until ``hand_off`` or ``unreserve``)."""

    def unreserve(self) -> None:
        """Give a reserved slot back (the run was not started)."""

    def hand_off(self, run: Run, *, lease: Lease, context: TurnContext) -> None:
        """Carry out a committed run claimed with a reserved lease."""

    def adopt(self, run: Run, *, lease: Lease, until: datetime) -> None:
        """Carry out a run claimed with a reserved lease whose start may not be stored (its
        statement's answer was lost): read it back, and carry it out if it is there."""

    def lease_until(self, now: datetime) -> datetime:
        """When a lease taken now runs out."""

    async def take(self, uow: UnitOfWork, run_id: RunId, *, now: datetime) -> TakenRun | None:
        """Claim a run that ``uow`` has just re-queued (a decision), if a slot is free, and
        read what its next attempt starts from, in that same transaction."""


class TakenRun(Protocol):
    """A run claimed inside a transaction that has not committed yet."""

    def start(self) -> None:
        """The transaction committed: carry the run out."""

    def drop(self) -> None:
        """The transaction did not commit: give the slot back (the run stays queued)."""


@dataclass(frozen=True, slots=True)
class ServiceDeps:
    """What every service gets: units of work, the clock, ids, settings and the broker."""

    uow_factory: UnitOfWorkFactory
    clock: Clock
    settings: Settings
    new_id: Callable[[], uuid.UUID] = new_id
    broker: LocalBroker = field(default_factory=LocalBroker)
    executor: LocalExecutor | None = None
    """Set by the composition root once the executor exists (None: runs wait to be claimed)."""


def uuid_cursor(cursor: str | None) -> uuid.UUID | None:
    """The id a page cursor stands for (None: the first page); InvalidInput if it is not one."""
    if cursor is None:
        return None
    try:
        return uuid.UUID(decode_cursor(cursor))
    except ValueError:
        raise InvalidInput("cursor is not valid; use next_cursor from a previous page") from None


T = TypeVar("T")


def page_of(items: list[T], limit: int, position: Callable[[T], str]) -> Page[T]:
    """The first ``limit`` of ``items`` (read with ``limit + 1``), with a cursor at the last
    one's ``position`` when one more was found."""
    if len(items) <= limit:
        return Page(items=items, next_cursor=None)
    kept = items[:limit]
    return Page(items=kept, next_cursor=encode_cursor(position(kept[-1])))
