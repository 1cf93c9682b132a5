"""The per-user feed's own rules, on a hub of its own (no server loop looks for it)."""

from __future__ import annotations

import asyncio
import uuid

from countersign.domain.models import UserId
from countersign.services import ServiceDeps
from countersign.services.feed import FeedEvent, FeedHub, feed_events

BOUND = 10.0


async def test_a_busy_feed_still_checks_its_credential(services: ServiceDeps) -> None:
    """Events always waiting (a busy user, a slow reader) do not put the check off: once its
    time has come, the feed asks, hears the credential is gone, and ends."""
    hub = FeedHub(services)
    user = UserId(uuid.uuid4())
    asked = 0

    async def gone() -> bool:
        nonlocal asked
        asked += 1
        return False

    async def busy() -> None:
        while True:
            hub._send(user, FeedEvent("session.changed", {"session_id": str(uuid.uuid4())}))
            await asyncio.sleep(0.001)

    feeding = asyncio.create_task(busy())
    received = 0
    try:
        async with asyncio.timeout(BOUND):
            async for _event in feed_events(hub, user, still_valid=gone, recheck_every=0.2):
                received += 1
                await asyncio.sleep(0.002)  # slower than the events come
    finally:
        feeding.cancel()
        await asyncio.gather(feeding, return_exceptions=True)
    assert asked == 1
    assert received > 0
    assert hub.feeds_open() == 0
