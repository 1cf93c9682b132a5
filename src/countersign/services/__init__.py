"""Use cases: the only place a unit of work is opened and committed.

Every service function takes ``ServiceDeps`` first and returns plain domain values.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from countersign.broker import LocalBroker
from countersign.config import Settings
from countersign.db.uow import UnitOfWorkFactory
from countersign.domain.errors import InvalidInput
from countersign.domain.models import Clock, Page, decode_cursor, encode_cursor, new_id


@dataclass(frozen=True, slots=True)
class ServiceDeps:
    """What every service gets: units of work, the clock, ids, settings and the broker."""

    uow_factory: UnitOfWorkFactory
    clock: Clock
    settings: Settings
    new_id: Callable[[], uuid.UUID] = new_id
    broker: LocalBroker = field(default_factory=LocalBroker)


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
