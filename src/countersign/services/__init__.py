"""Use cases: the only place a unit of work is opened and committed.

Every service function takes ``ServiceDeps`` first and returns plain domain values.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from countersign.config import Settings
from countersign.db.uow import UnitOfWorkFactory
from countersign.domain.models import Clock, new_id


@dataclass(frozen=True, slots=True)
class ServiceDeps:
    """What every service gets: how to open a unit of work, the clock, ids and settings."""

    uow_factory: UnitOfWorkFactory
    clock: Clock
    settings: Settings
    new_id: Callable[[], uuid.UUID] = new_id
