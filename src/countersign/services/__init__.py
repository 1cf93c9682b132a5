"""Use cases: the only place a unit of work is opened and committed.

Every service function takes ``ServiceDeps`` first and returns plain domain values.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from countersign.broker import LocalBroker
from countersign.config import Settings
from countersign.db.uow import UnitOfWorkFactory
from countersign.domain.models import Clock, new_id


@dataclass(frozen=True, slots=True)
class ServiceDeps:
    """What every service gets: units of work, the clock, ids, settings and the broker."""

    uow_factory: UnitOfWorkFactory
    clock: Clock
    settings: Settings
    new_id: Callable[[], uuid.UUID] = new_id
    broker: LocalBroker = field(default_factory=LocalBroker)
